"""manifest.json: written last by every stage, read first by the next.

Schema (all stages):
  stage, variant, model, created (UTC ISO), command (argv), inputs {name: {path, sha256, bytes}},
  outputs {name: relative path}, settings {...}, versions {...}, timings_s {...}, validation {passed, checks[...]},
  machine {...}, model_key, model_source (and model_fingerprint for a local folder), plus stage-specific keys.
A stage folder without manifest.json never finished. A stage reads only folders whose model_source is its model's
(check_model): two models never share artifacts, and a folder made from an older state of a local model is stale.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .paths import STAGE_TARGETS, stage_dir

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_entry(path: str | os.PathLike) -> dict:
    p = Path(path)
    return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def package_versions(*names: str) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                           "cuda": torch.version.cuda, "capability": f"{p.major}.{p.minor}"}
    except Exception:  # torch missing or broken CUDA: CPU-only description
        pass
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(folder: str | os.PathLike, data: dict) -> Path:
    """Write manifest.json atomically (temp name + rename). Call it last."""
    folder = Path(folder)
    base = {"created": now_iso(), "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "machine": machine_info()}
    base.update(data)
    spec = data.get("model_spec")  # the --model value (data["model"] is its artifacts key)
    if isinstance(spec, str) and "model_source" not in data:
        from .models import classify  # noqa: PLC0415

        base.update(classify(spec).manifest_fields())
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(base, indent=2, default=_json_default) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def _json_default(o):
    try:
        import numpy as np  # noqa: PLC0415

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_manifest(folder: str | os.PathLike, make_target: str | None = None) -> dict:
    """Read a stage's manifest or fail with one line naming it and the make target that builds it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        target = make_target or "demo"
        raise UserError(f"missing {path} — run: make {target}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt {path} ({e.msg}) — delete {Path(folder)} and run: make {make_target or 'demo'}")


def check_model(folder: str | os.PathLike, manifest: dict, model) -> None:
    """Refuse, in one line, a stage folder made from another model than `model` (a foreign folder: another source
    under the same key) or from an older state of it (stale: a local folder whose config or weights changed since).
    Manifests written before sources were recorded pass."""
    from .models import Model, classify  # noqa: PLC0415

    recorded = manifest.get("model_source")
    if not recorded:
        return
    m = model if isinstance(model, Model) else classify(model)
    if m.kind == "hub" and not recorded.startswith("hub:"):
        return  # called with an artifacts key (report tools), not a --model value: nothing to compare
    folder = Path(folder)
    target = STAGE_TARGETS.get(manifest.get("stage", ""), "demo")
    if recorded != m.source:
        raise UserError(f"{folder} was made from {recorded}, not {m.source} (two models under one artifacts key "
                        f"'{m.key}') — delete {folder.parent.parent} or pass another --artifacts folder")
    have = manifest.get("model_fingerprint")
    if have and m.fingerprint and have != m.fingerprint:
        raise UserError(f"{folder} is stale: {m.source} changed (config or weights) since it was made — run: make "
                        f"{target} MODEL={m.id}")


def load_stage(artifacts, model, stage: str, variant: str) -> tuple[Path, dict]:
    """(folder, manifest) of an upstream stage output; one-line error with the make target when it is missing, or
    when it was made from another model (check_model)."""
    from .models import Model  # noqa: PLC0415

    folder = stage_dir(artifacts, model, stage, variant)
    target = STAGE_TARGETS.get(stage, stage)
    if not (folder / MANIFEST).is_file():
        spec = model.id if isinstance(model, Model) else model
        model_arg = "" if spec == "tiny" else f" MODEL={spec}"
        raise UserError(f"missing {folder / MANIFEST} — run: make {target}{model_arg}")
    man = read_manifest(folder, target)
    check_model(folder, man, model)
    return folder, man


def list_variants(artifacts, model, stage: str) -> dict[str, dict]:
    """All finished variants of a stage: {variant: manifest} (each checked against the model: check_model)."""
    root = stage_dir(artifacts, model, stage, "x").parent
    out = {}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file():
                out[d.name] = read_manifest(d)
                check_model(d, out[d.name], model)
    return out
