"""Labelled tasks for fine-tuning and continual learning (``data=tasks``).

A task is a folder in the continual-learning benchmark's format (``../shared/data/cl_benchmark``,
O-LoRA's and GORP's files): ``train.json`` and ``test.json``, JSON arrays of ``{label,
sentence}``, and ``labels.json``; its family's instruction comes from the benchmark's
``instruction_config.json`` (family = the parent folder: TC, SC, NLI, ...). A ``.jsonl`` file of
``{prompt, response}`` records is a task too (free-form targets, no label list).

* Prompt: instruction + sentence + ``Option: <labels>`` + ``Answer:``; the target is the label
  text and EOS. The loss covers the target only (prompt positions are -100). An over-long prompt
  loses its left side (the instruction first; the options and ``Answer:`` stay), counted per task,
  or is refused with ``data.tasks.truncate_prompts=false``.
* Splits: a task without ``test.json`` (yelp, IMDB, MultiRC) or without ``train.json``
  (dbpedia) is split from the file it has, by label in file order: the first
  ``data.tasks.train_fraction`` (70%) of each label train, the rest test. A ``.jsonl`` task is
  split the same way by line. ``train_per_class`` / ``eval_per_class`` then keep the first N of
  each label (the papers train on 1,000 per class); a ``.jsonl`` task counts as one class.
* Accuracy: exact match after lowercasing and stripping punctuation and whitespace (the
  benchmark's rule), either of the greedily decoded answer (``metric=generate``, the papers') or
  of the label the model scores highest as a whole answer (``metric=options``: the sum of the
  label tokens' and EOS's log-probabilities; labelled tasks only). Both are batched.
* Order: ``mixed`` trains one shuffled stream of every task's examples; ``sequential`` trains
  the tasks one after another, a phase each, and evaluates every task after each phase (the
  continual-learning protocol: the accuracy matrix, AA and BWT).
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from llm_pretrain import distributed
from llm_pretrain.config import DataConfig, TasksConfig
from llm_pretrain.data import NodeState, data_node
from llm_pretrain.model import IGNORE_INDEX
from llm_pretrain.tokenizer import BuiltinTokenizer, Tokenizer

log = logging.getLogger(__name__)
ORDERS = ("mixed", "sequential")
METRICS = ("generate", "options")
UNKNOWN_LABELS = ("error", "drop")


class TaskError(ValueError):
    """A task file, label or setting that cannot be trained on; the message says what to fix."""


# ---------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Example:
    prompt: str
    target: str


@dataclass
class Task:
    name: str
    where: str  # the folder or file, for messages
    labels: list[str] | None  # None: free-form targets (.jsonl)
    train: list[Example]
    test: list[Example]
    split: str  # how train and test came about
    dropped: int = 0  # examples whose label is not in labels.json (unknown_labels=drop)


def check_settings(cfg: TasksConfig) -> None:
    if not cfg.names:
        raise TaskError("data.tasks.names is empty: name at least one task (e.g. [dbpedia])")
    for key, value, allowed in (
        ("order", cfg.order, ORDERS),
        ("metric", cfg.metric, METRICS),
        ("unknown_labels", cfg.unknown_labels, UNKNOWN_LABELS),
    ):
        if value not in allowed:
            raise TaskError(f"data.tasks.{key}={value!r}: use one of {allowed}")
    if not 0.0 < cfg.train_fraction < 1.0:
        raise TaskError(f"data.tasks.train_fraction={cfg.train_fraction}: must be in (0, 1)")
    for key in ("train_per_class", "eval_per_class"):
        n = getattr(cfg, key)
        if n is not None and n <= 0:
            raise TaskError(f"data.tasks.{key}={n}: must be positive (or null: every example)")
    if cfg.epochs <= 0 or cfg.steps_per_task < 0:
        raise TaskError("data.tasks.epochs must be positive and data.tasks.steps_per_task >= 0")
    if cfg.steps_per_task and cfg.order != "sequential":
        raise TaskError(
            "data.tasks.steps_per_task sets each phase's length under data.tasks.order="
            "sequential; with mixed, set trainer.max_steps (or data.tasks.epochs)"
        )
    if len(set(cfg.names)) != len(cfg.names):
        raise TaskError(f"data.tasks.names={list(cfg.names)} names a task twice")


def resolve(name: str, root: Path | None) -> Path:
    """A benchmark task name (``dbpedia``, ``TC/dbpedia``), a task folder or a .jsonl file."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if root is None:
        raise TaskError(f"data.tasks.names: {name} is not a file or folder (data.tasks.root unset)")
    direct = root / name
    found = [direct] if direct.is_dir() else sorted(root.glob(f"*/{name}"))
    found = [p for p in found if p.is_dir()]
    if len(found) != 1:
        known = sorted(p.name for p in root.glob("*/*") if (p / "labels.json").is_file())
        raise TaskError(
            f"data.tasks.names: no task {name!r} under data.tasks.root={root}"
            + (f" (several match: {found})" if found else "")
            + f"; known: {', '.join(known)}"
        )
    return found[0]


