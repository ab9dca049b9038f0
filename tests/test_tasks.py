"""data=tasks: reading the benchmark format, answer-only rows, exact-match accuracy, and a
continual-learning run's accuracy matrix, AA and BWT."""

import json

import pytest
import torch

from llm_pretrain import report, tasks
from llm_pretrain.config import DataConfig, TasksConfig
from llm_pretrain.continual import continual_metrics
from llm_pretrain.model import IGNORE_INDEX, build_model
from llm_pretrain.tokenizer import load_tokenizer
from llm_pretrain.train import train
from tests.conftest import SHARED_DATA, T5_SPIECE, TINY, compose_cfg

CL = SHARED_DATA / "cl_benchmark"
T5_MODEL = TINY + ["model.vocab_size=32000", "data.seq_len=96"]


def write_task(folder, train, test=None, labels=("yes", "no")):
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(list(labels)))
    (folder / "train.json").write_text(json.dumps(train))
    if test is not None:
        (folder / "test.json").write_text(json.dumps(test))
    return folder


def records(labels, n):
    return [{"label": labels[i % len(labels)], "sentence": f"example {i}"} for i in range(n)]


def test_continual_metrics_follow_the_definitions():
    m = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.4, 0.6, 0.7]]
    out = continual_metrics(m)
    assert out["aa"] == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    assert out["bwt"] == pytest.approx(((0.4 - 0.9) + (0.6 - 0.8)) / 2)
    assert continual_metrics(m[:2]) == {"aa": None, "bwt": None}  # unfinished run


def test_a_task_with_one_file_is_split_by_label_in_file_order(tmp_path):
    folder = write_task(tmp_path / "SC" / "mine", records(["yes", "no"], 20))
    cfg = TasksConfig(names=[str(folder)], train_per_class=5, eval_per_class=2)
    task = tasks.load_task(folder, cfg)
    assert [e.target for e in task.train].count("yes") == 5
    assert len(task.test) == 4  # the last 30% of each label (3), the first 2 kept
    assert all(e.prompt.endswith("\nOption: yes, no\nAnswer:") for e in task.train)
    # the 70% cut is by label in file order: training and test never share an example
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.test}


def test_the_benchmark_reads_with_its_instruction():
    task = tasks.load_task(
        tasks.resolve("agnews", CL), TasksConfig(names=["agnews"], eval_per_class=1)
    )
    assert task.labels[0] in {e.target for e in task.train}
    assert task.train[0].prompt.startswith("What is the topic of the following paragraph?")
    assert len(task.test) == len(task.labels)
    with pytest.raises(tasks.TaskError, match="yahoo's examples: use yelp"):
        tasks.load_task(tasks.resolve("yahoo", CL), TasksConfig(names=["yahoo"]))
    with pytest.raises(tasks.TaskError, match="no task 'nope'.*known: .*agnews"):
        tasks.resolve("nope", CL)


def test_bad_task_files_are_refused_by_record(tmp_path):
    cfg = TasksConfig(names=["x"])
    bad = write_task(tmp_path / "a" / "t", [{"sentence": "no label"}])
    with pytest.raises(tasks.TaskError, match="record 0 has no 'label' field"):
        tasks.load_task(bad, cfg)
    odd = write_task(tmp_path / "b" / "t", records(["yes", "maybe"], 6))
    with pytest.raises(tasks.TaskError, match="label 'maybe', not in .*unknown_labels=drop"):
        tasks.load_task(odd, cfg)
    kept = tasks.load_task(odd, TasksConfig(names=["x"], unknown_labels="drop"))
    assert kept.dropped == 3 and {e.target for e in kept.train + kept.test} == {"yes"}


@pytest.fixture(scope="module")
def t5():
    return load_tokenizer(str(T5_SPIECE))


