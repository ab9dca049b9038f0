"""Tokenizers behind one small interface: ids of a document, EOS appended, pad and EOS ids.

Three kinds, picked by ``data.tokenizer``:

* ``builtin``: the word-level vocabulary of the built-in language (:mod:`llm_pretrain.corpus`);
* a SentencePiece ``.model`` file (the T5 ``spiece.model`` of GaLore/APOLLO: pad 0, EOS 1, no
  BOS), loaded with ``sentencepiece`` directly so ids do not depend on a transformers version;
* a Hugging Face ``tokenizer.json`` file, a directory holding one, or a hub name such as
  ``t5-base`` (loaded with the ``tokenizers`` library; the hub needs a network).

Every tokenizer appends EOS to each document, as the T5 tokenizer does in the reference scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from llm_pretrain.corpus import Language, LanguageSpec

EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|padding|>")


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each document, EOS appended."""
        ...

    def decode(self, ids: list[int]) -> str: ...


class BuiltinTokenizer:
    """Word-level tokenizer of the built-in language: one id per word, exactly invertible."""

    def __init__(self, language: Language) -> None:
        self.language = language
        self.vocab_size = language.spec.vocab_size
        self.pad_id, self.eos_id = 0, 1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.language.encode(t) + [self.eos_id] for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.language.decode(list(ids))


class SentencePieceTokenizer:
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"data.tokenizer={path}: the SentencePiece model defines no EOS piece")
        # T5 has pad 0; models trained without a pad piece get EOS as filler (pads are masked).
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [ids + [self.eos_id] for ids in self.sp.encode(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


class HFTokenizer:
    """A ``tokenizers`` tokenizer; special tokens come from tokenizer_config.json or the vocab."""

    def __init__(self, tok, eos: str | None, pad: str | None, where: str) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        vocab = tok.get_vocab(with_added_tokens=True)
        eos = eos or next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None or eos not in vocab:
            raise ValueError(
                f"data.tokenizer={where}: no EOS token (tried {eos or EOS_CANDIDATES}); "
                "add eos_token to tokenizer_config.json beside tokenizer.json"
            )
        self.eos_id = vocab[eos]
        pad = pad or next((t for t in PAD_CANDIDATES if t in vocab), None)
        self.pad_id = vocab.get(pad, self.eos_id)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [
            e.ids + [self.eos_id] for e in self.tok.encode_batch(texts, add_special_tokens=False)
        ]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))


def _special_tokens(directory: Path) -> tuple[str | None, str | None]:
    cfg_path = directory / "tokenizer_config.json"
    if not cfg_path.exists():
        return None, None
    cfg = json.loads(cfg_path.read_text())

    def content(v):
        return v.get("content") if isinstance(v, dict) else v

    return content(cfg.get("eos_token")), content(cfg.get("pad_token"))


def load_tokenizer(spec: str, builtin: LanguageSpec | None = None) -> Tokenizer:
    """Resolve ``data.tokenizer`` to a tokenizer, with an error that says what to fix."""
    if spec == "builtin":
        return BuiltinTokenizer(Language(builtin or LanguageSpec()))
    path = Path(spec).expanduser()
    if path.suffix == ".model":
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer={spec}: no such SentencePiece model file")
        return SentencePieceTokenizer(path)
    from tokenizers import Tokenizer as HFTok

    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"data.tokenizer={spec}: directory has no tokenizer.json; point data.tokenizer at "
                "a SentencePiece .model file, a tokenizer.json, or a directory with one"
            )
        eos, pad = _special_tokens(path)
        return HFTokenizer(HFTok.from_file(str(path / "tokenizer.json")), eos, pad, spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer={spec}: no such tokenizer.json file")
        eos, pad = _special_tokens(path.parent)
        return HFTokenizer(HFTok.from_file(str(path)), eos, pad, spec)
    if path.exists() or "/" in spec and spec.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"data.tokenizer={spec}: not a SentencePiece .model, a tokenizer.json or a directory "
            "holding one"
        )
    try:  # a hub name such as t5-base: needs the network (clusters, not CI)
        return HFTokenizer(HFTok.from_pretrained(spec), None, None, spec)
    except Exception as e:
        raise FileNotFoundError(
            f"data.tokenizer={spec}: not a local file and could not be loaded from the Hugging "
            f"Face hub ({type(e).__name__}: {e}); give a local path to spiece.model or "
            "tokenizer.json"
        ) from e
