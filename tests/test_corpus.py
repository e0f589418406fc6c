"""The built-in model's corpus (lmopt.corpus): which files count, duplicates, the split by path, the snapshots, and
that the committed data/ snapshots and file list agree with each other."""
from __future__ import annotations

import json

from conftest import REPO


def _fake_stdlib(root):
    (root / "json").mkdir(parents=True)
    (root / "json" / "__init__.py").write_text('"""JSON encoder and decoder."""\n\ndef dumps(obj):\n    return obj\n')
    (root / "copy_of_json.py").write_text('"""JSON encoder and decoder."""\n\ndef dumps(obj):\n    return obj\n')
    (root / "string.py").write_text('"""A collection of string constants."""\r\nwhitespace = " \\t"\r\n')
    for skipped in ("test", "encodings", "site-packages"):
        (root / skipped).mkdir()
        (root / skipped / "mod.py").write_text("x = 1\n")
    (root / "pydoc_data").mkdir()
    (root / "pydoc_data" / "topics.py").write_text("topics = {'if': 'The if statement\\n****\\n', 'empty': ''}\n")
    return root


def test_collect_skips_tests_and_tables_and_drops_duplicates(tmp_path):
    from lmopt import corpus

    docs = corpus.collect(_fake_stdlib(tmp_path / "lib"))
    paths = [d.path for d in docs]
    # the duplicate keeps the first path in sorted order; tests, codec tables and site-packages are not text
    assert paths == ["copy_of_json.py", "pydoc_data/topics.py::if", "string.py"]
    assert "\r" not in docs[2].text
    m = corpus.manifest(docs, tmp_path / "lib")
    assert sum(m["documents"].values()) == 3
    assert [f[0] for f in m["files"]] == paths and all(len(f[3]) == 64 for f in m["files"])


def test_split_depends_on_the_path_only():
    from lmopt import corpus

    names = [f"pkg/mod{i}.py" for i in range(2000)]
    splits = [corpus.split_of(n) for n in names]
    assert splits == [corpus.split_of(n) for n in names]          # deterministic
    share = {s: splits.count(s) / len(splits) for s in corpus.SPLITS}
    assert 0.85 < share["train"] < 0.95 and 0.02 < share["eval"] < 0.08 and 0.02 < share["calib"] < 0.08


def test_snapshot_is_bounded_and_cut_at_line_ends():
    from lmopt import corpus

    docs = [corpus.Doc(f"m{i}.py", "\n".join(f"line {i} {j}" for j in range(500))) for i in range(20)]
    text, used = corpus.snapshot(docs, chars=5000, per_doc=1000)
    assert 5000 <= len(text) < 5000 + 1000 + 2 and len(used) < len(docs)
    assert all(line.startswith("line ") for line in text.split("\n") if line)   # no line cut in half
    assert corpus.snapshot(docs, chars=5000, per_doc=1000) == (text, used)


def test_committed_snapshots_come_from_held_out_files():
    from lmopt import corpus

    listing = json.loads((REPO / "data" / "corpus.json").read_text())
    split = {f[0]: f[1] for f in listing["files"]}
    for name, want in (("eval.txt", "eval"), ("calib.txt", "calib")):
        used = listing["snapshots"][name]["documents"]
        assert used and all(split[p] == want == corpus.split_of(p) for p in used)
        assert len((REPO / "data" / name).read_text()) > 10_000
    assert not set(listing["snapshots"]["eval.txt"]["documents"]) & set(listing["snapshots"]["calib.txt"]["documents"])
