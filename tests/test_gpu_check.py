"""``make gpu-check``'s script in its dry mode (no CUDA here): every section runs end to end on
the CPU subset, and what it could not run is listed with the reason."""

from llm_pretrain.checkpointing import MODES
from tests.conftest import REPO, run_cli


def test_the_dry_run_checks_the_cpu_subset_and_says_what_it_skipped(tmp_path):
    page = tmp_path / "gpu.md"
    out = run_cli(
        ["--work", str(tmp_path / "work"), "--out", str(page)],
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1"},
        module="llm_pretrain.gpu_check",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = page.read_text()
    assert text.startswith("# GPU check (dry run on CPU)")
    assert "Written by `python -m llm_pretrain.gpu_check --dry`" in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    # every Triton kernel ran (in Triton's interpreter) and matched its reference
    for kernel in ("quantize / dequantize (4 and 8 bits)", "seeded projection x @ P",
                   "MicroAdam update", "Philox-4x32-10"):  # fmt: skip
        assert rows[kernel].startswith(f"| {kernel} | ok |"), rows[kernel]
    assert "4-bit codes equal | 4-bit dequantize max diff" in text
    # training: the loss fell, and the memory prediction is there
    for run in ("llama_tiny adamw", "llama_tiny q_galore optimizer.weight_storage=int8"):
        assert rows[run].startswith(f"| {run} | ok |"), rows[run]
    checkpointing = [f"activation checkpointing {m}" for m in MODES]
    for variant in ("dense head", "chunked head", *checkpointing):
        assert rows[variant].startswith(f"| {variant} | ok |"), rows[variant]
    # what a GPU would add is listed, with why it was skipped
    assert "| llama_60m bf16 logits, 4 x 256 | skipped |" in text and "no CUDA" in text
    assert "galore_8bit, apollo, apollo_mini, microadam, ldadam, rso, muon; llama_60m" in text
    assert "| compile on | skipped |" in text
    assert " 0 failed, " in text and "| failed |" not in text
