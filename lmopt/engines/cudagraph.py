"""The Hugging Face model with a static KV cache, its decode step captured once in a CUDA graph and replayed.

    create_engine("cudagraph", "llama-1b", precision="fp16", device="cuda")

One token then costs one graph launch instead of the hundreds of kernel launches an eager step issues from Python
(the eager step leaves the GPU idle most of the time; see results/README.md, GPU). A graph is captured per
(batch size, cache length) the first time a decode step needs it and replayed afterwards: its input buffers (token
ids, position ids, cache position, a [batch, cache length] attention mask) and the cache tensors keep their addresses,
and each step only refills the small input buffers. The cache length is the prompt length plus `max_new_tokens`,
rounded up to `cache_block`, so a short prompt does not pay for reading a long cache.

Prefill runs eagerly into the same static cache (prompt lengths vary, a graph per length would not pay). Left-padded
batches work as with the eager engine: the attention mask buffer holds the padding, position ids come from the caller.
Logits stay on the GPU (`DeviceLogits`): greedy decoding moves one id per row to the host, not a [batch, vocab] array.

CUDA only, FP16 or BF16. `graphs=False` runs the same static-cache steps eagerly, which also works on the CPU in
FP32: the tests use it to check the cache and mask handling against the eager engine without a GPU.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass, field
from typing import Any


from ..errors import UserError
from ..models import load_model, model_shape
from ..nvtx_ranges import nvtx_range
from .base import Engine, EngineInfo
from .slots import DeviceLogits

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass
class _Graph:
    """Static buffers of one (batch, cache length): the cache, the step's inputs, the captured graph."""
    cache: Any
    ids: Any
    pos: Any
    cache_pos: Any
    mask: Any
    graph: Any = None
    logits: Any = None
    warmed: bool = False
    busy: bool = False


@dataclass
class _State:
    key: tuple[int, int]
    length: int                     # columns of the cache in use (prompt + decoded tokens)
    extra: dict = field(default_factory=dict)