def test_rows_train_on_the_answer_only_and_long_prompts_lose_their_left_side(tmp_path, t5):
    long = [{"label": "yes", "sentence": "word " * 200}] + records(["yes", "no"], 9)
    folder = write_task(tmp_path / "SC" / "long", long, records(["yes", "no"], 4))
    task = tasks.load_task(folder, TasksConfig(names=["x"]))
    data = tasks.encode_task(task, t5, 64, 32000, truncate=True)
    assert data.truncated == {"train": 1, "test": 0}
    cut = next(e for e in data.train if e.answer == "yes" and len(e.prompt) > 40)
    assert t5.decode(cut.prompt).endswith("Option: yes, no Answer:")  # (T5: newline = space)
    row = tasks.TaskRows(data.train, 64, t5.pad_id, 0).row(cut)
    answer = row["labels"][row["labels"] != IGNORE_INDEX].tolist()
    assert answer == cut.target and answer[-1] == t5.eos_id
    with pytest.raises(tasks.TaskError, match="1 of 10 prompts are longer.*truncate_prompts"):
        tasks.encode_task(task, t5, 64, 32000, truncate=False)
    with pytest.raises(tasks.TaskError, match="token id .* >= model.vocab_size=1000"):
        tasks.encode_task(task, t5, 64, 1000, truncate=True)
    small = DataConfig(
        source="tasks", tokenizer="x", layout="paper", tasks=TasksConfig(names=["x"])
    )
    with pytest.raises(tasks.TaskError, match="tokenizer has 32000 ids but model.vocab_size=2048"):
        tasks.load(small, t5, 2048)


