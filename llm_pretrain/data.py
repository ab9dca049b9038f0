"""Documents -> token ids -> fixed-length rows, sharded exactly once, resumable.

Sources (``data.source``):

* ``builtin``: documents of the built-in language, document ``i`` a pure function of
  ``(builtin_seed, split, i)``: no files, no network, infinite;
* ``files``: local jsonl / json(.gz) / txt / parquet globs read with HF ``datasets`` streaming;
* ``c4``: ``load_dataset("allenai/c4", "en", streaming=True)``, the cluster default. Its code path
  is the same as ``files`` once the HF stream exists, and the tests exercise it on local shards.

Sharding: every DDP rank and every DataLoader worker is one *node* among
``world_size x num_workers``. A node reads the documents ``datasets.split_dataset_by_node`` gives
it (whole shards when the shard count divides, every n-th document otherwise) and iterates with
``IterableDataset.iter``, which does not split again inside a worker (the reference scripts'
double sharding). Each document therefore reaches exactly one node.

Layouts (``data.layout``):

* ``paper``: one document per row, truncated or right-padded to ``seq_len``, pads masked from the
  loss; what GaLore/APOLLO train and evaluate on (their perplexities assume it);
* ``packed``: documents joined with EOS and cut into full ``seq_len`` rows.

Resume: a node's state is (epoch, documents consumed, tokens carried into the next row). The
``StatefulDataLoader`` from torchdata snapshots it per worker in step with the batches it yields,
so a checkpoint records exactly what training consumed.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import logging
import lzma
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from llm_pretrain.config import DataConfig
from llm_pretrain.corpus import Language, LanguageSpec
from llm_pretrain.model import IGNORE_INDEX
from llm_pretrain.tokenizer import BuiltinTokenizer, Tokenizer

log = logging.getLogger(__name__)
# torchdata 0.11 calls a torch API that warns on every loader start; it is harmless.
warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")

SPLITS = {"train": 0, "validation": 1}
READ_BATCH = 64  # documents read and tokenized together
FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


SPLIT_MODES = ("shards", "documents")


def split_mode(cfg: DataConfig) -> str:
    """How the training stream goes to the data nodes (``data.split``, resolved)."""
    if cfg.split is not None and cfg.split not in SPLIT_MODES:
        raise ValueError(f"data.split={cfg.split!r}: use one of {SPLIT_MODES} (or null)")
    if cfg.source in ("builtin", "tasks"):
        if cfg.split == "shards":
            what = "built-in corpus" if cfg.source == "builtin" else "task set"
            raise ValueError(
                f"data.split=shards: the {what} "
                "has no shards, its documents are always split by index; leave data.split unset "
                "or set it to documents"
            )
        return "documents"
    return cfg.split or "shards"


def builtin_spec(cfg: DataConfig) -> LanguageSpec:
    return LanguageSpec(seed=cfg.builtin_seed, vocab_size=cfg.builtin_vocab_size)


# ---------------------------------------------------------------------------------- documents
class DocumentSource:
    """A split's documents for one node; ``iterate(skip)`` resumes after ``skip`` documents."""

    empty_hint = ""  # appended to the "no documents" error

    # Documents go to nodes by index modulo the node count (so the stream can be re-split over
    # another number of nodes from a global position, ``base``): the built-in corpus, and
    # files or c4 under data.split=documents.
    resplittable = False

    def iterate(
        self, node: int, num_nodes: int, epoch: int, skip: int, base: int = 0
    ) -> Iterator[list[int]]:
        raise NotImplementedError


class BuiltinDocuments(DocumentSource):
    def __init__(self, language: Language, split: str) -> None:
        self.language, self.split = language, SPLITS[split]

    resplittable = True

    def iterate(
        self, node: int, num_nodes: int, epoch: int, skip: int, base: int = 0
    ) -> Iterator[list[int]]:
        # Infinite: epochs never end, so ``epoch`` is always 0 here. Document ``base + node +
        # k * num_nodes`` is this node's k-th.
        i = base + node + skip * num_nodes
        seed = self.language.spec.seed
        while True:
            yield self.language.document([seed, self.split, i])
            i += num_nodes


