"""The project's docs cannot rot: every reference resolves inside the repository, generated sections match their
source, and the README stays a front door.

A reference is a markdown file name (``docs/method.md``, ``RESULTS.md``) — it must name a file in the repository —
and a section sign with a number (``method.md §4.1``, ``§4.1–4.2``, ``§5–§8``) — the number must be a numbered
heading (``### 4.1 ...``) of the file it points to: the document of the reference just before it when only a list
separator stands between them (``method.md §4.1, §4.2 and §5``), else the markdown file it is written in, or in a
source file the last ``.md`` named above it. Markdown links must point to existing files and, with a ``#anchor``,
to an existing heading; a § in a link's text is checked against the linked file.
"""

from __future__ import annotations

import bisect
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".txt"}
SKIP_DIRS = {".git", ".ci-venv", ".venv", "venv", "build", "dist", "runs", "__pycache__", ".pytest_cache",
             ".benchmarks", ".ruff_cache", "node_modules"}

MD_NAME = re.compile(r"(?<![\w/.\-])((?:[\w\-]+/)*[\w\-]+\.md)\b")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)(?:\s?[–-]\s?§?(\d+(?:\.\d+)*))?")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
NUMBERED = re.compile(r"^(\d+(?:\.\d+)*)\.?(?:\s|$)")
LINK_FULL = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
#: what may stand between references of one list: "method.md §4.1, §4.2 and §5"
CHAIN = re.compile(r"[\s,;/–-]*(?:(?:and|or|to)[\s,;/–-]*)?")
#: markdown files our tools write (reports, tables); named as outputs, not cited
OUTPUTS = {"report.md", "kernel_time.md", "gpu_check_table.md", "OUT/report.md", "OUT/kernel_time.md",
           "OUT/gpu_check_table.md"}
#: names of files that were never part of the repository; they must not be cited in any form (spelled in pieces
#: here and below so that a plain grep for them finds no citation in the tree)
GONE = ["SP" + "EC", "ANCH" + "ORS", "AP" + "I.md", "DESI" + "GN.md", "TO" + "Y.md"]
FOREIGN = re.compile(rf"\b({GONE[0]}|{GONE[1]})\b")


def repo_files() -> list[Path]:
    """Text files of the working tree: tracked and untracked-but-not-ignored (a walk outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.splitlines()
        paths = [ROOT / p for p in out]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in paths if p.suffix in TEXT_SUFFIXES and p.is_file())


@cache
def all_names() -> dict[str, list[Path]]:
    names: dict[str, list[Path]] = {}
    for p in repo_files():
        names.setdefault(p.name, []).append(p)
    return names


def resolve_md(name: str, referrer: Path) -> Path | None:
    """The file a markdown name in ``referrer`` points to: relative to it, to the root, in docs/, or by a unique
    base name."""
    for base in (referrer.parent, ROOT, ROOT / "docs"):
        cand = (base / name).resolve()
        if cand.is_file() and ROOT in cand.parents:
            return cand
    if "/" not in name and len(all_names().get(name, [])) == 1:
        return all_names()[name][0]
    return None


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, everything but letters, digits, ``_``, ``-`` and spaces dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@cache
def headings(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(section numbers, anchors) of a markdown file; code blocks are skipped."""
    numbers, anchors, seen, fenced = set(), set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if not m:
            continue
        title = m.group(2)
        if n := NUMBERED.match(title):
            numbers.add(n.group(1))
        s = slug(title)
        anchors.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return frozenset(numbers), frozenset(anchors)


def _range_end(start: str, end: str) -> str:
    """``4.1.3`` – ``4`` ends at 4.1.4; ``4.1`` – ``4.2`` at 4.2."""
    a, b = start.split("."), end.split(".")
    return ".".join(a[: max(len(a) - len(b), 0)] + b)


@dataclass
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _check_sections(match: re.Match, doc: Path | None, where: str) -> list[Problem]:
    if doc is None:
        return [Problem(where, f"§{match.group(1)} names no document")]
    numbers, _ = headings(doc)
    ends = filter(None, (match.group(1), match.group(2) and _range_end(match.group(1), match.group(2))))
    return [Problem(where, f"§{n}: {doc.relative_to(ROOT)} has no section {n}") for n in ends if n not in numbers]


def _check_links(text: str, path: Path, where) -> tuple[str, list[Problem]]:
    """Check a markdown file's links outside code blocks (the file, the #anchor, a § in the link text against the
    linked file) and return the text with those links blanked out for the rest of the checks."""
    problems, out, fenced = [], [], False
    for line, start in zip(text.splitlines(keepends=True), _line_starts(text), strict=False):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            out.append(line)
            continue
        for m in LINK_FULL.finditer(line):
            label, link = m.group(1), m.group(2)
            if re.match(r"[a-z]+:", link):
                continue  # http(s):, mailto:
            file_part, _, anchor = link.partition("#")
            target = (path.parent / file_part).resolve() if file_part else path
            if not target.exists():
                problems.append(Problem(where(start), f"link to {file_part}: no such file"))
                continue
            if target.suffix != ".md":
                continue
            if anchor and anchor not in headings(target)[1]:
                problems.append(Problem(where(start), f"link to {link}: no such heading"))
            for sec in SECTION.finditer(label):
                problems += _check_sections(sec, target, where(start))
        out.append(LINK_FULL.sub(lambda m: " " * len(m.group(0)), line))
    return "".join(out), problems


def _line_starts(text: str) -> list[int]:
    return [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]


