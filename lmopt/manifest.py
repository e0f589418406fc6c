"""manifest.json: written last by every stage, read first by the next.

Schema (all stages):
  stage, variant, model, created (UTC ISO), command (argv), inputs {name: {path, sha256, bytes}},
  outputs {name: relative path}, settings {...}, versions {...}, timings_s {...}, validation {passed, checks[...]},
  machine {...}, plus stage-specific keys.
A stage folder without manifest.json never finished.
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


def load_stage(artifacts, model: str, stage: str, variant: str) -> tuple[Path, dict]:
    """(folder, manifest) of an upstream stage output; one-line error with the make target when it is missing."""
    folder = stage_dir(artifacts, model, stage, variant)
    target = STAGE_TARGETS.get(stage, stage)
    if not (folder / MANIFEST).is_file():
        model_arg = "" if model == "tiny" else f" MODEL={model}"
        raise UserError(f"missing {folder / MANIFEST} — run: make {target}{model_arg}")
    return folder, read_manifest(folder, target)


def list_variants(artifacts, model: str, stage: str) -> dict[str, dict]:
    """All finished variants of a stage: {variant: manifest}."""
    root = stage_dir(artifacts, model, stage, "x").parent
    out = {}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file():
                out[d.name] = read_manifest(d)
    return out