class HFDocuments(DocumentSource):
    """Documents of an HF streaming dataset, tokenized in batches on the reading node."""

    def __init__(
        self,
        make_dataset,
        tokenizer: Tokenizer,
        text_field: str,
        shuffle: bool,
        seed: int,
        take: int | None = None,
        skip_head: int = 0,
        where: str = "",
        by_document: bool = False,
    ) -> None:
        self.make_dataset = make_dataset
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.shuffle, self.seed = shuffle, seed
        self.take, self.skip_head = take, skip_head
        self.where = where
        self.resplittable = by_document

    def _dataset(self, epoch: int):
        ds = self.make_dataset()
        if self.shuffle:
            # buffer_size=1: only the shard order is shuffled, so the order is exactly repeatable.
            ds = ds.shuffle(seed=self.seed, buffer_size=1)
            ds.set_epoch(epoch)
        if self.skip_head:
            ds = ds.skip(self.skip_head)
        if self.take is not None:
            ds = ds.take(self.take)
        return ds

    def iterate(
        self, node: int, num_nodes: int, epoch: int, skip: int, base: int = 0
    ) -> Iterator[list[int]]:
        from datasets.distributed import split_dataset_by_node

        if base and not self.resplittable:  # (resplit refuses these sources)
            raise ValueError(f"{self.where}: a stream split by shards has no global offset")

        try:
            if self.resplittable:
                yield from self._every_nth(self._dataset(epoch), node, num_nodes, skip, base)
            else:
                ds = split_dataset_by_node(self._dataset(epoch), rank=node, world_size=num_nodes)
                yield from self._tokenized(ds, skip)
        except (StopIteration, RuntimeError) as e:
            # datasets' json reader infers features from a first row; an empty file has none.
            if isinstance(e, RuntimeError) and "StopIteration" not in str(e):
                raise
            raise ValueError(f"{self.where}: the corpus is empty (no document to read)") from e

    def _texts(self, ds) -> Iterator[list[str]]:
        for batch in ds.iter(batch_size=READ_BATCH):
            if self.text_field not in batch:
                raise KeyError(
                    f"{self.where}: documents have no field {self.text_field!r} "
                    f"(fields: {sorted(batch)}); set data.text_field"
                )
            yield batch[self.text_field]

    def _every_nth(
        self, ds, node: int, num_nodes: int, skip: int, base: int
    ) -> Iterator[list[int]]:
        """Documents ``base + node + k * num_nodes`` for k >= ``skip`` of the whole stream, the
        others read but never tokenized."""
        want, seen = base + node + skip * num_nodes, 0  # global index of the next one
        for texts in self._texts(ds):
            if want < seen + len(texts):
                mine = texts[want - seen :: num_nodes]
                want += len(mine) * num_nodes
                yield from self.tokenizer.encode_batch(mine)
            seen += len(texts)

    def _tokenized(self, ds, skip: int) -> Iterator[list[int]]:
        seen = 0
        for texts in self._texts(ds):
            drop = min(len(texts), max(0, skip - seen))  # resuming: discard without tokenizing
            seen += len(texts)
            if drop < len(texts):
                yield from self.tokenizer.encode_batch(texts[drop:])


def _resolve_files(spec: str, key: str) -> list[str]:
    files: list[str] = []
    for pattern in (p.strip() for p in spec.split(",") if p.strip()):
        matched = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matched:
            raise FileNotFoundError(f"{key}={pattern}: no file matches; check the path or glob")
        files += matched
    formats = {_format_of(f, key) for f in files}
    if len(formats) > 1:
        raise ValueError(f"{key}={spec}: mixes formats {sorted(formats)}; use one kind of file")
    return files


