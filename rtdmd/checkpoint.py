"""Crash-safe checkpoints of a run folder (docs/training.md §1, docs/training.md §3.3).

Layout of one checkpoint directory ``<run>/checkpoints/stage1-step-N/`` or ``stage2-epoch-N/``:

- ``<module>.safetensors``: a module state dict (``generator``, ``generator_ema``, ``fake_score``, ...);
- ``<optimizer>.optim.safetensors``: an optimizer ``state_dict()``; per-parameter tensors are stored as
  ``state.<param_id>.<key>``, everything else (scalars, ``param_groups``) as JSON in the file's metadata;
- ``state.json``: step counters, config hash, RNG state (:func:`rng_state`) and anything JSON-able;
- ``manifest.json``, written last: the size and sha256 of every other file.

Weights are never pickled, and never saved when any is non-finite. Every file is written under a temporary name
and renamed; the directory itself is built as ``<name>.tmp-<pid>`` and renamed at the end, so a crash never leaves
something that :func:`list_checkpoints` takes for a checkpoint. :func:`load_checkpoint` verifies the manifest,
the files and the tensors' finiteness, and :func:`load_latest` falls back to the newest checkpoint that verifies
(docs/training.md §3.2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "checkpoint_name",
    "clean_temporaries",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "load_safetensors",
    "prune_checkpoints",
    "rng_state",
    "save_checkpoint",
    "save_safetensors",
    "set_rng_state",
]

STATE_FILE = "state.json"
MANIFEST = "manifest.json"
OPTIM_SUFFIX = ".optim.safetensors"
_OPTIM_META_KEY = "rtdmd.optimizer"
_NAME_RE = re.compile(r"^(?:stage1-step-(\d+)|stage2-epoch-(\d+))$")
_PART_RE = re.compile(r"^[A-Za-z0-9_\-]+$")  # module/optimizer names: no dots, so suffixes cannot collide


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: a file missing, truncated or changed since it was written, unreadable
    state, or non-finite tensors (also raised instead of saving non-finite tensors)."""


# ----------------------------------------------------------------------------- atomic primitives


