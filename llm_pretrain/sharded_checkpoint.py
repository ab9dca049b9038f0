"""Checkpoints of FSDP2 runs through ``torch.distributed.checkpoint`` (DCP), resumable on any
number of ranks and under either parallelism.

One directory per save, ``checkpoints/step_<N>/``:

* DCP's files: the model's state dict (each rank writes its shards) and every tensor of the
  optimizer's state dict, flattened under ``optim.<path>`` (each rank writes the state of the
  matrices it owns; replicated tensors are written once);
* ``meta.pt``, written by rank 0 with ``torch.save`` and read with ``weights_only=True``: step
  counters, the scheduler, every rank's data position and RNG states, the fingerprint and the
  optimizer state dict's *skeleton* (its structure and numbers, each tensor replaced by its DCP
  key), merged over the ranks.

A save goes to ``.step_<N>.tmp/`` and is renamed when complete. Loading never unpickles code:
``meta.pt`` is read with ``weights_only=True``, DCP's tensor files are too, and DCP's pickled
``.metadata`` goes through an unpickler that admits only DCP's own metadata classes.

Resharding: DCP places each saved tensor's rows on whichever ranks hold them now, and a rank
loads only the optimizer state of the matrices it owns now. Under DDP (or one process) the same
directory loads whole tensors, and an FSDP2 run loads a DDP run's single-file checkpoint whole
and keeps its share.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from llm_pretrain import checkpoint, distributed
from llm_pretrain.checkpoint import SHARDED_META, CheckpointError

FORMAT = "llm_pretrain.dcp/1"
META = SHARDED_META
MARK = "__dcp_tensor__"


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


# ---------------------------------------------------------------------- optimizer state
def flatten(obj: Any, prefix: str = "optim") -> tuple[Any, dict[str, torch.Tensor]]:
    """(skeleton, tensors): ``obj`` with every tensor replaced by ``{MARK: key}``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            key = "/".join(path)
            tensors[key] = o
            return {MARK: key}
        if isinstance(o, dict):
            return {k: walk(v, [*path, str(k)]) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return type(o)(walk(v, [*path, str(i)]) for i, v in enumerate(o))
        return o

    return walk(obj, [prefix]), tensors


def _is_mark(o: Any) -> bool:
    return isinstance(o, dict) and set(o) == {MARK}


def _map_marks(skeleton: Any, fn) -> Any:
    """``skeleton`` with every ``{MARK: key}`` replaced by ``fn(key)``."""
    if _is_mark(skeleton):
        return fn(skeleton[MARK])
    if isinstance(skeleton, dict):
        return {k: _map_marks(v, fn) for k, v in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        return type(skeleton)(_map_marks(v, fn) for v in skeleton)
    return skeleton


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    return _map_marks(skeleton, tensors.__getitem__)


def tensor_keys(skeleton: Any) -> list[str]:
    keys: list[str] = []
    _map_marks(skeleton, keys.append)
    return keys


def merge(skeletons: list[Any]) -> Any:
    """One skeleton from every rank's: dicts are united (each rank's ``state`` holds the matrices
    it owns), anything else is rank 0's (the same everywhere)."""
    first = skeletons[0]
    if isinstance(first, dict) and not _is_mark(first):
        keys = list(dict.fromkeys(k for s in skeletons for k in s))
        return {k: merge([s[k] for s in skeletons if k in s]) for k in keys}
    return first


# ---------------------------------------------------------------------- safe DCP metadata
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: admit DCP's metadata classes, torch sizes, dtypes,
    layouts and memory formats, and nothing else."""

    def find_class(self, module: str, name: str):
        value = None
        if module == _DCP_METADATA or (module, name) in _ALLOWED:
            value = super().find_class(module, name)
        elif module == "torch":
            candidate = getattr(torch, name, None)
            if isinstance(candidate, torch.dtype | torch.layout | torch.memory_format):
                value = candidate
        if value is None:
            raise CheckpointError(
                f"the checkpoint's DCP metadata refers to {module}.{name}, which a checkpoint "
                "never holds: the file was not written by torch.distributed.checkpoint (or was "
                "tampered with); it is not loaded"
            )
        return value


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable metadata is a corrupt checkpoint
            raise CheckpointError(
                f"{self.path}: DCP metadata is corrupt or truncated ({type(e).__name__}: {e}); "
                "delete the checkpoint or resume from an earlier one"
            ) from e
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------- save and load
@contextmanager
def _one_process_quiet():
    """DCP warns that it assumes one process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(path: Path, model: nn.Module, optimizer, meta: dict[str, Any]) -> Path:
    """Every rank calls this; rank 0 writes ``meta.pt`` and renames the finished directory."""
    main = distributed.launched_rank() == 0
    tmp = path.with_name(f".{path.name}.tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    skeleton, tensors = flatten(optimizer.state_dict())
    merged = merge(distributed.gather_objects(skeleton))
    with _one_process_quiet():
        dcp.save(
            {"model": model.state_dict(), "optim": tensors},
            storage_writer=dcp.FileSystemWriter(tmp),
            no_dist=not distributed.active(),
        )
    if main:
        with open(tmp / META, "wb") as f:
            torch.save({"format": FORMAT, **meta, "optimizer": merged}, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    distributed.barrier()
    return path


def load_meta(path: Path, keys: tuple[str, ...] = checkpoint.RESUME_KEYS) -> dict[str, Any]:
    meta = checkpoint.read(path / META, "checkpoint metadata")
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != FORMAT:
        raise CheckpointError(
            f"{path} is not a sharded llm_pretrain checkpoint (format {found!r}, expected "
            f"{FORMAT!r})"
        )
    return checkpoint.require(meta, keys, path)


def load_into(path: Path, meta: dict[str, Any], model: nn.Module, optimizer) -> None:
    """Load the model (resharded to this run's placement) and this rank's optimizer state."""
    reader = SafeReader(path)
    saved = reader.read_metadata().state_dict_metadata
    model_sd = model.state_dict()
    have = {k[len("model.") :] for k in saved if k.startswith("model.")}
    if have != set(model_sd):
        missing, extra = sorted(set(model_sd) - have), sorted(have - set(model_sd))
        raise CheckpointError(
            f"checkpoint {path} holds another model: missing {missing[:5]}, unexpected "
            f"{extra[:5]}; resume with the model it was written with"
        )
    skeleton = meta["optimizer"]
    if hasattr(optimizer, "narrow_state_dict"):  # FSDP2: the matrices this rank owns
        skeleton = optimizer.narrow_state_dict(skeleton)
    templates = {}
    for key in tensor_keys(skeleton):
        if not hasattr(saved.get(f"optim.{key}"), "size"):
            raise CheckpointError(
                f"checkpoint {path}: the optimizer state names {key}, which its DCP files do "
                "not hold as a tensor; the checkpoint is incomplete"
            )
        templates[key] = _empty_like_saved(saved[f"optim.{key}"])
    _load(path, reader, {"model": model_sd, "optim": templates})
    model.load_state_dict(model_sd)
    optimizer.load_state_dict(unflatten(skeleton, templates))


def _empty_like_saved(info) -> torch.Tensor:
    """A whole tensor to load a saved one into (CPU; DCP reads every chunk of it)."""
    return torch.empty(info.size, dtype=info.properties.dtype)


def _load(path: Path, reader: SafeReader, state: dict) -> None:
    """``dcp.load`` into ``state``, a missing or truncated shard file being a CheckpointError."""
    try:
        with _one_process_quiet():
            dcp.load(state, storage_reader=reader, no_dist=not distributed.active())
    except CheckpointError:
        raise
    # (DCP's CheckpointException derives from BaseException)
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - a bad shard, any rank
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint {path}: its DCP files are corrupt or incomplete ({type(e).__name__}: "
            f"{first}); delete it or resume from an earlier one"
        ) from e


def load_whole_model(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A whole (DDP, single-file) state dict into a possibly FSDP2-sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------- consolidated export
def consolidate_model(path: Path) -> dict[str, torch.Tensor]:
    """The model's whole state dict from a sharded checkpoint, in one process (for inference:
    ``Llama.load_state_dict``)."""
    reader = SafeReader(path)
    saved = reader.read_metadata().state_dict_metadata
    model = {
        k[len("model.") :]: _empty_like_saved(v) for k, v in saved.items() if k.startswith("model.")
    }
    _load(path, reader, {"model": model})
    return model


USAGE = """python -m llm_pretrain.sharded_checkpoint export CHECKPOINT_DIR OUT.pt

Writes the model of a sharded (DCP) checkpoint as one file, {"model": state dict}, readable with
torch.load(OUT, weights_only=True) and loadable by llm_pretrain.model.Llama.load_state_dict.
"""


def main(argv: list[str] | None = None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "export":
        raise SystemExit(USAGE)
    source, out = Path(args[1]), Path(args[2])
    if not is_sharded_checkpoint(source):
        raise SystemExit(f"{source}: not a sharded checkpoint directory (no {META})\n\n{USAGE}")
    load_meta(source, keys=())  # refuses another format before anything is read
    model = consolidate_model(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"model": model}, tmp)
    os.replace(tmp, out)
    print(f"wrote {out}: {len(model)} tensors, {sum(t.numel() for t in model.values()):,} values")


if __name__ == "__main__":
    main()