def _read_json_array(path: Path) -> list:
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(records, list):
        raise TaskError(f"{path}: expected a JSON array of {{label, sentence}} records")
    return records


def _records(path: Path, fields: tuple[str, str]) -> list[tuple[str, str]]:
    """(text, label) pairs; a record without either field, or with a non-string one, is refused
    with its index."""
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TaskError(f"{path} line {n + 1}: not JSON ({e})") from e
    else:
        rows = _read_json_array(path)
    text_key, label_key = fields
    out = []
    for i, row in enumerate(rows):
        for key in fields:
            if not isinstance(row, dict) or key not in row:
                raise TaskError(
                    f"{path}: record {i} has no {key!r} field "
                    f"(fields: {sorted(row) if isinstance(row, dict) else type(row).__name__})"
                )
            if not isinstance(row[key], str):
                raise TaskError(f"{path}: record {i}'s {key!r} is not a string")
        out.append((row[text_key], row[label_key]))
    return out


def _split_by_label(
    pairs: list[tuple[str, str]], fraction: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The first ``fraction`` of each label (file order) and the rest, each in file order."""
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(pairs):
        by_label.setdefault(label, []).append(i)
    train = set()
    for idx in by_label.values():
        train.update(idx[: math.ceil(fraction * len(idx))])
    return (
        [p for i, p in enumerate(pairs) if i in train],
        [p for i, p in enumerate(pairs) if i not in train],
    )


def _first_per_label(pairs: list[tuple[str, str]], n: int | None) -> list[tuple[str, str]]:
    if n is None:
        return pairs
    seen: dict[str, int] = {}
    out = []
    for p in pairs:
        seen[p[1]] = seen.get(p[1], 0) + 1
        if seen[p[1]] <= n:
            out.append(p)
    return out


def _instruction(folder: Path) -> str:
    """The family's zero-shot instruction from the benchmark's instruction_config.json (one or
    two folders up); a family without one (COPA: its sentences ask the question) gets none."""
    for config in (
        folder.parent / "instruction_config.json",
        folder.parents[1] / "instruction_config.json",
    ):
        if config.is_file():
            try:
                table = json.loads(config.read_text())
                entries = table.get(folder.parent.name) or []
                return next(
                    (e["instruction"] for e in entries if e.get("instruction_type") == "zero-shot"),
                    "",
                )
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
                raise TaskError(f"{config}: not an instruction table ({e})") from e
    return ""


def prompt_text(instruction: str, sentence: str, labels: list[str]) -> str:
    return f"{instruction}{sentence}\nOption: {', '.join(labels)}\nAnswer:"


def load_task(path: Path, cfg: TasksConfig) -> Task:
    if path.is_file():
        return _load_jsonl(path, cfg)
    labels_file = path / "labels.json"
    if not labels_file.is_file():
        raise TaskError(
            f"{path}: no labels.json (a task folder holds train/test.json and labels.json)"
        )
    labels = _read_json_array(labels_file)
    if not labels or not all(isinstance(x, str) for x in labels):
        raise TaskError(f"{labels_file}: expected a non-empty JSON array of label strings")
    files = {s: path / f"{s}.json" for s in ("train", "test")}
    have = [s for s, f in files.items() if f.is_file()]
    if not have:
        raise TaskError(
            f"{path}: neither train.json nor test.json exists (the benchmark snapshot lacks "
            "yahoo's examples: use yelp in its place, see the data README)"
        )
    pairs = {s: _records(files[s], ("sentence", "label")) for s in have}
    known, dropped = set(labels), 0
    for s in have:
        unknown = [(i, lab) for i, (_, lab) in enumerate(pairs[s]) if lab not in known]
        if unknown and cfg.unknown_labels == "error":
            i, lab = unknown[0]
            raise TaskError(
                f"{files[s]}: record {i} has label {lab!r}, not in {labels_file} "
                f"({len(unknown)} such records); fix the file, or drop them with "
                "data.tasks.unknown_labels=drop"
            )
        dropped += len(unknown)
        pairs[s] = [p for p in pairs[s] if p[1] in known]
    if len(have) == 2:
        train, test, split = pairs["train"], pairs["test"], "train.json / test.json"
    else:
        only = have[0]
        train, test = _split_by_label(pairs[only], cfg.train_fraction)
        split = (
            f"{only}.json only: the first {cfg.train_fraction:.0%} of each label train, "
            "the rest test"
        )
    train = _first_per_label(train, cfg.train_per_class)
    test = _first_per_label(test, cfg.eval_per_class)
    instruction = _instruction(path)
    ex = [
        [Example(prompt_text(instruction, t, labels), lab) for t, lab in part]
        for part in (train, test)
    ]
    return Task(path.name, str(path), list(labels), ex[0], ex[1], split, dropped)


def _load_jsonl(path: Path, cfg: TasksConfig) -> Task:
    if path.suffix != ".jsonl":
        raise TaskError(
            f"data.tasks.names: {path} is a file but not .jsonl (prompt/response records)"
        )
    if cfg.metric == "options":
        raise TaskError(
            f"{path}: data.tasks.metric=options scores a task's labels, and a .jsonl task has "
            "none; use metric=generate"
        )
    pairs = _records(path, (cfg.prompt_field, cfg.response_field))
    cut = math.ceil(cfg.train_fraction * len(pairs))
    # no labels: the whole task is one class, so a per-class limit keeps its first N examples
    train = pairs[:cut][: cfg.train_per_class]
    test = pairs[cut:][: cfg.eval_per_class]
    split = f"the first {cfg.train_fraction:.0%} of the lines train, the rest test"
    return Task(
        path.stem,
        str(path),
        None,
        [Example(p, r) for p, r in train],
        [Example(p, r) for p, r in test],
        split,
    )


# ---------------------------------------------------------------------------------- tokens
@dataclass
class Encoded:
    prompt: list[int]  # left-truncated to fit
    target: list[int]  # the answer's ids, EOS last
    answer: str  # the target text, for exact match
    label: int | None = None  # index in the task's labels (metric=options)


@dataclass
class TaskData:
    """One task, tokenized: what training and evaluation read."""

    task: Task
    train: list[Encoded]
    test: list[Encoded]
    options: list[list[int]] | None  # each label's ids, EOS last
    max_answer: int  # tokens of the longest answer, EOS included
    truncated: dict[str, int] = field(default_factory=dict)  # split -> prompts cut


def encode_task(
    task: Task, tokenizer: Tokenizer, seq_len: int, model_vocab: int, truncate: bool
) -> TaskData:
    def enc(texts: list[str]) -> list[list[int]]:
        return tokenizer.encode_batch(texts) if texts else []

    options = [ids for ids in enc(task.labels)] if task.labels is not None else None
    answers = {
        "train": enc([e.target for e in task.train]),
        "test": enc([e.target for e in task.test]),
    }
    lengths = [len(a) for part in answers.values() for a in part] + [len(o) for o in options or []]
    max_answer = max(lengths, default=1)
    room = seq_len - max_answer  # prompt tokens a row holds beside the longest answer
    if room < 1:
        raise TaskError(
            f"task {task.name}: its longest answer is {max_answer} tokens, and data.seq_len="
            f"{seq_len} leaves no room for a prompt; raise data.seq_len"
        )
    out: dict[str, list[Encoded]] = {}
    truncated: dict[str, int] = {}
    for split, examples in (("train", task.train), ("test", task.test)):
        prompts = [ids[:-1] for ids in enc([e.prompt for e in examples])]  # (no EOS)
        cut = sum(len(p) > room for p in prompts)
        if cut and not truncate:
            i = next(i for i, p in enumerate(prompts) if len(p) > room)
            raise TaskError(
                f"task {task.name} ({split}): {cut} of {len(prompts)} prompts are longer than the "
                f"{room} tokens data.seq_len={seq_len} leaves beside a {max_answer}-token answer "
                f"(the first: example {i}, {len(prompts[i])} tokens); raise data.seq_len, or set "
                "data.tasks.truncate_prompts=true to cut their left side"
            )
        truncated[split] = cut
        index = {lab: k for k, lab in enumerate(task.labels)} if task.labels is not None else {}
        out[split] = [
            Encoded(p[-room:], a, e.target, index.get(e.target))
            for p, a, e in zip(prompts, answers[split], examples, strict=True)
        ]
        top = max((max(e.prompt + e.target) for e in out[split]), default=0)
        if top >= model_vocab:
            raise TaskError(
                f"task {task.name}: token id {top} >= model.vocab_size={model_vocab}; the "
                "tokenizer is larger than the model's embedding table: use the model's own "
                "tokenizer (or a model with model.vocab_size >= the tokenizer's)"
            )
    if not out["train"] or not out["test"]:
        raise TaskError(
            f"task {task.name} ({task.where}): {len(out['train'])} training and "
            f"{len(out['test'])} test examples after the split ({task.split}); it needs both"
        )
    return TaskData(task, out["train"], out["test"], options, max_answer, truncated)


def load(cfg: DataConfig, tokenizer: Tokenizer, model_vocab: int) -> list[TaskData]:
    """Every task of ``data.tasks.names``, read, checked and tokenized, in order."""
    tc = cfg.tasks
    check_settings(tc)
    if isinstance(tokenizer, BuiltinTokenizer):
        raise TaskError(
            "data=tasks is English text: data.tokenizer=builtin only knows the built-in "
            "language; use a real tokenizer (e.g. the T5 spiece.model, or the model's own)"
        )
    if tokenizer.vocab_size > model_vocab:
        raise TaskError(
            f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={model_vocab}: "
            "its larger ids have no embedding; use the model's own tokenizer"
        )
    if model_vocab > tokenizer.vocab_size:  # (a padded embedding table: harmless)
        log.info(
            f"model.vocab_size={model_vocab} exceeds the tokenizer's {tokenizer.vocab_size} ids: "
            "the extra rows are never read, and decoding never picks them"
        )
    if cfg.layout != "paper":
        raise TaskError(
            f"data.layout={cfg.layout}: task examples are one per row (data.layout=paper), "
            "never packed across examples"
        )
    root = Path(tc.root).expanduser() if tc.root else None
    out = []
    for name in tc.names:
        task = load_task(resolve(name, root), tc)
        out.append(encode_task(task, tokenizer, cfg.seq_len, model_vocab, tc.truncate_prompts))
        if task.dropped:
            log.warning(
                f"task {task.name}: {task.dropped} examples with a label not in labels.json dropped"
            )
        cut = out[-1].truncated
        if any(cut.values()):
            log.warning(
                f"task {task.name}: prompts cut on the left to fit data.seq_len={cfg.seq_len}: "
                f"{cut['train']} of {len(out[-1].train)} training, {cut['test']} of "
                f"{len(out[-1].test)} test"
            )
    return out


# ---------------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Phase:
    tasks: tuple[int, ...]  # indices into data.tasks.names
    start: int  # first step
    end: int  # the step count when it is done


def plan(
    tasks: list[TaskData], cfg: TasksConfig, global_batch: int, max_steps: int | None
) -> list[Phase]:
    """The phases and their step ranges: one of every task (mixed), or one per task
    (sequential: each ``steps_per_task`` long, or ``epochs`` passes over its examples)."""

    def epoch_steps(n: int) -> int:
        return max(1, math.ceil(cfg.epochs * n / global_batch))

    if cfg.order == "mixed":
        total = max_steps or epoch_steps(sum(len(t.train) for t in tasks))
        return [Phase(tuple(range(len(tasks))), 0, total)]
    phases, start = [], 0
    for i, t in enumerate(tasks):
        n = cfg.steps_per_task or epoch_steps(len(t.train))
        phases.append(Phase((i,), start, start + n))
        start += n
    if max_steps is not None and max_steps != start:
        raise TaskError(
            f"trainer.max_steps={max_steps}, but data.tasks.order=sequential's phases take "
            f"{start} steps ({', '.join(str(p.end - p.start) for p in phases)}); set "
            "trainer.max_steps=null (the phases decide) or change data.tasks.steps_per_task"
        )
    return phases


def phase_at(phases: list[Phase], step: int) -> int:
    """The phase that trains step ``step`` (the last one once training is over)."""
    return next((i for i, p in enumerate(phases) if step < p.end), len(phases) - 1)


# ---------------------------------------------------------------------------------- rows
class TaskRows(IterableDataset):
    """One row per example: prompt then answer, right-padded; labels only on the answer.

    Each epoch is a seeded permutation of the examples, handed to the data nodes by position
    (example ``base + node + k * nodes`` of it), so a checkpoint resumes on any number of ranks
    (``data.resplit``)."""

    resplittable = True

    def __init__(
        self,
        examples: list[Encoded],
        seq_len: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.examples, self.seq_len, self.pad_id, self.seed = examples, seq_len, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.state = NodeState()

    def state_dict(self) -> dict:
        s = self.state
        return {"epoch": s.epoch, "docs": s.docs, "carry": [], "base": s.base}

    def load_state_dict(self, state: dict) -> None:
        self.state = NodeState(state["epoch"], state["docs"], [], state.get("base", 0))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        node, num_nodes = data_node(self.rank, self.world_size)
        st, n = self.state, len(self.examples)
        if n < num_nodes:
            raise TaskError(
                f"{n} training examples for {num_nodes} data nodes (ranks x data.num_workers): "
                "every node needs one; use more examples or fewer nodes"
            )
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + st.epoch))
            i = st.base + node + st.docs * num_nodes
            while i < n:
                st.docs += 1  # (current at the yield: a snapshot resumes after this row)
                yield self.row(self.examples[int(order[i])])
                i += num_nodes
            st.epoch, st.docs, st.base = st.epoch + 1, 0, 0

    def row(self, e: Encoded) -> dict[str, torch.Tensor]:
        ids = e.prompt + e.target
        pad = self.seq_len - len(ids)
        labels = [IGNORE_INDEX] * len(e.prompt) + e.target + [IGNORE_INDEX] * pad
        return {
            "input_ids": torch.tensor(ids + [self.pad_id] * pad, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "tokens": torch.tensor(len(ids)),  # prompt and answer: the row's non-pad inputs
        }


def train_loader(
    tasks: list[TaskData],
    phase: Phase,
    cfg: DataConfig,
    tokenizer: Tokenizer,
    micro_batch: int,
    rank: int,
    world_size: int,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    examples = [e for i in phase.tasks for e in tasks[i].train]
    # (each phase its own seed: a task's order does not depend on where it sits in the sequence)
    seed = cfg.seed + 1000 * phase.tasks[0]
    rows = TaskRows(examples, cfg.seq_len, tokenizer.pad_id, seed, rank, world_size)
    return StatefulDataLoader(
        rows,
        batch_size=micro_batch,
        num_workers=cfg.num_workers,
        persistent_workers=False,
        in_order=True,
        pin_memory=pin_memory,
    )


def validation_rows(
    tasks: list[TaskData], seq_len: int, pad_id: int, token_budget: int
) -> dict[str, torch.Tensor]:
    """Every task's test examples as rows (answer-only loss), in turn by task, until
    ``token_budget`` answer tokens: ``eval/loss`` is the answers' loss."""
    rows = TaskRows([], seq_len, pad_id, 0)
    inputs, labels, tokens = [], [], 0
    for i in range(max(len(t.test) for t in tasks)):
        for t in tasks:
            if i < len(t.test) and tokens < token_budget:
                r = rows.row(t.test[i])
                inputs.append(r["input_ids"])
                labels.append(r["labels"])
                tokens += len(t.test[i].target)
    return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels)}