def _tmp_name(path: Path, tag: str = "") -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}{tag}")


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; directories cannot be opened for fsync outside POSIX.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _prepare_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no storage (safetensors refuses views and shared tensors)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: keys must be str, got {type(name).__name__}")
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        if not t.is_contiguous():
            t = t.contiguous()
        storage = t.untyped_storage()
        # Tied weights share a storage; slices cover only part of theirs: both need their own copy.
        if t.nbytes and (storage.data_ptr() in seen or storage.nbytes() != t.nbytes):
            t = t.clone()
        if t.nbytes:
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_safetensors(
    tensors: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` to a safetensors file atomically (temp file in the same directory + ``os.replace``).

    Tensors are moved to CPU, made contiguous and un-shared (tied weights are stored twice); dtypes
    (bf16 included) are kept. ``metadata`` values must be strings (safetensors' header format).
    """
    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata: expected a dict[str, str]")
    prepared = _prepare_tensors(tensors)
    tmp = _tmp_name(path)
    try:
        save_file(prepared, str(tmp), metadata=dict(metadata) if metadata is not None else None)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_with_metadata(path: Path, device: str | torch.device) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    with safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_safetensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file into a dict of tensors on ``device``."""
    return _load_with_metadata(Path(path), device)[0]


# ----------------------------------------------------------------------------- optimizer state


def _encode(obj: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able form of ``obj``; tensors go to ``tensors[name]`` and tuples are tagged (AdamW's betas)."""
    if isinstance(obj, Tensor):
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"optimizer state {name}: dict keys must be str")
        return {k: _encode(v, f"{name}.{k}", tensors) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"optimizer state {name}: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _save_optimizer(state_dict: Mapping[str, Any], path: Path) -> None:
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"optimizer state for {path.name}: expected an optimizer.state_dict()")
    tensors: dict[str, Tensor] = {}
    # A list of [param_id, state] pairs keeps int param ids ints (JSON object keys would become str).
    per_param = [[pid, _encode(dict(st), f"state.{pid}", tensors)] for pid, st in state_dict["state"].items()]
    groups = _encode(list(state_dict["param_groups"]), "param_groups", tensors)
    extra = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    meta = {"state": per_param, "param_groups": groups, "extra": _encode(extra, "extra", tensors)}
    save_safetensors(tensors, path, {_OPTIM_META_KEY: json.dumps(meta)})


def _load_optimizer(path: Path, device: str | torch.device) -> dict[str, Any]:
    tensors, metadata = _load_with_metadata(path, device)
    if _OPTIM_META_KEY not in metadata:
        raise ValueError(f"{path}: not an optimizer checkpoint (no {_OPTIM_META_KEY!r} metadata)")
    meta = json.loads(metadata[_OPTIM_META_KEY])
    out: dict[str, Any] = {
        "state": {pid: _decode(st, tensors) for pid, st in meta["state"]},
        "param_groups": _decode(meta["param_groups"], tensors),
    }
    out.update(_decode(meta["extra"], tensors))
    return out


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """JSON-able RNG state: torch CPU, CUDA (all devices, only if CUDA is initialized), numpy global, ``random``."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    # Querying CUDA RNG would initialize CUDA in a process that never used it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore an RNG state from :func:`rng_state` (after a JSON round trip)."""
    missing = {"torch", "numpy", "python"} - set(state)
    if missing:
        raise ValueError(f"state: RNG state lacks {sorted(missing)}")
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        n = torch.cuda.device_count()
        if len(saved) != n:
            logger.warning(
                "CUDA RNG state saved for %d devices, restoring the first %d", len(saved), min(len(saved), n)
            )
        for i, s in enumerate(saved[:n]):
            torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), i)


# ----------------------------------------------------------------------------- integrity


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _tensors(tree: Any, prefix: str) -> Iterable[tuple[str, Tensor]]:
    """Every tensor in a state dict or optimizer state, with a dotted name."""
    if isinstance(tree, Tensor):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}.{i}")


def non_finite(trees: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``trees`` (name -> state dict) that hold a NaN or an inf, with
    their count of such values. One host sync per tensor: call it where the caller syncs anyway (a save)."""
    bad = []
    for name, tree in trees.items():
        for key, t in _tensors(tree, name):
            if t.is_floating_point() and t.numel():
                n = int((~torch.isfinite(t.detach())).sum())
                if n:
                    bad.append(f"{key} ({n} of {t.numel()})")
    return bad


# ----------------------------------------------------------------------------- checkpoint directories


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``optimizers[name]`` is ready for ``optimizer.load_state_dict``."""

    path: Path
    modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def _check_part_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _PART_RE.match(name):
        raise ValueError(f"{kind}: name {name!r} must match {_PART_RE.pattern}")


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    modules: Mapping[str, Mapping[str, Tensor]] | None = None,
    optimizers: Mapping[str, Mapping[str, Any]] | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically and return ``path``.

    The directory is built as ``<path>.tmp-<pid>`` (``state.json`` last) and renamed into place. An existing
    ``path`` is renamed away, the new one renamed in, then the old one deleted; if the final rename fails
    the old checkpoint is put back.
    """
    path = Path(path)
    modules = modules or {}
    optimizers = optimizers or {}
    for name in modules:
        _check_part_name("modules", name)
    for name in optimizers:
        _check_part_name("optimizers", name)
    try:
        state_text = json.dumps(dict(state or {}), indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"state: must be JSON-able and finite ({e})") from e
    bad = non_finite({**modules, **{f"{k}.optim": v for k, v in optimizers.items()}})
    if bad:
        raise CheckpointError(f"refusing to save {path.name}: non-finite values in {', '.join(bad[:3])}"
                              + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    if tmp.exists():  # left by an earlier crashed process that had our pid
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for name, sd in modules.items():
            save_safetensors(sd, tmp / f"{name}.safetensors")
        for name, sd in optimizers.items():
            _save_optimizer(sd, tmp / f"{name}{OPTIM_SUFFIX}")
        atomic_write_text(tmp / STATE_FILE, state_text)
        files = sorted(f for f in tmp.iterdir() if f.is_file())
        manifest = {"files": {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))  # last
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    old = None
    if path.exists():
        old = _tmp_name(path, "-old")  # ".tmp-" in the name: never listed as a checkpoint
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)
    logger.info("saved checkpoint %s", path)
    return path


def verify_files(path: Path) -> None:
    """Check every file of checkpoint ``path`` against its manifest (size, sha256); ``CheckpointError`` says what
    differs. A checkpoint written before manifests existed has none: it is checked when loaded, not here."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        expected = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path.name}: unreadable {MANIFEST} ({type(e).__name__})") from None
    for name, (size, digest) in expected.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path.name}: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path.name}: {name} has {f.stat().st_size} bytes, {size} were written")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path.name}: {name} changed since it was written (sha256 mismatch)")
    extra = {f.name for f in path.glob("*.safetensors")} - set(expected)
    if extra:
        raise CheckpointError(f"{path.name}: {', '.join(sorted(extra))} not in its {MANIFEST}")


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
                    require: Iterable[str] = ()) -> Checkpoint:
    """Load and verify a directory written by :func:`save_checkpoint`; tensors go to ``device``.

    Raises ``FileNotFoundError`` naming ``path`` if it is missing or incomplete (no ``state.json``), and
    :class:`CheckpointError` if a file differs from its manifest, cannot be read, a ``require``-d state key is
    missing, or a tensor is non-finite.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"incomplete checkpoint at {path}: no {STATE_FILE}")
    verify_files(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: unreadable {STATE_FILE} ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name}: {STATE_FILE} is not a mapping")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"{path.name}: {STATE_FILE} lacks {', '.join(missing)}")
    ckpt = Checkpoint(path=path, state=state)
    for f in sorted(path.glob("*.safetensors")):
        try:
            if f.name.endswith(OPTIM_SUFFIX):
                ckpt.optimizers[f.name[: -len(OPTIM_SUFFIX)]] = _load_optimizer(f, device)
            else:
                ckpt.modules[f.name[: -len(".safetensors")]] = load_safetensors(f, device)
        except Exception as e:  # safetensors raises its own types for a truncated or garbled file
            raise CheckpointError(f"{path.name}: cannot read {f.name} ({type(e).__name__})") from None
    bad = non_finite({**ckpt.modules, **{f"{k}.optim": v for k, v in ckpt.optimizers.items()}})
    if bad:
        raise CheckpointError(f"{path.name}: non-finite values in {', '.join(bad[:3])}")
    return ckpt


def load_latest(run_dir: str | os.PathLike[str], stage: int | None = None, device: str | torch.device = "cpu",
                *, require: Iterable[str] = (), modules: Iterable[str] = (),
                on_skip=None) -> Checkpoint | None:
    """The newest checkpoint (of ``stage`` if given) that verifies and has the ``modules`` and ``require``-d state
    keys, loaded; ``None`` when there is no checkpoint. Each one skipped is reported as ``on_skip(path, reason)``
    (default: a warning); when there are checkpoints but none verifies, :class:`CheckpointError` lists them."""
    skipped = []
    for _, path in reversed(_complete(Path(run_dir))):
        if stage is not None and _parse_name(path.name)[0] != stage:
            continue
        try:
            c = load_checkpoint(path, device, require=require)
            absent = [m for m in modules if m not in c.modules]
            if absent:
                raise CheckpointError(f"{path.name}: no {', '.join(absent)} weights")
            return c
        except CheckpointError as e:
            skipped.append(str(e))
            if on_skip is not None:
                on_skip(path, str(e))
            else:
                logger.warning("skipping checkpoint %s", e)
    if skipped:
        raise CheckpointError(f"no {'stage-' + str(stage) + ' ' if stage else ''}checkpoint in "
                              f"{Path(run_dir) / 'checkpoints'} verifies: {'; '.join(skipped)}")
    return None


def clean_temporaries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete what a crashed writer left behind: ``checkpoints/*.tmp-*`` folders and files and the run folder's
    ``.*.tmp`` files. Only the holder of the run's lock may call it (no other writer can be mid-write)."""
    run_dir = Path(run_dir)
    found = list((run_dir / "checkpoints").glob("*.tmp-*")) if (run_dir / "checkpoints").is_dir() else []
    found += [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted write", p)
    return found


def checkpoint_name(stage: int, index: int) -> str:
    """``stage1-step-N`` for stage 1 (AC-DMD steps), ``stage2-epoch-N`` for stage 2 (RTDMD epochs)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index: expected an int >= 0, got {index!r}")
    if stage == 1:
        return f"stage1-step-{index}"
    if stage == 2:
        return f"stage2-epoch-{index}"
    raise ValueError(f"stage: expected 1 or 2, got {stage!r}")


def _parse_name(name: str) -> tuple[int, int] | None:
    m = _NAME_RE.match(name)
    if m is None:
        return None
    return (1, int(m.group(1))) if m.group(1) is not None else (2, int(m.group(2)))


def _complete(run_dir: Path) -> list[tuple[tuple[int, int], Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        key = _parse_name(p.name)  # "*.tmp-*" never matches the anchored pattern
        if key is not None and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((key, p))
    return sorted(found)


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``run_dir/checkpoints``, oldest to newest by (stage, index)."""
    return [p for _, p in _complete(Path(run_dir))]


def latest_checkpoint(run_dir: str | os.PathLike[str], stage: int | None = None) -> Path | None:
    """The newest complete checkpoint (of ``stage`` if given), or ``None``."""
    found = [p for (s, _), p in _complete(Path(run_dir)) if stage is None or s == stage]
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints of each stage; return the deleted paths."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
    found = _complete(Path(run_dir))
    deleted = []
    for stage in (1, 2):
        paths = [p for (s, _), p in found if s == stage]
        for p in paths[:-keep]:
            # Rename first so a crash during rmtree cannot leave a listed directory missing weights.
            doomed = _tmp_name(p, "-del")
            os.replace(p, doomed)
            shutil.rmtree(doomed)
            deleted.append(p)
            logger.info("pruned checkpoint %s", p)
    return deleted
