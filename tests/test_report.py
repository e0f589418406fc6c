"""Report (make notebook, make diagram): the notebook executed headless on the built-in model's real results, notes
for missing inputs, non-empty labelled figures, and the architecture diagram drawn from its text source."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, no_partial, read_json, run_cli


def _not_blank(png: Path) -> None:
    """A PNG that holds a drawing: readable, not tiny, more than one colour."""
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 300, (png, img.shape)
    assert float(img[..., :3].std()) > 0.02, f"{png} is (nearly) one colour"


@pytest.fixture(scope="module")
def tiny_bench(tiny_export, artifacts) -> Path:
    """A short real benchmark of the built-in model (torch fp32 vs ORT fp32, batch 1) in the session's artifacts."""
    run_cli("profile/benchmark.py", "--model", "tiny", "--artifacts", str(artifacts), "--batch-sizes", "1",
            "--repeats", "2", "--warmup", "1", "--max-new-tokens", "4", "--long-prompt", "32", "--bandwidth-mb", "16",
            "--engines", "torch,ort", "--precisions", "fp32")
    return artifacts / "tiny" / "profile" / "benchmark-cpu.json"


def _outputs_text(nb: dict) -> str:
    out = []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            out.append("".join(o.get("text", "")))
            for v in o.get("data", {}).values():
                out.append(v if isinstance(v, str) else "".join(v) if isinstance(v, list) else "")
    return "\n".join(out)


def test_notebook_on_builtin_results(tiny_bench, artifacts, tmp_path):
    out = tmp_path / "report"
    run_cli("notebooks/run_notebook.py", "--model", "tiny", "--artifacts", str(artifacts), "--results",
            str(tmp_path / "no-results"), "--out", str(out), timeout=600)
    man = read_json(out / "manifest.json")
    assert man["stage"] == "report"
    nb = json.loads((out / "latency_analysis.ipynb").read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    html = (out / "latency_analysis.html").read_text()
    assert "Traceback" not in html
    # figures from the benchmark: present, drawn, listed with the file they came from
    for name in ("latency_distribution_cpu.png", "speedup_cpu.png", "devices_decode_latency.png"):
        assert name in man["outputs"]["figures"], man["outputs"]["figures"]
        _not_blank(out / name)
    figs = {f["figure"]: f["sources"] for f in json.loads((out / "figures.json").read_text())}
    assert figs["speedup_cpu.png"] == [str(tiny_bench)]
    # the numbers the notebook prints are the JSON's
    bench = read_json(tiny_bench)
    ort = next(r for r in bench["rows"] if r["engine"] == "ort" and r["precision"] == "fp32")
    text = _outputs_text(nb)
    m = re.search(r"fastest decode at batch 1: ort fp32 — ([\d.]+) ms/token p50, ([\d.]+)x the baseline", text)
    assert m, text[-3000:]
    assert float(m.group(1)) == pytest.approx(ort["summary"]["1"]["step_ms"]["p50"], abs=0.006)
    assert float(m.group(2)) == pytest.approx(ort["summary"]["1"]["decode_speedup_vs_baseline"], abs=0.006)
    # provenance under every figure: machine, date and command of its data
    assert "benchmark.py --model tiny" in html
    # Other stages' tests may have left their real results in the session's artifacts (quantize manifests, serving
    # and profile JSON): each kind present must have given its figure; each absent one a note naming its make target.
    prof = artifacts / "tiny" / "profile"
    kinds = {
        "accuracy": ([p for p in (artifacts / "tiny" / "quantize").glob("*/manifest.json")
                      if "accuracy" in read_json(p)], ["accuracy_vs_precision.png"], "make quantize"),
        "serving": (list(prof.glob("serving-stream-*.json")), ["serving_throughput.png", "streaming_ttft_itl.png"],
                    "make serve-bench"),
        "profile": ([p for p in prof.rglob("summary.json") if read_json(p).get("kind") == "profile"],
                    ["nvtx_breakdown_"], "make profile"),
    }
    for kind, (found, figures, target) in kinds.items():
        if found:
            for f in figures:
                hits = [n for n in man["outputs"]["figures"] if n.startswith(f)]
                assert hits, (kind, f, man["outputs"]["figures"])
                for h in hits:
                    _not_blank(out / h)
        else:
            assert f"No {kind} results" in text and target in text, kind
    assert no_partial(out.parent)


def test_notebook_without_results_names_make_targets(tmp_path):
    out = tmp_path / "report"
    run_cli("notebooks/run_notebook.py", "--model", "tiny", "--artifacts", str(tmp_path / "empty"), "--results",
            str(tmp_path / "none"), "--out", str(out), timeout=600)
    man = read_json(out / "manifest.json")
    assert man["outputs"]["figures"] == []
    text = _outputs_text(json.loads((out / "latency_analysis.ipynb").read_text()))
    for target in ("make benchmark", "make serve-bench", "make quantize", "make profile"):
        assert target in text, target


def test_notebook_unknown_machine(tmp_path):
    (tmp_path / "results" / "cpu-epyc").mkdir(parents=True)
    proc = run_cli("notebooks/run_notebook.py", "--machine", "h100", "--results", str(tmp_path / "results"),
                   "--artifacts", str(tmp_path / "a"), check=False)
    assert_one_line_error(proc, "no results for machine 'h100'", "cpu-epyc")
    assert not (tmp_path / "a" / "tiny" / "report").exists()


def test_empty_or_unlabelled_figure_is_refused(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmopt.report import notebook as R

    p = R.Params(report_dir=str(tmp_path))
    fig, ax = plt.subplots()
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    with pytest.raises(ValueError, match="empty"):
        R.save(fig, "empty", [], p)
    ax.plot([1, 2], [3, 4])
    ax.set_ylabel("")
    with pytest.raises(ValueError, match="label"):
        R.save(fig, "unlabelled", [], p)
    ax.set_ylabel("y (ms)")
    assert R.save(fig, "ok", [], p).is_file()
    plt.close(fig)


def test_diagram_from_text_source(tmp_path):
    out = tmp_path / "arch.png"
    run_cli("diagrams/pipeline_architecture.py", "--out", str(out))
    _not_blank(out)
    # every stage script the diagram names is one the README's stage table names, so the two cannot drift apart
    src = (REPO / "diagrams" / "pipeline_architecture.txt").read_text()
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"\b((?:convert|optimize|serve|profile)/[\w/]+\.(?:py|sh))", src))
    assert {"convert/export_onnx.py", "profile/benchmark.py", "optimize/build_trt_engine.py"} <= named
    assert [n for n in sorted(named) if n not in readme] == []
    # the committed PNG is what the README shows
    assert "diagrams/pipeline_architecture.png" in readme
    _not_blank(REPO / "diagrams" / "pipeline_architecture.png")


def test_diagram_bad_source(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("node a 1 2 stage | A\nedge a b data |\n")
    proc = run_cli("diagrams/pipeline_architecture.py", "--source", str(bad), "--out", str(tmp_path / "x.png"),
                   check=False)
    assert_one_line_error(proc, "node 'b'")
    assert not (tmp_path / "x.png").exists()