def _format_of(path: str, key: str) -> str:
    suffixes = [s for s in Path(path).suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    fmt = FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise ValueError(
            f"{key}: cannot read {path}; supported: .jsonl .json .txt .parquet (optionally .gz)"
        )
    return fmt


OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def check_files(files: list[str], key: str, encoding: str, on_error: str) -> None:
    """Read every text file once before training: an empty file, or one the encoding cannot
    decode, is refused by name (with the byte position and the fix) instead of failing
    mid-training, deep inside the reader, without the file's name."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"data.encoding={encoding!r}: not an encoding Python knows") from None
    for f in files:
        stat = Path(f).stat()
        seen = (f, stat.st_size, stat.st_mtime_ns, encoding, on_error)
        if _format_of(f, key) == "parquet" or seen in _CHECKED:
            continue  # (parquet: binary, its text columns UTF-8 by definition)
        opener = OPENERS.get(Path(f).suffix, open)
        decoder = codecs.getincrementaldecoder(encoding)("strict")
        size = 0
        with opener(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                if on_error == "stop":
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as e:
                        raise ValueError(
                            f"{key}: {f} is not valid {encoding} (byte {size + e.start:,}: "
                            f"{e.reason}). Set data.encoding to its encoding (e.g. latin-1), or "
                            "data.on_decode_error=replace to read undecodable bytes as U+FFFD, "
                            "or remove the file from the glob"
                        ) from None
                size += len(chunk)
        if size == 0:
            raise ValueError(f"{key}: {f} is empty; remove it from the glob or give it documents")
        _CHECKED.add(seen)


_CHECKED: set[tuple] = set()  # files read once already (train and validation share them)


def _local_dataset(files: list[str], key: str, encoding: str = "utf-8", on_error: str = "stop"):
    fmt = _format_of(files[0], key)
    options = {}
    if fmt != "parquet":
        # datasets applies encoding_errors only when the encoding is not spelled "utf-8"
        name = codecs.lookup(encoding).name
        options = {
            "encoding": "utf_8" if name == "utf-8" and on_error == "replace" else encoding,
            "encoding_errors": "replace" if on_error == "replace" else "strict",
        }

    def make():
        from datasets import load_dataset

        return load_dataset(fmt, data_files=files, split="train", streaming=True, **options)

    return make


def _c4_dataset(cfg: DataConfig, split: str):
    def make():  # pragma: no cover - needs the network; same code path as files once built
        from datasets import load_dataset

        return load_dataset(cfg.hf_name, cfg.hf_config, split=split, streaming=True)

    return make


def document_source(cfg: DataConfig, tokenizer: Tokenizer, split: str) -> DocumentSource:
    """The documents of ``split`` ("train" or "validation") for ``data.source``."""
    if cfg.source == "builtin":
        if not isinstance(tokenizer, BuiltinTokenizer):
            raise ValueError("data.source=builtin needs data.tokenizer=builtin")
        return BuiltinDocuments(tokenizer.language, split)
    by_document = split_mode(cfg) == "documents" and split == "train"
    if cfg.source == "files":
        if not cfg.path:
            raise ValueError(
                "data.source=files needs data.path (a glob of jsonl/txt/parquet files)"
            )
        common = dict(tokenizer=tokenizer, text_field=cfg.text_field, seed=cfg.seed)
        if cfg.val_path:
            key, spec = (
                ("data.path", cfg.path) if split == "train" else ("data.val_path", cfg.val_path)
            )
            files = _resolve_files(spec, key)
            check_files(files, key, cfg.encoding, cfg.on_decode_error)
            return HFDocuments(
                _local_dataset(files, key, cfg.encoding, cfg.on_decode_error),
                shuffle=cfg.shuffle_shards and split == "train",
                where=key,
                by_document=by_document,
                **common,
            )
        files = _resolve_files(cfg.path, "data.path")
        check_files(files, "data.path", cfg.encoding, cfg.on_decode_error)
        make = _local_dataset(files, "data.path", cfg.encoding, cfg.on_decode_error)
        if split == "validation":  # the first val_docs documents are held out
            return HFDocuments(make, shuffle=False, take=cfg.val_docs, where="data.path", **common)
        train = HFDocuments(
            make,
            shuffle=False,
            skip_head=cfg.val_docs,
            where="data.path",
            by_document=by_document,
            **common,
        )
        train.empty_hint = (
            f"; data.val_docs={cfg.val_docs} documents are held out for validation "
            "when data.val_path is unset: lower data.val_docs or set data.val_path"
        )
        return train
    if cfg.source == "c4":
        hf_split = "train" if split == "train" else "validation"
        return HFDocuments(
            _c4_dataset(cfg, hf_split),
            shuffle=cfg.shuffle_shards and split == "train",
            where=f"{cfg.hf_name}/{cfg.hf_config}",
            tokenizer=tokenizer,
            text_field=cfg.text_field,
            seed=cfg.seed,
            by_document=by_document,
        )
    raise ValueError(f"data.source={cfg.source!r}: use builtin, files, c4 or tasks")


# ---------------------------------------------------------------------------------- rows
def data_node(rank: int, world_size: int) -> tuple[int, int]:
    """(this node, number of nodes): every DataLoader worker of every rank is one node."""
    info = get_worker_info()
    workers = info.num_workers if info else 1
    return rank * workers + (info.id if info else 0), world_size * workers


@dataclass
class NodeState:
    epoch: int = 0
    docs: int = 0  # documents of this epoch fully taken from the source
    carry: list[int] = field(default_factory=list)  # packed layout: tokens for the next row
    base: int = 0  # global document index this split starts at (after a re-split)


class TokenRows(IterableDataset):
    """Fixed-length rows (``input_ids``, ``labels``) of one rank's share of a source."""

    def __init__(
        self,
        source: DocumentSource,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        model_vocab: int,
        rank: int = 0,
        world_size: int = 1,
        epochs: bool = True,
    ) -> None:
        if cfg.layout not in ("packed", "paper"):
            raise ValueError(f"data.layout={cfg.layout!r}: use packed or paper")
        self.source, self.seq_len, self.layout = source, cfg.seq_len, cfg.layout
        self.pad_id = tokenizer.pad_id
        self.model_vocab = model_vocab
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs
        self.state = NodeState()

    def state_dict(self) -> dict:
        return {
            "epoch": self.state.epoch,
            "docs": self.state.docs,
            "carry": list(self.state.carry),
            "base": self.state.base,
        }

    def load_state_dict(self, state: dict) -> None:
        self.state = NodeState(
            state["epoch"], state["docs"], list(state["carry"]), state.get("base", 0)
        )

    @property
    def resplittable(self) -> bool:
        return self.source.resplittable

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        node, num_nodes = data_node(self.rank, self.world_size)
        st, L = self.state, self.seq_len
        while True:
            # The state is current at every yield: a snapshot then resumes after this row.
            # (``base`` only after a re-split: a source written for the 4-argument form works)
            at = {"base": st.base} if st.base else {}
            for ids in self.source.iterate(node, num_nodes, st.epoch, st.docs, **at):
                self._check_ids(ids)
                st.docs += 1
                if self.layout == "paper":
                    yield self._row(ids[:L])
                    continue
                st.carry.extend(ids)
                while len(st.carry) >= L:
                    row, st.carry = st.carry[:L], st.carry[L:]
                    yield self._row(row)
            if not self.epochs:
                return
            if st.docs == 0 and st.base == 0:  # (after a re-split a node may get none)
                raise ValueError(
                    f"data node {node} of {num_nodes} received no documents: the corpus is empty "
                    "or has fewer documents than world_size x data.num_workers"
                    + self.source.empty_hint
                )
            log.info("data node %d finished epoch %d after %d documents", node, st.epoch, st.docs)
            st.epoch, st.docs, st.base = st.epoch + 1, 0, 0

    def _row(self, ids: list[int]) -> dict[str, torch.Tensor]:
        pad = self.seq_len - len(ids)
        input_ids = torch.tensor(ids + [self.pad_id] * pad, dtype=torch.long)
        if not pad:  # collate copies, so the two keys may share one tensor
            return {"input_ids": input_ids, "labels": input_ids}
        labels = torch.tensor(ids + [IGNORE_INDEX] * pad, dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels}

    def _check_ids(self, ids: list[int]) -> None:
        if ids and max(ids) >= self.model_vocab:
            raise ValueError(
                f"token id {max(ids)} >= model.vocab_size={self.model_vocab}: the tokenizer "
                "produces ids the embedding table does not have; raise model.vocab_size "
                "(e.g. 32100 for the HF T5 tokenizer) or use a matching tokenizer"
            )


def train_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    model_vocab: int,
    micro_batch: int,
    rank: int,
    world_size: int,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    rows = TokenRows(
        document_source(cfg, tokenizer, "train"), cfg, tokenizer, model_vocab, rank, world_size
    )
    return StatefulDataLoader(
        rows,
        batch_size=micro_batch,
        num_workers=cfg.num_workers,
        persistent_workers=False,
        in_order=True,
        pin_memory=pin_memory,
    )


def _node_states(obj) -> list[dict]:
    """The data nodes' states inside a ``StatefulDataLoader`` state (its own, or its workers')."""
    if isinstance(obj, dict):
        if "dataset_state" in obj and isinstance(obj["dataset_state"], dict):
            return [obj["dataset_state"]]
        return [s for v in obj.values() for s in _node_states(v)]
    return []


def resplit(loader: StatefulDataLoader, saved: list[dict], cfg: DataConfig, path) -> None:
    """Continue a stream written by another number of ranks, deterministically.

    The rule: take the earliest epoch any saved node (rank x worker) is in; with ``n`` saved
    nodes, of which those still in that epoch each took at least ``d`` documents of it, every
    document of the epoch below ``base + n * d`` counts as read, and the new nodes split the
    stream from there (node ``k`` of ``m`` takes ``base + n * d + k + j * m``; the next epoch
    starts at document 0 again). With ``data.layout=paper`` and nodes that took the same number
    of rows (one worker per rank, or as many batches from each worker), nothing is read twice or
    skipped and every later step sees the documents it would have seen on the old world size;
    otherwise the few documents some nodes had read past ``n * d`` (or into the next epoch) are
    read again, and ``packed``'s carried tokens are dropped. Only a stream handed out by
    document index can be re-split: the built-in corpus, and files or c4 under
    ``data.split=documents``; one split by shards is refused.
    """
    rows = loader.dataset  # (TokenRows, or tasks.TaskRows)
    if not rows.resplittable:
        raise ValueError(
            f"checkpoint {path} was written on {len(saved)} rank(s) and data.source="
            f"{cfg.source} was split by shards (data.split=shards: each rank streams whole "
            "shards), which cannot be re-split over another number of ranks; resume on the "
            "same number of ranks (a run started with data.split=documents resumes on any)"
        )
    nodes = [s for rank_state in saved for s in _node_states(rank_state)]
    if not nodes:
        raise ValueError(f"checkpoint {path} holds no data position to re-split")
    epoch = min(s.get("epoch", 0) for s in nodes)
    behind = [s for s in nodes if s.get("epoch", 0) == epoch]
    bases = {s.get("base", 0) for s in behind}
    if len(bases) != 1:
        raise ValueError(f"checkpoint {path}: its data nodes disagree on the stream's start")
    start = bases.pop() + len(nodes) * min(s["docs"] for s in behind)
    rows.state = NodeState(epoch, 0, [], start)


def validation_rows(
    cfg: DataConfig, tokenizer: Tokenizer, model_vocab: int, token_budget: int
) -> dict[str, torch.Tensor]:
    """The evaluation set: the first rows of the held-out split until ``token_budget`` non-pad
    tokens, read by a single node so it is identical for every world size (unlike the papers')."""
    rows = TokenRows(
        document_source(cfg, tokenizer, "validation"), cfg, tokenizer, model_vocab, epochs=False
    )
    inputs, labels, tokens = [], [], 0
    for row in rows:
        inputs.append(row["input_ids"])
        labels.append(row["labels"])
        tokens += int((row["labels"] != IGNORE_INDEX).sum())
        if tokens >= token_budget:
            break
    if not inputs:
        raise ValueError(
            "the validation split has no documents; set data.val_path or lower data.val_docs"
        )
    if tokens < token_budget:
        log.warning(
            "validation split holds %d tokens, fewer than eval.tokens=%d", tokens, token_budget
        )
    return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels)}


def source_entropy(
    cfg: DataConfig, tokenizer: Tokenizer, val: dict[str, torch.Tensor]
) -> float | None:
    """Bayes-optimal loss (nats/token) on the evaluation set, when the source is known."""
    if not isinstance(tokenizer, BuiltinTokenizer):
        return None
    ids = val["input_ids"].numpy()
    mask = (val["labels"] != IGNORE_INDEX).numpy().copy()
    mask[:, 0] = False
    nll = tokenizer.language.optimal_nll(ids, mask, stationary=cfg.layout == "packed")
    return float(nll.sum() / max(1, mask.sum()))
