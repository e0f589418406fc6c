"""Finding a stage's output in the artifacts tree, and checking it against its manifest.

    folder, man = find_onnx("artifacts", "tiny", "int8", target="onnxruntime")   # stage 1-2 graph
    path = onnx_file(folder, man)                 # the file, checked against the manifest's size and sha256
    variants = find_trt_engines("artifacts", "tiny", "fp16")                      # stage 3 engines (manifests)
    raise UserError(f"... — {make_hint('quantize', 'gpt2-124m')}")               # "run: make quantize MODEL=gpt2-124m"

Every miss is one line that names the make target that produces what is missing. convert/, optimize/, serve/ and
the engines all find their inputs here; none of them imports another stage's script.
"""
from __future__ import annotations

from pathlib import Path

from lmopt.errors import UserError
from lmopt.manifest import MANIFEST, list_variants, load_stage, sha256_file
from lmopt.paths import stage_dir

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# which make target produces each ONNX precision
PRECISION_TARGET = {"fp32": "export", "int8": "quantize", "fp16": "fp16", "int4": "quantize-int4"}


def make_hint(target: str, model: str = "tiny") -> str:
    """'run: make <target>' plus MODEL=<model> unless it is the default model."""
    return f"run: make {target}" + ("" if model == "tiny" else f" MODEL={model}")


def verify_files(folder: Path, manifest: dict, target: str, verify_hash_below: int = 512 << 20) -> None:
    """Every output file the manifest lists has the recorded size (and sha256, for files under the threshold), so a
    truncated or replaced file fails with one line instead of deep inside a runtime."""
    for name, entry in manifest.get("outputs", {}).get("files", {}).items():
        f = folder / name
        size = f.stat().st_size if f.is_file() else -1
        if size != entry.get("bytes"):
            raise UserError(f"{f} is missing, truncated or changed ({size} bytes, manifest says {entry.get('bytes')}) "
                            f"— delete {folder} and run: make {target}")
        if size < verify_hash_below and sha256_file(f) != entry.get("sha256"):
            raise UserError(f"{f} does not match the sha256 in its manifest (corrupt or edited) — delete {folder} and "
                            f"run: make {target}")


def find_onnx(artifacts, model: str, precision: str, target: str = "onnxruntime") -> tuple[Path, dict]:
    """(folder, manifest) of the ONNX graph of `precision` made for `target` ("onnxruntime" or "tensorrt")."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' — use one of {', '.join(PRECISIONS)}")
    if precision not in PRECISION_TARGET:
        raise UserError(f"there is no {precision} ONNX stage — use fp32, fp16, int8 or int4 with ONNX Runtime or "
                        "fp16/int8 with TensorRT")
    if precision == "fp32":
        return load_stage(artifacts, model, "export", "fp32")
    if precision == "fp16" and target == "onnxruntime":
        # the FP16 graph for ONNX Runtime is a stage-1 option (export_onnx.py --dtype fp16); stage 2's FP16 graph
        # is TensorRT's
        exported = list_variants(artifacts, model, "export").get("fp16")
        if exported is not None:
            return stage_dir(artifacts, model, "export", "fp16"), exported
    # (graphs made from the fused GQA export run on engine ort-gqa, which finds them itself)
    variants = {v: m for v, m in list_variants(artifacts, model, "quantize").items()
                if m.get("engine", "ort") != "ort-gqa"}
    found = {v: m for v, m in variants.items() if m.get("precision") == precision and target in m.get("targets", [])}
    if not found:
        where = stage_dir(artifacts, model, "quantize", "")
        other = sorted({t for m in variants.values() if m.get("precision") == precision for t in m.get("targets", [])})
        if other:  # e.g. the FP16 graph is built for TensorRT only: rebuilding it would not help
            raise UserError(f"the {precision} ONNX under {where} is made for {', '.join(other)} only, not {target} "
                            f"— use --engine {'trt' if 'tensorrt' in other else 'ort'} for {precision}")
        if precision == "fp16" and target == "onnxruntime":
            raise UserError(f"no fp16 ONNX for onnxruntime under {stage_dir(artifacts, model, 'export', '')} — "
                            f"{make_hint('export-fp16', model)} (python convert/export_onnx.py --dtype fp16)")
        raise UserError(f"no {precision} ONNX for {target} under {where} — "
                        f"{make_hint(PRECISION_TARGET[precision], model)}")
    best = sorted(found.items(), key=lambda kv: (not kv[1].get("default", False), kv[1].get("created", "")))[0]
    return stage_dir(artifacts, model, "quantize", best[0]), best[1]


def onnx_file(folder: Path, manifest: dict, verify_hash_below: int = 512 << 20) -> Path:
    """The ONNX file a manifest names, checked against the size and hash the manifest recorded."""
    p = folder / manifest.get("outputs", {}).get("onnx", "model.onnx")
    target = manifest.get("stage", "export")
    if not p.is_file():
        raise UserError(f"{folder / MANIFEST} names {p.name}, which is missing — delete {folder} and run: make {target}")
    verify_files(folder, manifest, target, verify_hash_below)
    return p


def find_trt_engines(artifacts, model: str, precision: str, version_tag: str | None = None,
                     installed: str = "") -> dict[str, dict]:
    """{variant: manifest} of the stage-3 TensorRT engines of `precision`, newest last; with `version_tag` (e.g.
    "trt11.4", see lmopt.trt_api.version_tag) only those built by that TensorRT — engines load only in the version
    that built them. One line naming `make engine` when there is none."""
    found = {v: m for v, m in list_variants(artifacts, model, "engine").items()
             if m.get("precision") == precision and m.get("engine") == "tensorrt"}
    if not found:
        raise UserError(f"no {precision} TensorRT engine under {stage_dir(artifacts, model, 'engine', '')} — "
                        f"{make_hint('engine', model)}")
    if version_tag is not None:
        mine = {v: m for v, m in found.items() if v.startswith(f"{version_tag}-")}
        if not mine:
            raise UserError(f"the {precision} engines ({', '.join(found)}) were built by another TensorRT than the "
                            f"installed {installed or version_tag} (engines only load in the version that built "
                            f"them) — {make_hint('engine', model)}")
        found = mine
    return dict(sorted(found.items(), key=lambda kv: kv[1].get("created", "")))


def trt_plan(artifacts, model: str, variant: str, manifest: dict) -> Path:
    """The engine file of one stage-3 variant, checked against its manifest (size and sha256, whatever the size)."""
    folder = stage_dir(artifacts, model, "engine", variant)
    plan = folder / manifest["outputs"]["engine"]
    if not plan.is_file():
        raise UserError(f"{plan} is missing — delete {folder} and {make_hint('engine', model)}")
    verify_files(folder, {"outputs": {"files": {plan.name: manifest["outputs"]["files"].get(plan.name, {})}}},
                 "engine" + ("" if model == "tiny" else f" MODEL={model}"), verify_hash_below=1 << 62)
    return plan
