"""Model specs: the built-in trained `tiny`, random-weight presets at realistic shapes, local folders, hub ids.

    tiny        built-in Llama (4 layers, hidden 192, GQA 6/2 heads), trained weights in models/tiny (the default)
    gpt2-124m   GPT-2 small shape, random weights          (speed work)
    llama-small Llama shape of GPT-2 size, random weights  (speed work on CPU: 12 layers, hidden 768, 4 KV heads)
    llama-1b    Llama 3.2 1B shape, random weights         (GPU speed work: 16 layers, hidden 2048, 32/8 heads)
    gpt2-test, llama-test   2-layer random configs for fast tests

Random presets are created on the fly from a fixed seed (never committed) and use the built-in tokenizer; their
output-head rows past the tokenizer's vocabulary are zero, so greedy tokens decode to text.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .paths import REPO_ROOT

BUILTIN = "tiny"
BUILTIN_DIR = REPO_ROOT / "models" / "tiny"
# architectures the ONNX export path (optimum, text-generation-with-past) is built and tested for
SUPPORTED_MODEL_TYPES = ("llama", "gpt2", "mistral", "qwen2", "qwen3", "gemma", "phi3", "granite", "olmo", "smollm3")


@dataclass(frozen=True)
class Preset:
    arch: str                      # "llama" or "gpt2"
    config: dict = field(default_factory=dict)
    note: str = ""


PRESETS: dict[str, Preset] = {
    "gpt2-124m": Preset("gpt2", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
                        "GPT-2 small (124M) shape"),
    "llama-small": Preset("llama", dict(num_hidden_layers=12, hidden_size=768, intermediate_size=2048,
                                        num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                                        max_position_embeddings=2048),
                          "Llama shape of GPT-2 size (~110M)"),
    "llama-1b": Preset("llama", dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                     max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True),
                       "Llama 3.2 1B shape"),
    "gpt2-test": Preset("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=4096),
                        "2-layer GPT-2 for tests"),
    "llama-test": Preset("llama", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                       max_position_embeddings=256),
                         "2-layer Llama for tests"),
}


class Model:
    """One model, resolved once per process (`resolve(spec)` returns the same object every call): what every stage,
    engine, the Triton model and the gateway use instead of re-reading the --model string.

        m = resolve("/data/my-llama")
        m.id, m.kind, m.key, m.source    # "/data/my-llama", "local", "my-llama-1a2b3c4d", "/data/my-llama"
        m.config, m.tokenizer            # loaded on first use, then shared
        m.context_length                 # max positions of the config: the one number every part agrees on

    `key` names the artifacts folder (artifacts/<key>/...): a preset or hub id as given ('/' written '--'), a local
    folder its name plus a short hash of its resolved path, so two folders of the same name never share artifacts.
    `source` is what the key stands for; every manifest records it, and a stage refuses a folder made from another.
    """

    def __init__(self, id: str, kind: str, path: Path | None, key: str, source: str):
        self.id, self.kind, self.path, self.key, self.source = id, kind, path, key, source
        self.name = id     # (the name the spec was given by; kept for older callers)

    def __repr__(self) -> str:
        return f"Model({self.id!r}, kind={self.kind}, key={self.key})"

    @functools.cached_property
    def fingerprint(self) -> str | None:
        """What a local model's artifacts were made from: its config.json and the names, sizes and times of its
        weight files. Artifacts recorded under another fingerprint are stale."""
        if self.kind != "local" or self.path is None:
            return None
        import hashlib

        h = hashlib.sha256()
        for f in sorted(self.path.iterdir()):
            if f.name == "config.json":
                h.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def manifest_fields(self) -> dict[str, Any]:
        """What every manifest records about its model (lmopt.manifest.write_manifest adds it)."""
        out: dict[str, Any] = {"model_key": self.key, "model_source": self.source}
        if self.fingerprint:
            out["model_fingerprint"] = self.fingerprint
        return out

    @property
    def weights(self) -> str:
        """Where transformers loads config, tokenizer and weights from: a folder (local, built-in, cached hub model)
        or the hub id."""
        return str(self.path) if self.path else self.id

    @functools.cached_property
    def config(self):
        return _load_config(self)

    @functools.cached_property
    def tokenizer(self):
        return self.load_tokenizer()

    def load_tokenizer(self):
        """A new tokenizer instance (`.tokenizer` is the shared one): for a caller that changes its settings."""
        return _load_tokenizer(self)

    @functools.cached_property
    def context_length(self) -> int:
        return int(model_shape(self.config)["max_positions"])


ModelSpec = Model  # the older name


def _key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _looks_like_path(spec: str) -> bool:
    p = Path(spec).expanduser()
    return spec.startswith((".", "/", "~")) or p.exists() or spec.count("/") > 1


@functools.lru_cache(maxsize=64)
def classify(spec: str) -> Model:
    """The Model of a --model value without touching the network or loading anything (its key and source only):
    what make's artifact paths and the manifest checks need. `resolve` is the one stages call."""
    if not spec:
        raise UserError("--model is empty — pass 'tiny' (built-in), a preset, or a local HF model folder")
    if spec == BUILTIN:
        return Model(spec, "builtin", BUILTIN_DIR, spec, f"builtin:{spec}")
    if spec in PRESETS:
        return Model(spec, "preset", None, spec, f"preset:{spec}")
    if _looks_like_path(spec):
        p = Path(spec).expanduser().resolve()
        digest = hashlib.sha256(str(p).encode()).hexdigest()[:8]
        return Model(spec, "local", p, f"{_key(p.name)}-{digest}", str(p))
    # anything else is a hub id: org/name, or a legacy id without an organisation (gpt2, distilgpt2, gpt2-medium)
    return Model(spec, "hub", None, _key(spec.replace("/", "--")), f"hub:{spec}")


