"""The run folder of docs/training.md §1: resolved config, metrics log, checkpoints, summary.

::

    <run>/config.yaml        the resolved config (what --resume and rtdmd.sample read back)
    <run>/metrics.jsonl      one JSON object per logged step, always with "stage" and "step"
    <run>/checkpoints/       stage1-step-N/, stage2-epoch-N/ (rtdmd.checkpoint)
    <run>/summary.json       evaluation rows and stage wall times
    <run>/samples.png        (toy) the picture of the evaluation rows
    <run>/run.lock           held by the one process writing the run (docs/training.md §3.3)
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from ._io import atomic_write_text
from .checkpoint import clean_temporaries, latest_checkpoint
from .config import Config, ConfigError, config_to_dict, load_config, save_config

log = logging.getLogger(__name__)
LOCK_FILE = "run.lock"


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null rather than emit a file other tools cannot parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunFolder:
    """A run folder. Under torchrun every rank holds one, but only rank 0's writes (``writer``)."""

    def __init__(self, path: str | Path, *, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.created = False  # made by this process (create): removed again if the run fails before any work
        self._sinks: list = []  # TensorBoard / W&B beside metrics.jsonl (open_sinks)
        self.made_with: list[Path] = []  # the checkpoints it was made with (a copied stage 1)
        self._lock_fd: int | None = None

    @classmethod
    def create(cls, out: str | Path | None, cfg: Config) -> RunFolder:
        """A new run folder (``runs/<preset>-<YYYYmmdd-HHMMSS>/`` without ``out``), locked, with ``config.yaml``
        written. A folder that holds a run, or checkpoints without a run config, is refused."""
        path = Path(out) if out is not None else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path}: exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {path}: cannot create it ({e.strerror})") from None
        run = cls(path)
        run.lock("--out")
        if run.config_path.exists():
            run.unlock()
            raise ConfigError(f"--out {path}: already holds a run (use --resume {path} to continue it)")
        if (path / "checkpoints").exists():
            run.unlock()
            raise ConfigError(f"--out {path}: holds checkpoints but no config.yaml (not a run folder of "
                              "rtdmd.train); choose another --out")
        save_config(cfg, run.config_path)
        run.created = True
        return run

    def lock(self, flag: str = "--resume") -> None:
        """Become the run's one writer for this process's life: an exclusive ``flock`` on ``run.lock`` (the
        kernel drops it when the process dies, so a stale lock file from a crash is simply taken over); then
        clear what an interrupted writer left (temporary files) and a torn last line of ``metrics.jsonl``.
        Another live writer is a ``ConfigError`` naming its pid. A no-op for non-writers (torchrun ranks > 0)."""
        if not self.writer or self._lock_fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks to take
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split() or ["?"]
            os.close(fd)
            raise ConfigError(f"{flag} {self.path}: the run is being written by process {holder[0]}"
                              f"{' on ' + holder[1] if len(holder) > 1 else ''}; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd
        clean_temporaries(self.path)
        self._repair_metrics()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _repair_metrics(self) -> None:
        """Drop a torn last line of ``metrics.jsonl`` (a crash mid-append) so that new lines start clean."""
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return
        data = p.read_bytes()
        keep = data.rfind(b"\n", 0, len(data) - 1) + 1 if data and not data.endswith(b"\n") else len(data)
        if keep == len(data) and data:
            last = data[data.rfind(b"\n", 0, len(data) - 1) + 1:]
            try:
                json.loads(last)
            except ValueError:
                keep = len(data) - len(last)
        if keep < len(data):
            with open(p, "r+b") as f:
                f.truncate(keep)
            log.warning("metrics.jsonl: dropped a torn last line (%d bytes) left by an interrupted run",
                        len(data) - keep)

    @classmethod
    def open(cls, path: str | Path, flag: str = "--resume") -> RunFolder:
        run = cls(path)
        if not run.config_path.is_file():
            raise ConfigError(f"{flag} {path}: not a run folder (no config.yaml)")
        return run

    def load_config(self, overrides=()) -> Config:
        return load_config(config_file=self.config_path, overrides=overrides)

    def record_changes(self, old: Config, new: Config, keys: list[str]) -> None:
        """Rewrite ``config.yaml`` with the keys a ``--resume --set`` changed, and append a comment line that
        says what changed and at which checkpoint; earlier such lines are kept."""
        def value(cfg: Config, key: str):
            node = config_to_dict(cfg)
            for part in key.split("."):
                node = node[part]
            return node

        at = latest_checkpoint(self.path)
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        line = (f"# --resume at {at.name if at else 'the start'} ({when}): "
                + ", ".join(f"{k}: {value(old, k)!r} -> {value(new, k)!r}" for k in keys))
        notes = [ln for ln in self.config_path.read_text(encoding="utf-8").splitlines() if ln.startswith("# --resume")]
        save_config(new, self.config_path, notes=[*notes, line])

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (every record names its ``stage`` and ``step``)."""
        if "stage" not in record or "step" not in record:
            raise ValueError(f"metrics records need 'stage' and 'step', got keys {sorted(record)}")
        if not self.writer:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)
                   and k != "step" and math.isfinite(float(v))}
        prefix = f"{record['stage']}/" + (f"{record['row']}/" if "row" in record else "")
        for sink in self._sinks:
            sink({prefix + k: v for k, v in scalars.items()}, int(record["step"]))

    def open_sinks(self, cfg: Config) -> None:
        """``log.tensorboard``: TensorBoard scalars in ``<run>/tensorboard``; ``log.wandb``: a Weights & Biases run
        named after the folder. Every metrics line goes to them as ``stage/key`` at its step (rank 0 only)."""
        if not self.writer:
            return
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(self.path / "tensorboard"))

            def to_tensorboard(values: dict[str, float], step: int) -> None:
                for k, v in values.items():
                    writer.add_scalar(k, v, step)
                writer.flush()

            self._sinks.append(to_tensorboard)
        if cfg.log.wandb:
            import wandb

            wb = wandb.init(project="rtdmd", name=self.path.name, id=self.path.name, resume="allow",
                            dir=str(self.path), config=config_to_dict(cfg))
            self._sinks.append(lambda values, step: wb.log(values, step=step))

    def metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    def summary(self) -> dict[str, Any]:
        if self.summary_path.exists():
            return json.loads(self.summary_path.read_text())
        return {}

    def update_summary(self, *, preset: str, rows: dict[str, dict] | None = None,
                       seconds: dict[str, float] | None = None, stage: str | None = None) -> dict[str, Any]:
        """Merge evaluation rows and stage times into ``summary.json`` (atomic rewrite)."""
        s = self.summary()
        if not self.writer:
            return s
        s["preset"] = preset
        if stage is not None:
            s["stage"] = stage  # what --stage the run was started with (what --resume continues)
        s.setdefault("eval", {}).update(rows or {})
        s.setdefault("seconds", {}).update(seconds or {})
        atomic_write_text(self.summary_path, json.dumps(_json_safe(s), indent=2) + "\n")
        return s