def check_text(text: str, path: Path) -> list[Problem]:
    """Every dangling reference in ``text`` (the contents of ``path``)."""
    rel = path.relative_to(ROOT) if ROOT in path.parents else path
    starts = _line_starts(text)

    def where(pos: int) -> str:
        return f"{rel}:{bisect.bisect_right(starts, pos)}"

    problems: list[Problem] = []
    is_md = path.suffix == ".md"
    if is_md:
        text, problems = _check_links(text, path, where)
    problems += [Problem(where(m.start()), f"cites {m.group(1)}, which is not part of this repository")
                 for m in FOREIGN.finditer(text)]
    events = sorted([(m.start(), "md", m) for m in MD_NAME.finditer(text)]
                    + [(m.start(), "sec", m) for m in SECTION.finditer(text)], key=lambda e: e[0])
    fallback: Path | None = path if is_md else None  # a bare § in a markdown file is that file's
    chain: Path | None = None  # the document of the reference just before, for "a.md §1, §2 and §3"
    chain_end = -1
    for pos, kind, m in events:
        if kind == "md":
            if m.group(1) in OUTPUTS or re.search(r"https?://\S*$", text[text.rfind("\n", 0, pos) + 1:pos]):
                continue  # a file our tools write, or one on the web
            target = resolve_md(m.group(1), path)
            if target is None:
                problems.append(Problem(where(pos), f"{m.group(1)} is not a file in this repository"))
            chain, chain_end = target, m.end()
            if not is_md and target is not None:
                fallback = target  # in source files a bare § is the last document named above it
            continue
        chained = chain is not None and CHAIN.fullmatch(text[chain_end:pos])
        doc = chain if chained else fallback
        problems += _check_sections(m, doc, where(pos))
        chain, chain_end = doc, m.end()
    return problems


def test_every_reference_resolves():
    files = [f for f in repo_files() if f != Path(__file__).resolve()]  # this file cites bad references on purpose
    problems = [p for f in files for p in check_text(f.read_text(encoding="utf-8", errors="replace"), f)]
    assert not problems, "dangling references:\n" + "\n".join(map(str, problems))


@pytest.mark.parametrize("text, expected", [
    (f"see {GONE[0]} §4.1", [f"cites {GONE[0]}", "names no document"]),
    (f"the contract ({GONE[2]} §1)", [f"{GONE[2]} is not a file", "names no document"]),
    ("as docs/method.md §99 says", ["has no section 99"]),
    ("docs/method.md §4.1–4.9", ["has no section 4.9"]),
    ("docs/method.md §4.1 and §77", ["has no section 77"]),
    (f"see {GONE[3]} \"Tests\" and {GONE[4]}", [f"{GONE[3]} is not a file", f"{GONE[4]} is not a file"]),
    (f"{GONE[1]} §6.3", [f"cites {GONE[1]}", "names no document"]),
    ("docs/method.md §4.1–4.2, §5–§8, §4.1.3-4", []),
    ("see docs/kernels.md and bench/RESULTS.md", []),
    ("https://github.com/x/y/blob/main/README.md", []),
])
def test_the_checker_catches_dangling_references(text, expected):
    found = [p.what for p in check_text(text, ROOT / "rtdmd" / "example.py")]
    assert len(found) == len(expected), found
    for want, got in zip(expected, found, strict=True):
        assert want in got, (want, got)


def test_the_checker_follows_markdown_links():
    text = "[x](method.md#41-the-sub-interval) [y](nope.md) [z](method.md#nope) [§4.2](method.md) [§9.9](toy.md)"
    found = [p.what for p in check_text(text, ROOT / "docs" / "example.md")]
    assert found == ["link to nope.md: no such file", "link to method.md#nope: no such heading",
                     "§9.9: docs/toy.md has no section 9.9"]


def test_config_reference_matches_the_schema():
    from rtdmd.config_reference import DOC, END, START, reference_markdown

    text = DOC.read_text(encoding="utf-8")
    current = text[text.index(START):text.index(END) + len(END)]
    assert current == reference_markdown(), "regenerate with: python -m rtdmd.config_reference"


def test_every_config_key_is_described():
    import dataclasses

    from rtdmd import config as C
    from rtdmd.config_reference import field_comments

    sections = [C.Config] + [t for t in C._hints(C.Config).values() if C._is_dc_type(t)] + [C.RewardConfig]
    undocumented = [f"{cls.__name__}.{f.name}" for cls in sections for f in dataclasses.fields(cls)
                    if not C._is_dc_type(C._hints(cls)[f.name]) and f.name != "rewards"
                    and not field_comments(cls).get(f.name)]
    assert not undocumented, f"give these fields a comment in rtdmd/config.py: {undocumented}"


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 20 * 1024, f"README.md is {len(readme)} bytes; move details to docs/"


def test_readme_kernel_example_runs_as_printed():
    """The README's kernel example, executed exactly as it is printed."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    x, adv = scope["x"], scope["adv"]
    assert torch.isfinite(scope["loss"]) and x.grad is not None and torch.isfinite(x.grad).all()
    assert adv.shape == (24,) and torch.isfinite(adv).all() and abs(float(adv.mean())) < 1e-5


def test_ci_runs_the_readme_set_up_and_test_commands():
    """.ci/run installs with the README's set-up command and runs its test command, to the letter."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme[readme.index("## Set up"):]
    block = re.search(r"```bash\n(.*?)```", setup, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    install, test = commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert install in ci, f".ci/run must run the README's install command: {install}"
    assert f"run_pytest {test}" in ci, f".ci/run must run the README's test command: {test}"
