"""llama.cpp as an optional peer: where `make llamacpp` installs llama-cpp-python, importing it, converting a model
with the converter its source distribution vendors, quantizing, and reading what a GGUF file holds.

    import_llama_cpp()                                   # the module, or one UserError naming `make llamacpp`
    convert_to_gguf(hf_folder, out, "f32")               # vendored convert_hf_to_gguf.py, in a subprocess
    quantize_gguf(f32_gguf, out, "q8_0")                 # llama_model_quantize (what llama-quantize calls)
    gguf_weight_bytes(path)                              # bytes one decode step reads (the floor's numerator)

`make llamacpp` builds llama-cpp-python from source for this CPU into `.llamacpp/site` (a pip --target folder,
so it needs nothing from the main environment's resolver) and leaves the unpacked source distribution in
`.llamacpp/src` (its `vendor/llama.cpp/` holds `convert_hf_to_gguf.py` and `gguf-py`). LMOPT_LLAMACPP overrides the
folder. Our precisions map to llama.cpp's file types: fp32 -> F32, int8 -> Q8_0, int4 -> Q4_0.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .errors import UserError
from .paths import REPO_ROOT

VERSION = "0.3.36"
FILE_TYPES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
INSTALL_HINT = "run: make llamacpp (builds llama-cpp-python from source into .llamacpp/, ~15 min on 2 cores)"


def home() -> Path:
    return Path(os.environ.get("LMOPT_LLAMACPP") or REPO_ROOT / ".llamacpp")


def site_dir() -> Path:
    return home() / "site"


def vendor_dir() -> Path:
    """vendor/llama.cpp of the unpacked source distribution (converter + gguf-py)."""
    return home() / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def import_llama_cpp():
    """The llama_cpp module from `make llamacpp`'s folder (or anywhere on sys.path); a UserError naming the make
    target when it is not installed."""
    site = site_dir()
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(f"llama.cpp (llama-cpp-python) is not installed ({e}) — {INSTALL_HINT}") from None
    return llama_cpp


def _converter() -> Path:
    conv = vendor_dir() / "convert_hf_to_gguf.py"
    if not conv.is_file():
        raise UserError(f"missing {conv} (llama.cpp's converter from the llama-cpp-python sdist) — {INSTALL_HINT}")
    return conv


# The converter names a BPE tokenizer's pre-tokenizer from a hash of its output on a test string and refuses
# tokenizers it does not know. The built-in tokenizer (used by every preset) is byte-level BPE with GPT-2's
# splitting regex (tokenizers' ByteLevel pre-tokenizer, use_regex=True), which is llama.cpp's "gpt-2"; the
# benchmark feeds token ids, so this label only matters for text a user would tokenize with llama.cpp.
_RUN_CONVERTER = """
import sys
conv, site, pre, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sys.path[:0] = [conv.rsplit("/", 1)[0], site]
import convert_hf_to_gguf as c
from conversion.base import TextModel
if pre:
    orig = TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return orig(self, tokenizer)
        except NotImplementedError:
            return pre
    TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [conv, *args]
c.main()
"""


def convert_to_gguf(hf_folder: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32",
                    unknown_pre_tokenizer: str = "gpt-2") -> Path:
    """Run the vendored convert_hf_to_gguf.py on a Hugging Face folder (config, safetensors, tokenizer); a BPE
    tokenizer it does not recognise gets `unknown_pre_tokenizer` (see above; "" = fail as the converter does)."""
    conv = _converter()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    cmd = [sys.executable, "-c", _RUN_CONVERTER, str(conv), str(site_dir()), unknown_pre_tokenizer,
           str(hf_folder), "--outtype", outtype, "--outfile", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_folder}: {tail}")
    os.replace(tmp, out)
    return out


def quantize_gguf(src: str | os.PathLike, out: str | os.PathLike, file_type: str, threads: int = 0) -> Path:
    """Quantize a GGUF file to `file_type` (q8_0, q4_0) with llama.cpp's default recipe (llama_model_quantize,
    what the llama-quantize tool runs)."""
    ll = import_llama_cpp()
    ftype = getattr(ll, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}", None)
    if ftype is None:
        raise UserError(f"llama.cpp has no file type '{file_type}' — use one of {', '.join(FILE_TYPES.values())}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    params = ll.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = ll.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {file_type}) returned {rc}")
    os.replace(tmp, out)
    return out


def gguf_tensors(path: str | os.PathLike) -> dict[str, dict]:
    """{tensor name: {"type", "bytes", "shape"}} of a GGUF file, read with the vendored gguf-py."""
    gp = str(vendor_dir() / "gguf-py")
    if gp not in sys.path:
        sys.path.append(gp)
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise UserError(f"cannot import gguf-py ({e}) — {INSTALL_HINT}") from None
    r = GGUFReader(str(path))
    return {t.name: {"type": t.tensor_type.name, "bytes": int(t.n_bytes), "shape": [int(x) for x in t.shape]}
            for t in r.tensors}


def gguf_weight_bytes(tensors: dict[str, dict]) -> int:
    """Bytes of weights one decode step reads: every tensor once, except the token embedding when the file has a
    separate output matrix and the position embedding (a step reads only its B rows of those)."""
    total = sum(t["bytes"] for t in tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        total -= tensors["token_embd.weight"]["bytes"]
    return total - tensors.get("position_embd.weight", {}).get("bytes", 0)  # GPT-2's positions: one row a step
