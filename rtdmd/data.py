"""Prompt data for the real presets (docs/training.md §1): ``.txt`` (one prompt per line) or ``.jsonl`` (one object
per line with a ``"prompt"`` field; the other fields, e.g. GenEval metadata, ride along to the rewards).

A :class:`Prompt` is a ``str`` carrying its record, so the whole trainer handles prompts as plain strings and
only a reward that needs the metadata (a GenEval detector, a plug-in scorer) reads ``prompt.metadata``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Prompt(str):
    """A prompt string with the other fields of its ``.jsonl`` record (empty for ``.txt`` prompts)."""

    metadata: dict[str, Any]

    def __new__(cls, text: str, metadata: dict[str, Any] | None = None):
        obj = super().__new__(cls, text)
        obj.metadata = dict(metadata or {})
        return obj

    def __reduce__(self):  # keep the metadata through pickling (DataLoader workers, torch.distributed objects)
        return (Prompt, (str(self), self.metadata))


def prompt_metadata(prompt: str) -> dict[str, Any]:
    """The record fields of ``prompt`` (``{}`` for a plain string)."""
    return getattr(prompt, "metadata", {})


def load_prompts(path: str | Path, *, key: str = "data.train_prompts") -> list[Prompt]:
    """Read a prompt file; ``ValueError`` names ``key``, the file and the line for anything unusable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{key}: no such file: {p}")
    if p.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{key}: expected a .txt or .jsonl file, got {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}: {p} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r})"
                         ) from None
    except OSError as e:
        raise ValueError(f"{key}: cannot read {p} ({e.strerror})") from None
    prompts: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".txt":
            prompts.append(Prompt(line.strip()))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: {p}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{key}: {p}:{lineno}: expected an object with a string \"prompt\" field")
        text = record.pop("prompt")
        prompts.append(Prompt(text, record))
    if not prompts:
        raise ValueError(f"{key}: {p} holds no prompts")
    return prompts
