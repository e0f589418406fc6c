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


@dataclass(frozen=True)
class ModelSpec:
    name: str          # as given on the command line
    kind: str          # builtin | preset | local | hub
    path: Path | None  # folder with config.json (builtin, local) or None


@functools.lru_cache(maxsize=64)
def resolve(spec: str) -> ModelSpec:
    """Classify a --model value, with a one-line error for paths that cannot be a model."""
    if not spec:
        raise UserError("--model is empty — pass 'tiny' (built-in), a preset, or a local HF model folder")
    if spec == BUILTIN:
        if not (BUILTIN_DIR / "config.json").is_file():
            raise UserError(f"built-in model missing at {BUILTIN_DIR} — run: python models/train_tiny.py")
        return ModelSpec(spec, "builtin", BUILTIN_DIR)
    if spec in PRESETS:
        return ModelSpec(spec, "preset", None)
    p = Path(spec).expanduser()
    looks_like_path = spec.startswith((".", "/", "~")) or p.exists() or spec.count("/") > 1
    if looks_like_path:
        if not p.exists():
            raise UserError(f"model folder {spec} does not exist — pass an existing HF model folder, 'tiny', "
                            f"or a preset ({', '.join(PRESETS)})")
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"{spec} has no config.json — pass a Hugging Face model folder "
                            "(save_pretrained output) or 'tiny'")
        return ModelSpec(spec, "local", p.resolve())
    # anything else is a hub id: org/name, or a legacy id without an organisation (gpt2, distilgpt2, gpt2-medium),
    # loaded from the local Hugging Face cache or the hub; load_config says in one line when neither has it
    return ModelSpec(spec, "hub", None)


def load_config(spec: str):
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    m = resolve(spec)
    if m.kind == "preset":
        pr = PRESETS[spec]
        tok = load_tokenizer(BUILTIN)
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        if pr.arch == "gpt2":
            return GPT2Config(**ids, **pr.config)
        return LlamaConfig(**ids, pad_token_id=tok.pad_token_id, **pr.config)
    try:
        return AutoConfig.from_pretrained(str(m.path) if m.path else spec)
    except (OSError, ValueError) as e:
        if m.kind == "hub":
            raise UserError(f"unknown model '{spec}': not a preset, a local folder, or a model in the local Hugging "
                            f"Face cache or on the hub ({_first_line(e)}) — use 'tiny', a preset "
                            f"({', '.join(PRESETS)}), a local model folder, or a hub id you can reach") from None
        raise UserError(f"cannot load config of '{spec}' ({_first_line(e)}) — pass a local model folder or 'tiny'")


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    m = resolve(spec)
    src = str(BUILTIN_DIR) if m.kind in ("preset", "builtin") else (str(m.path) if m.path else spec)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer of '{spec}' ({_first_line(e)}) — the model folder needs "
                        "tokenizer files")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


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



def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """An HF causal LM in eval mode. Presets get seeded random weights (same weights every call)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    m = resolve(spec)
    if m.kind == "preset":
        cfg = load_config(spec)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
        _only_tokenizer_ids(model, len(load_tokenizer(spec)))
    else:
        cfg = load_config(spec)
        check_supported(cfg, spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(m.path) if m.path else spec, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load weights of '{spec}' ({_first_line(e)}) — pass a folder with "
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