def model_key(spec: str) -> str:
    """The artifacts folder name of a --model value (the Makefile asks this, with only the standard library)."""
    try:
        return classify(spec).key
    except UserError:
        return _key(spec)


@functools.lru_cache(maxsize=64)
def resolve(spec: str) -> Model:
    """The process's one Model of a --model value, with a one-line error for what cannot be a model. A hub id is
    looked up in the local Hugging Face cache first (then it loads offline); when it is not there, and the hub
    cannot be reached, one line says so within seconds instead of transformers' minute of retries."""
    m = classify(spec)
    if m.kind == "builtin" and not (BUILTIN_DIR / "config.json").is_file():
        raise UserError(f"built-in model missing at {BUILTIN_DIR} — run: python models/train_tiny.py")
    if m.kind == "local":
        p = Path(spec).expanduser()
        if not p.exists():
            raise UserError(f"model folder {spec} does not exist — pass an existing HF model folder, 'tiny', "
                            f"or a preset ({', '.join(PRESETS)})")
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"{spec} has no config.json — pass a Hugging Face model folder "
                            "(save_pretrained output) or 'tiny'")
    if m.kind == "hub":
        m.path = _hub_cached(spec) or _hub_reachable_or_fail(spec)
    return m


def _hub_cached(spec: str) -> Path | None:
    """The snapshot folder of a hub model in the local Hugging Face cache (HF_HUB_CACHE), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(spec, "config.json")
    except Exception:  # an id the hub library rejects (e.g. bad characters): not in the cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def _hub_reachable_or_fail(spec: str, timeout_s: float = 3.0) -> None:
    """Return when the hub knows `spec` (one HTTP request, at most `timeout_s`); else raise one line that says
    whether the hub is unreachable or has no such model (transformers alone retries for half a minute)."""
    import os
    import threading
    import urllib.error
    import urllib.request

    alt = ("a local model folder (save_pretrained output): --model /path/to/folder, "
           f"or 'tiny' or a preset ({', '.join(PRESETS)})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"'{spec}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set — download it "
                        f"where the hub is reachable, or use {alt}")
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    try:
        from huggingface_hub import get_token

        token = get_token()
    except ImportError:
        token = os.environ.get("HF_TOKEN")
    result: list = []

    def probe():  # urllib honours https_proxy; the thread bounds DNS lookups too, which ignore socket timeouts
        try:
            req = urllib.request.Request(f"{endpoint}/api/models/{spec}")
            if token:  # a private or gated model answers 401 without it
                req.add_header("Authorization", f"Bearer {token}")
            urllib.request.urlopen(req, timeout=timeout_s).close()
            result.append(None)
        except Exception as e:  # noqa: BLE001 — every failure is reported below
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    err = result[0] if result else TimeoutError(f"no answer in {timeout_s:g} s")
    if err is None:
        return None
    if isinstance(err, urllib.error.HTTPError) and err.code in (401, 404):
        raise UserError(f"model '{spec}' was not found on the Hugging Face hub ({endpoint}, HTTP {err.code}) nor in "
                        f"the local cache — check the id, or use {alt}")
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    raise UserError(f"the Hugging Face hub ({endpoint}) is unreachable ({type(err).__name__}: "
                    f"{_first_line(err)}) and '{spec}' is not in the local Hugging Face cache — with the model "
                    f"already cached run with HF_HUB_OFFLINE=1, else use {alt}")


def _load_config(m: Model):
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    if m.kind == "preset":
        pr = PRESETS[m.id]
        tok = resolve(BUILTIN).tokenizer
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        if pr.arch == "gpt2":
            return GPT2Config(**ids, **pr.config)
        return LlamaConfig(**ids, pad_token_id=tok.pad_token_id, **pr.config)
    try:
        return AutoConfig.from_pretrained(m.weights)
    except (OSError, ValueError) as e:
        if m.kind == "hub" and _unreachable(e):
            raise UserError(f"the Hugging Face hub did not answer for '{m.id}' ({_first_line(e)}) and it is not in "
                            "the local Hugging Face cache — with the model already cached run with HF_HUB_OFFLINE=1, "
                            "else use a local model folder (save_pretrained output): --model /path/to/folder") from None
        if m.kind == "hub":
            raise UserError(f"model '{m.id}' was not found on the Hugging Face hub ({_first_line(e)}) — check the "
                            f"id, or use 'tiny', a preset ({', '.join(PRESETS)}) or a local model folder") from None
        raise UserError(f"cannot load config of '{m.id}' ({_first_line(e)}) — pass a local model folder or 'tiny'")


def _unreachable(e: BaseException) -> bool:
    """True when a transformers load failed for want of a connection (not because the hub has no such model)."""
    while e is not None:
        if type(e).__name__ in ("LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "ReadTimeout",
                                "OfflineModeIsEnabled") or "couldn't connect" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_tokenizer(m: Model):
    from transformers import AutoTokenizer

    src = str(BUILTIN_DIR) if m.kind in ("preset", "builtin") else m.weights
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer of '{m.id}' ({_first_line(e)}) — the model folder needs "
                        "tokenizer files")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(spec: str | Model):
    """The model's config (shared within the process)."""
    return as_model(spec).config


