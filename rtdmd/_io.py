"""Small I/O pieces with no project imports: the trainer's one atomic text write (configs, summaries,
checkpoint state) and a stable content hash (cache keys)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """A temporary file in the same folder, flushed and fsynced, then renamed over the target: a crash leaves the
    old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stable_hash(obj: Any) -> str:
    """Stable 16-hex-char id (sha256 of canonical JSON) of a dataclass (a config section) or dict, to key caches
    such as the toy base network by the config that made it."""

    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"stable_hash: cannot hash {type(o).__name__}")

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
