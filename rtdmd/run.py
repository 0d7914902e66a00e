"""The run folder of docs/training.md §1: resolved config, metrics log, checkpoints, summary.

::

    <run>/config.yaml        the resolved config (what --resume and rtdmd.sample read back)
    <run>/metrics.jsonl      one JSON object per logged step, always with "stage" and "step"
    <run>/checkpoints/       stage1-step-N/, stage2-epoch-N/ (rtdmd.checkpoint)
    <run>/summary.json       evaluation rows and stage wall times
    <run>/samples.png        (toy) the picture of the evaluation rows
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ._io import atomic_write_text
from .config import Config, ConfigError, load_config, save_config


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

    @classmethod
    def create(cls, out: str | Path | None, cfg: Config) -> RunFolder:
        """A new run folder (``runs/<preset>-<YYYYmmdd-HHMMSS>/`` without ``out``) with ``config.yaml`` written."""
        path = Path(out) if out is not None else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path}: exists and is not a directory")
        if (path / "config.yaml").exists():
            raise ConfigError(f"--out {path}: already holds a run (use --resume {path} to continue it)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {path}: cannot create it ({e.strerror})") from None
        run = cls(path)
        save_config(cfg, run.config_path)
        return run

    @classmethod
    def open(cls, path: str | Path, flag: str = "--resume") -> RunFolder:
        run = cls(path)
        if not run.config_path.is_file():
            raise ConfigError(f"{flag} {path}: not a run folder (no config.yaml)")
        return run

    def load_config(self, overrides=()) -> Config:
        return load_config(config_file=self.config_path, overrides=overrides)

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