def load_tokenizer(spec: str | Model):
    """The model's tokenizer (shared within the process; `resolve(spec).load_tokenizer()` makes a new one)."""
    return as_model(spec).tokenizer


def as_model(spec: str | Model) -> Model:
    return spec if isinstance(spec, Model) else resolve(spec)


GIL_FREE_CHARS = 2048   # texts longer than this are encoded with the GIL released (docs/openai_gateway.md)


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """`tokenizer(text)["input_ids"]` as a list, straight from the Rust tokenizer of a fast tokenizer: the same ids
    without transformers' per-call layers (checks, BatchEncoding), which cost more than the encoding of a short
    prompt. A slow tokenizer, or a fast one left with truncation, padding or split special tokens switched on,
    takes the usual call.

    A text over GIL_FREE_CHARS goes through the batch call, which lets go of Python's GIL while it works (the single
    `encode` holds it throughout: a thread tokenizing 1 MB would stall every other thread for ~0.8 s); same ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (backend is None or backend.truncation is not None or backend.padding is not None
            or getattr(backend, "encode_special_tokens", False)
            or getattr(tokenizer, "split_special_tokens", False)):
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if len(text) > GIL_FREE_CHARS:
        return backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
    return backend.encode(text, add_special_tokens=add_special_tokens).ids


def load_model(spec: str | Model, dtype: str = "float32", device: str = "cpu"):
    """An HF causal LM in eval mode. Presets get seeded random weights (same weights every call)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    m = as_model(spec)
    if m.kind == "preset":
        torch.manual_seed(0)
        with torch.device(device):  # a copy: the model owns its config, m.config stays as loaded
            model = AutoModelForCausalLM.from_config(copy.deepcopy(m.config), dtype=torch_dtype)
        _only_tokenizer_ids(model, len(m.tokenizer))
    else:
        check_supported(m.config, m.id)
        try:
            model = AutoModelForCausalLM.from_pretrained(m.weights, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load weights of '{m.id}' ({_first_line(e)}) — pass a folder with "
                            "model.safetensors or pytorch_model.bin")
        model = model.to(device)
    model.eval()
    return model


def _only_tokenizer_ids(model, n: int) -> None:
    """A random preset's vocabulary is its real model's (e.g. 128,256) but its tokenizer is the built-in one: zero
    the output-head rows past the tokenizer so greedy decoding picks ids the tokenizer can turn into text (a served
    stream of undecodable ids would carry no text at all). The shape, and so every speed figure, is unchanged."""
    import torch

    head = model.get_output_embeddings().weight
    if head.shape[0] > n:
        with torch.no_grad():
            head[n:] = 0


def check_supported(cfg, spec: str) -> None:
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"architecture '{mt}' of {spec} is not supported by this pipeline's ONNX export "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}) — use a causal LM of one of these types")


def model_shape(cfg) -> dict[str, Any]:
    """Layer/head counts that the KV cache and the TensorRT profiles need, for Llama- and GPT-2-style configs."""
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    kv_heads = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return dict(model_type=cfg.model_type, num_layers=n_layers, num_heads=n_heads, num_kv_heads=kv_heads,
                head_dim=head_dim, hidden_size=hidden, vocab_size=cfg.vocab_size, max_positions=max_pos)


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
