"""Train a small SentencePiece tokenizer on a local corpus's training documents.

A 32,000-piece vocabulary (T5's) makes the LM head two thirds of a 9M-parameter model's compute,
so a CPU benchmark that must train hundreds of runs on 2 cores buys far more steps with a
2,048-piece vocabulary learned from the corpus itself (``experiment=cpu_bench``,
``docs/benchmarks.md``). The documents ``data.files`` holds out for validation (the first
``held_out``) are left out of the training text, so the tokenizer never sees the evaluation text.

    python -m llm_pretrain.tokenizer_training CORPUS OUT.model [--vocab-size 2048]
        [--held-out 200] [--text-field text]

Training is deterministic (one thread, the documents in file order): the same corpus, settings
and output path give the same model file, byte for byte.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llm_pretrain.data import _local_dataset, _resolve_files, check_files

READ_BATCH = 256


def training_text(corpus: str, held_out: int, text_field: str, out) -> int:
    """Write the training documents' paragraphs of ``corpus`` (a path or glob, as
    ``data.path``), one per line, to ``out``; returns how many documents were written."""
    files = _resolve_files(corpus, "corpus")
    check_files(files, "corpus", "utf-8", "stop")
    ds = _local_dataset(files, "corpus")().skip(held_out)
    docs = 0
    for batch in ds.iter(batch_size=READ_BATCH):
        if text_field not in batch:
            raise KeyError(
                f"{corpus}: documents have no field {text_field!r} (fields: {sorted(batch)}); "
                "pass --text-field"
            )
        for text in batch[text_field]:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            out.write("\n".join(lines) + "\n")
            docs += 1
    if docs == 0:
        raise ValueError(f"{corpus}: no document is left after the {held_out} held out")
    return docs


def train_sentencepiece(
    corpus: str,
    out: Path,
    vocab_size: int = 2048,
    held_out: int = 200,
    text_field: str = "text",
) -> Path:
    """Train a unigram SentencePiece model on ``corpus`` minus its first ``held_out``
    documents; write ``out`` (a ``.model`` file, usable as ``data.tokenizer``)."""
    import sentencepiece as spm

    out = Path(out)
    if out.suffix != ".model":
        raise ValueError(f"{out}: the output must be a .model file (data.tokenizer reads those)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # the trainer writes its input and prefix paths into the model: fixed ones (beside ``out``)
    # keep the file byte for byte the same from run to run
    text, prefix = out.parent / f".{out.stem}.txt", out.parent / f".{out.stem}"
    try:
        with open(text, "w", encoding="utf-8") as f:
            training_text(corpus, held_out, text_field, f)
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=0.9995,
            pad_id=0,  # (the loader masks pads; T5's layout: pad 0, eos 1, unk 2)
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            max_sentence_length=1 << 16,
            num_threads=1,
            input_sentence_size=0,
            minloglevel=2,
        )
        Path(f"{prefix}.model").replace(out)
    finally:
        for leftover in (text, Path(f"{prefix}.model"), Path(f"{prefix}.vocab")):
            leftover.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", help="a .jsonl/.json/.txt/.parquet file or glob (as data.path)")
    ap.add_argument("out", type=Path, help="the .model file to write")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--held-out", type=int, default=200, help="as data.val_docs")
    ap.add_argument("--text-field", default="text")
    args = ap.parse_args(argv)
    path = train_sentencepiece(
        args.corpus, args.out, args.vocab_size, args.held_out, args.text_field
    )
    print(path)


if __name__ == "__main__":
    main()
