"""The built-in model's training corpus: English documentation and source that ship with CPython, no download.

    collect()     documents from the running interpreter's standard library: every `.py` module (code, comments,
                  docstrings) outside test suites and codec tables, and each `pydoc_data.topics` entry as its own
                  document; exact duplicates dropped (first path in sorted order kept)
    split_of()    train / eval / calib by a hash of the document's relative path, so adding or removing a file never
                  moves another one between splits
    snapshot()    a bounded, deterministic slice of one split's text (the committed data/eval.txt, data/calib.txt):
                  at most `per_doc` characters from each document, documents in hash order, until `chars` is reached
    manifest()    the exact document list: relative path, split, characters, sha256 of the text (no text)
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# directories whose modules are test fixtures or generated tables, not prose or representative code
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "__pycache__"}
SKIP_FILES = {"pydoc_data/topics.py"}          # read entry by entry instead (collect)
MAX_DOC_CHARS = 400_000                        # larger "modules" are data tables
TOPICS = "pydoc_data/topics.py"
SPLITS = ("train", "eval", "calib")


@dataclass(frozen=True)
class Doc:
    path: str        # relative to the stdlib root; "pydoc_data/topics.py::<topic>" for a pydoc topic
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def split(self) -> str:
        return split_of(self.path)


def _bucket(path: str) -> int:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big") % 100


def split_of(path: str) -> str:
    """90% train, 5% eval, 5% calibration, decided by the path alone."""
    b = _bucket(path)
    return "eval" if b < 5 else "calib" if b < 10 else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect(root: Path | None = None) -> list[Doc]:
    """Every document, sorted by path, exact duplicates (same text) removed."""
    root = Path(root) if root is not None else stdlib_root()
    docs: list[Doc] = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if rel in SKIP_FILES or SKIP_DIRS.intersection(f.relative_to(root).parts[:-1]):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n").strip()
        if text and len(text) <= MAX_DOC_CHARS:
            docs.append(Doc(rel, text))
    topics_file = root / TOPICS
    if topics_file.is_file():
        ns: dict = {}
        exec(compile(topics_file.read_text(encoding="utf-8"), str(topics_file), "exec"), ns)
        for name in sorted(ns.get("topics", {})):
            text = ns["topics"][name].strip()
            if text:
                docs.append(Doc(f"{TOPICS}::{name}", text))
    docs.sort(key=lambda d: d.path)
    seen: set[str] = set()
    unique = []
    for d in docs:
        if d.sha256 not in seen:
            seen.add(d.sha256)
            unique.append(d)
    return unique


def by_split(docs: list[Doc]) -> dict[str, list[Doc]]:
    out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for d in docs:
        out[d.split].append(d)
    return out


def join(docs: list[Doc]) -> str:
    return "".join(d.text + "\n\n" for d in docs)


def _head(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a line end when there is one."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[:cut if cut > 0 else limit]


def snapshot(docs: list[Doc], chars: int, per_doc: int) -> tuple[str, list[str]]:
    """(text, paths used): the head of each document in hash order until `chars` characters."""
    parts, used, n = [], [], 0
    for d in sorted(docs, key=lambda d: hashlib.sha256(d.path.encode()).hexdigest()):
        if n >= chars:
            break
        piece = _head(d.text, per_doc).strip() + "\n\n"
        parts.append(piece)
        used.append(d.path)
        n += len(piece)
    return "".join(parts), used


def manifest(docs: list[Doc], root: Path | None = None) -> dict:
    import sys

    return {"source": "CPython standard library (.py modules and pydoc_data.topics entries)",
            "python": sys.version.split()[0],
            "stdlib_root": str(root if root is not None else stdlib_root()),
            "split_rule": "bucket = first 4 bytes of sha256(path) mod 100: <5 eval, <10 calib, else train",
            "documents": {s: sum(d.split == s for d in docs) for s in SPLITS},
            "characters": {s: sum(len(d.text) for d in docs if d.split == s) for s in SPLITS},
            "files": [[d.path, d.split, len(d.text), d.sha256] for d in docs]}