# ---------------------------------------------------------------------------------- accuracy
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """The benchmark's exact-match form: lowercase, no punctuation, single spaces."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _batches(n_local: int, n_lockstep: int, size: int) -> Iterator[tuple[int, int] | None]:
    """Batch bounds over this rank's items; ``None`` for a batch it runs uncounted (so every
    rank runs as many forwards, which FSDP2 needs)."""
    for lo in range(0, max(n_local, n_lockstep), size):
        yield (lo, min(lo + size, n_local)) if lo < n_local else None


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    data: TaskData,
    metric: str,
    tokenizer: Tokenizer,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    autocast: torch.autocast | None = None,
    lockstep: bool = False,
) -> float:
    """Exact-match accuracy on the task's test examples, over all ranks."""
    was_training = model.training
    model.eval()
    mine = data.test[rank::world_size]
    most = -(-len(data.test) // world_size) if lockstep else len(mine)
    ctx = autocast if autocast is not None else nullcontext()
    correct = 0
    if metric == "generate":
        for bounds in _batches(len(mine), most, batch_size):
            batch = mine[bounds[0] : bounds[1]] if bounds else data.test[:1]
            with ctx:
                answers = _greedy(
                    model,
                    [e.prompt for e in batch],
                    data.max_answer,
                    tokenizer,
                    device,
                    not lockstep,
                )
            if bounds:
                correct += sum(
                    normalize(tokenizer.decode(a)) == normalize(e.answer)
                    for a, e in zip(answers, batch, strict=True)
                )
    else:
        k = len(data.options)
        per = max(1, batch_size // k)  # examples per forward (k rows each)
        for bounds in _batches(len(mine), most, per):
            batch = mine[bounds[0] : bounds[1]] if bounds else data.test[:1]
            with ctx:
                scores = _option_scores(model, [e.prompt for e in batch], data.options, device)
            if bounds:
                correct += sum(
                    int(s.argmax()) == e.label for s, e in zip(scores, batch, strict=True)
                )
    model.train(was_training)
    counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
    total = distributed.all_reduce(counts).cpu()
    return float(total[0] / total[1])


def _greedy(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new: int,
    tokenizer: Tokenizer,
    device: torch.device,
    stop_early: bool,
) -> list[list[int]]:
    """Greedy answers (up to EOS or ``max_new`` tokens) of right-padded prompts, without a KV
    cache: a row's pads come after its last token, so causal attention never sees them; each
    step reads each row's logits at its own last position. Ids the tokenizer does not have (a
    model vocabulary larger than the tokenizer's) are never chosen."""
    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max()) + max_new - 1
    x = torch.full((len(prompts), width), tokenizer.pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p)
    x = x.to(device)
    rows = torch.arange(len(prompts))
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for k in range(max_new):
        at = lens + k - 1
        logits = model(x[:, : int(at.max()) + 1], logits_at=at.to(device)).float()
        logits[:, tokenizer.vocab_size :] = float("-inf")
        nxt = logits.argmax(-1).cpu()
        for i in rows[~done].tolist():
            if int(nxt[i]) == tokenizer.eos_id:
                done[i] = True
            else:
                out[i].append(int(nxt[i]))
        if k + 1 < max_new:
            x[rows, lens + k] = nxt.to(device)
        if stop_early and bool(done.all()):
            break
    return out


def _option_scores(
    model: torch.nn.Module, prompts: list[list[int]], options: list[list[int]], device: torch.device
) -> torch.Tensor:
    """(examples, labels) log-probability of each label (its tokens and EOS) as the answer; the
    head runs only at the positions that predict a label token (``logits_at``), not at every
    position of the (prompt + label) rows."""
    rows = [(p, o) for p in prompts for o in options]
    width = max(len(p) + len(o) for p, o in rows)
    n = max(len(o) for o in options)
    x = torch.zeros((len(rows), width), dtype=torch.long)
    at = torch.zeros((len(rows), n), dtype=torch.long)  # position predicting the j-th token
    target = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, (p, o) in enumerate(rows):
        x[i, : len(p) + len(o)] = torch.tensor(p + o)
        k = len(o)
        at[i, :k] = torch.arange(len(p) - 1, len(p) - 1 + k)
        at[i, k:] = len(p) - 1  # (padding: read a real position, masked out below)
        target[i, :k] = torch.tensor(o)
        mask[i, :k] = True
    logits = model(x.to(device), logits_at=at.to(device)).double().cpu()  # (rows, n, V)
    logp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
    return (logp * mask).sum(1).view(len(prompts), len(options))