def test_greedy_decoding_and_option_scores_match_the_full_forward(tmp_path, t5):
    """Batched, right-padded decoding reads each row's own last position: the same tokens as
    one row at a time through the full (B, T, V) logits; the options' scores are the sums of
    their tokens' log-probabilities."""
    cfg = compose_cfg(T5_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    torch.set_grad_enabled(False)  # (restored below: as accuracy() runs it)
    got = tasks._greedy(model, prompts, 3, t5, torch.device("cpu"), stop_early=False)
    for p, answer in zip(prompts, got, strict=True):
        ids = list(p)
        want = []
        for _ in range(3):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt == t5.eos_id:
                break
            want.append(nxt)
            ids.append(nxt)
        assert answer == want
    torch.set_grad_enabled(True)
    options = [[20, 1], [21, 22, 1]]
    scores = tasks._option_scores(model, prompts[:2], options, torch.device("cpu"))
    with torch.no_grad():
        logits = model(torch.tensor([prompts[1] + options[1]])).double()
    logp = torch.log_softmax(logits, -1)[0]
    n = len(prompts[1])
    want = sum(float(logp[n - 1 + k, t]) for k, t in enumerate(options[1]))
    assert float(scores[1, 1]) == pytest.approx(want, abs=1e-5)


def test_a_continual_run_writes_its_accuracy_matrix_aa_and_bwt(tmp_path, capsys):
    """A tiny experiment=cl_order1 on two benchmark tasks, a phase each, options scoring."""
    cfg = compose_cfg(
        T5_MODEL
        + [
            "experiment=cl_order1",
            "data.tasks.names=[agnews,dbpedia]",
            "data.tasks.train_per_class=1",
            "data.tasks.eval_per_class=1",
            "data.tasks.metric=options",
            "trainer.global_batch_size=4",
            "trainer.warmup_steps=0",
            "eval.tokens=200",
        ]
    )
    s = train(cfg, tmp_path)
    cl = s["tasks"]["continual"]
    assert cl["steps_per_phase"] == [1, 4]  # one epoch: 4 and 14 examples, batches of 4
    assert s["steps"] == 5 and len(cl["matrix"]) == 2 and len(cl["matrix"][0]) == 2
    assert s["tokens_seen"] > 20 * 30  # 20 rows of prompts and answers, not the answers only
    assert cl["aa"] == pytest.approx(sum(cl["matrix"][1]) / 2)
    assert cl["bwt"] == pytest.approx(cl["matrix"][1][0] - cl["matrix"][0][0])
    assert s["tasks"]["examples"]["dbpedia"] == {"train": 14, "test": 14}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["tasks"]["continual"]["aa"] == cl["aa"]
    # the report of the run directory: the task table and the accuracy heatmap
    report.main([str(tmp_path)])
    out = capsys.readouterr().out.split("### tasks")[1]
    line = next(x for x in out.splitlines() if x.startswith("| adamw |"))
    assert f"| {100 * cl['aa']:.1f} | {100 * cl['bwt']:+.1f} |" in line
    assert (tmp_path / "report_tasks.png").read_bytes()[:4] == b"\x89PNG"
    # a sequential run's length comes from its phases
    bad = compose_cfg(T5_MODEL + ["experiment=cl_order1", "trainer.max_steps=7"])
    with pytest.raises(tasks.TaskError, match="phases take .* trainer.max_steps=null"):
        train(bad, tmp_path / "bad")


def test_a_continual_run_resumes_mid_phase_exactly(tmp_path):
    """A checkpoint inside the second phase holds the first phase's accuracies and the second
    task's data position: the resumed run's losses and matrix are bit-identical."""
    from tests.test_train import losses

    base = T5_MODEL + [
        "experiment=cl_order1",
        "data.tasks.names=[agnews,dbpedia]",
        "data.tasks.train_per_class=1",
        "data.tasks.eval_per_class=1",
        "data.tasks.steps_per_task=3",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=2",
        "trainer.log_every=1",
        "eval.tokens=100",
    ]
    straight = train(compose_cfg(base + ["checkpoint.every=4"]), tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000004.pt"
    resumed = train(compose_cfg(base + [f"checkpoint.resume={ckpt}"]), tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 6
    assert losses(tmp_path / "b") == losses(tmp_path / "a")[4:]
    assert resumed["tasks"]["continual"] == straight["tasks"]["continual"]


def test_a_jsonl_task_trains_mixed_with_a_benchmark_task_and_greedy_accuracy(tmp_path):
    qa = tmp_path / "capitals.jsonl"
    rows = [{"prompt": f"Q: capital {i}?\nA:", "response": f"city {i % 3}"} for i in range(10)]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tasks.load_task(qa, TasksConfig(names=[str(qa)]))
    assert (len(task.train), len(task.test)) == (7, 3) and task.labels is None
    assert task.test[0] == tasks.Example("Q: capital 7?\nA:", "city 1")
    with pytest.raises(tasks.TaskError, match="metric=options scores a task's labels"):
        tasks.load_task(qa, TasksConfig(names=[str(qa)], metric="options"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(tasks.TaskError, match="record 0 has no 'response' field"):
        tasks.load_task(bad, TasksConfig(names=[str(bad)]))
    cfg = compose_cfg(
        T5_MODEL
        + [
            "data=tasks",
            f"data.tasks.names=[{qa},agnews]",
            "data.tasks.eval_per_class=1",
            "data.tasks.train_per_class=2",
            "trainer.max_steps=2",
            "trainer.global_batch_size=4",
            "trainer.micro_batch_size=2",
            "trainer.warmup_steps=0",
            "trainer.eval_every=0",
            "trainer.eval_at_start=false",
            "eval.tokens=100",
        ]
    )
    s = train(cfg, tmp_path / "run")
    t = s["tasks"]
    assert t["order"] == "mixed" and "continual" not in t and t["metric"] == "generate"
    assert set(t["accuracy"]) == {"capitals", "agnews"}
    assert all(0.0 <= a <= 1.0 for a in t["accuracy"].values())
    # a .jsonl task counts as one class: its first 2 training and 1 test examples
    assert t["examples"] == {"capitals": {"train": 2, "test": 1}, "agnews": {"train": 8, "test": 4}}


def test_gorp_carries_its_task_subspace_across_phases_and_other_methods_restart(tmp_path):
    base = T5_MODEL + [
        "experiment=cl_order1",
        "data.tasks.names=[agnews,SST-2]",
        "data.tasks.train_per_class=2",
        "data.tasks.eval_per_class=1",
        "data.tasks.steps_per_task=2",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=2",
        "checkpoint.at_end=true",
        "trainer.warmup_steps=0",
        "eval.tokens=100",
    ]
    from llm_pretrain import checkpoint

    s = train(compose_cfg(base + ["optimizer=gorp", "optimizer.rank=4"]), tmp_path / "gorp")
    first, second = s["tasks"]["continual"]["optimizer_state_per_phase"]
    assert second > first  # the first task's subspace beside the second task's moments
    state = checkpoint.load(tmp_path / "gorp" / "checkpoints" / "step_00000004.pt")["optimizer"]
    kept = [s for s in state["state"].values() if "task_basis" in s]
    assert len(kept) == 7 * 2  # every projected matrix of the 2 layers, from the first task
    assert all(s["step"] == 2 for s in kept)  # fresh moments in the second task
    train(compose_cfg(base + ["optimizer=adamw"]), tmp_path / "adamw")
    state = checkpoint.load(tmp_path / "adamw" / "checkpoints" / "step_00000004.pt")["optimizer"]
    assert {float(s["step"]) for s in state["state"].values()} == {2.0}  # restarted at step 2
