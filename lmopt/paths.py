"""The one place that resolves artifact paths: artifacts/<model key>/<stage>/<variant>/...

Variant names encode what produced them (`fp32`, `int8-qdq-trt-minmax`, `int8-cpu-u8s8-minmax`, `fp16`,
`trt11.4-fp16`). Every stage writes a variant folder through `staging_dir`, which builds it under a temporary name
and renames it into place only when the stage succeeded, so a folder with a manifest is always complete.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARTIFACTS = Path("artifacts")

# stage name -> make target that produces it (used in "missing ... — run: make X" messages)
STAGE_TARGETS = {
    "export": "export",
    "quantize": "quantize",
    "fp16": "fp16",
    "engine": "engine",
    "serve": "serve-repo",
    "profile": "benchmark",
    "gguf": "gguf",
}


def model_slug(model) -> str:
    """The artifacts folder name of a model (a --model value or an lmopt.models.Model): a preset or hub id as given
    ('/' written '--'), a local folder its name plus a short hash of its resolved path (lmopt.models.classify)."""
    from .models import Model, model_key

    return model.key if isinstance(model, Model) else model_key(model)


def stage_dir(artifacts: str | os.PathLike, model, stage: str, variant: str) -> Path:
    return Path(artifacts) / model_slug(model) / stage / variant


def check_writable(artifacts: str | os.PathLike) -> Path:
    """Fail early, with the fix, if the artifacts folder cannot be created or written."""
    root = Path(artifacts)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to artifacts folder {root} ({e.strerror or e}) — pass --artifacts DIR "
                        "pointing to a writable folder") from None
    return root


@contextmanager
def staging_dir(final: Path):
    """Yield a temporary folder next to `final`; on success replace `final` with it, on any error delete it.

    The manifest is written by the caller as the last file inside the temporary folder, so the rename publishes a
    complete stage output or nothing.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:6]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