class CudaGraphEngine(Engine):
    def __init__(self, model: str, precision: str = "fp16", device: str = "cuda", threads: int | None = None,
                 max_new_tokens: int = 256, cache_block: int = 256, graphs: bool = True):
        import torch

        if precision not in DTYPES:
            raise UserError(f"engine 'cudagraph' runs fp16 or bf16 (got '{precision}') — pass --precisions fp16")
        if graphs and not device.startswith("cuda"):
            raise UserError("engine 'cudagraph' needs an NVIDIA GPU (CUDA graphs) — pass --device cuda on a GPU "
                            "machine, or use engine 'torch' on the CPU")
        if graphs and not torch.cuda.is_available():
            raise UserError("engine 'cudagraph': torch sees no CUDA device — run on a GPU machine with a CUDA build "
                            "of torch")
        if threads:
            torch.set_num_threads(threads)
        self.torch, self.device, self.use_graphs = torch, device, graphs
        self.max_new_tokens, self.cache_block = max_new_tokens, cache_block
        self.model = load_model(model, dtype=DTYPES[precision], device=device)
        shape = model_shape(self.model.config)
        self.max_positions = shape["max_positions"]
        self.info = EngineInfo("cudagraph", precision, device, "hf", model, shape["max_positions"],
                               shape["vocab_size"])
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters \
            else {}
        self.graphs: dict[tuple[int, int], _Graph] = {}

    # ---- static buffers -------------------------------------------------------------------------------------------
    def _buffers(self, batch: int, need: int) -> tuple[tuple[int, int], _Graph]:
        t = self.torch
        length = min(self.max_positions, -(-need // self.cache_block) * self.cache_block)
        key = (batch, length)
        g = self.graphs.get(key)
        if g is None:
            from transformers import StaticCache

            # transformers 4.57 and 5.x both size the layers lazily from the first update (the prefill); the extra
            # keywords are the older constructor's and are ignored where unused
            cache = StaticCache(config=self.model.config, max_batch_size=batch, max_cache_len=length,
                                device=self.device, dtype=self.model.dtype)
            z = lambda *s: t.zeros(s, dtype=t.long, device=self.device)  # noqa: E731
            g = _Graph(cache, z(batch, 1), z(batch, 1), z(1), z(batch, length))
            self.graphs[key] = g
        if g.busy:
            raise UserError(f"engine 'cudagraph' already runs a generation of batch {batch} — release it first")
        return key, g

    def _forward(self, g: _Graph, ids, pos, cache_pos):
        return self.model(input_ids=ids, attention_mask=g.mask, position_ids=pos, cache_position=cache_pos,
                          past_key_values=g.cache, use_cache=True, **self.extra).logits[:, -1]

    # ---- Engine -------------------------------------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask, position_ids):
        t = self.torch
        b, n = input_ids.shape
        if n + 1 > self.max_positions:
            raise UserError(f"prompt of {n} tokens fills the model's context of {self.max_positions}")
        key, g = self._buffers(b, n + self.max_new_tokens)
        # the cache tensors are created under inference_mode (first update), so every update must be too
        with t.inference_mode():
            g.cache.reset()
            g.mask.zero_()
            g.mask[:, :n].copy_(t.from_numpy(attention_mask))
            with nvtx_range("h2d"):
                ids = t.from_numpy(input_ids).to(self.device)
                pos = t.from_numpy(position_ids).to(self.device)
            logits = self._forward(g, ids, pos, t.arange(n, device=self.device))
        g.busy = True
        return DeviceLogits(logits), _State(key, n)

    def decode(self, state: _State, input_ids, attention_mask, position_ids):
        t = self.torch
        g = self.graphs[state.key]
        n = state.length
        if n >= state.key[1]:
            raise UserError(f"engine 'cudagraph' cache of {state.key[1]} positions is full — create it with a "
                            f"larger max_new_tokens (now {self.max_new_tokens})")
        with t.inference_mode():
            with nvtx_range("h2d"):
                g.ids.copy_(t.from_numpy(input_ids))
                g.pos.copy_(t.from_numpy(position_ids))
                g.cache_pos.fill_(n)
                g.mask[:, n] = 1  # the new token attends to itself; earlier columns keep the prompt's padding
            if not g.warmed:
                self._warm_up(g, n)
                g.warmed = True
            if not self.use_graphs:
                logits = self._forward(g, g.ids, g.pos, g.cache_pos)
            else:
                if g.graph is None:
                    self._capture(g, n)
                g.graph.replay()
                logits = g.logits
        state.length = n + 1
        return DeviceLogits(logits), state

    def _warm_up(self, g: _Graph, n: int) -> None:
        """Two steps before the first capture of these buffers (CUDA-graph capture needs warmed-up kernels and
        allocator; a side stream on the GPU), then the cache is rewound to `n` tokens. The warm-up steps write
        position n's keys/values from the real inputs, which the replay then writes again, identically. Run on the
        CPU too (graphs=False), so the tests exercise the same sequence."""
        t = self.torch
        cuda = self.device.startswith("cuda")
        s = t.cuda.Stream() if cuda else None
        if cuda:
            s.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(s) if cuda else _nullcontext():
            for _ in range(2):
                self._forward(g, g.ids, g.pos, g.cache_pos)
        if cuda:
            t.cuda.current_stream().wait_stream(s)
        self._rewind(g, n)

    @staticmethod
    def _rewind(g: _Graph, n: int) -> None:
        """transformers 5.x static layers write at their own device counter (`cumulative_length`, advanced by every
        update) and ignore `cache_position`; 4.x layers write at `cache_position` and have no counter. Setting the
        counter back to the tokens really held makes both write where the mask and the caller expect."""
        for layer in getattr(g.cache, "layers", []):
            c = getattr(layer, "cumulative_length", None)
            if c is not None and hasattr(c, "fill_"):
                c.fill_(n)

    def _capture(self, g: _Graph, n: int) -> None:
        """Capture one decode step (after _warm_up). Capture records kernels without running them: the cache and
        its counter are unchanged, and each replay then writes at position n and advances the counter by one."""
        t = self.torch
        g.graph = t.cuda.CUDAGraph()
        with t.cuda.graph(g.graph):
            g.logits = self._forward(g, g.ids, g.pos, g.cache_pos)
        self._rewind(g, n)

    def release(self, state) -> None:
        if isinstance(state, _State) and state.key in self.graphs:
            self.graphs[state.key].busy = False

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def close(self) -> None:
        self.graphs.clear()
        del self.model
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()
