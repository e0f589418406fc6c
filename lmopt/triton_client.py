"""The one Triton client of the project: what a request to the served models looks like, and how its responses come
back — used by serve/client/infer_client.py (the CLI), profile/load_generator.py, profile/perf_analyzer_sweep.py
(its --input-data file), serve/soak.py and the tests.

    from lmopt.triton_client import GenRequest, GrpcStream, tensors
    req = GenRequest(prompt="def f(", max_tokens=16)              # or input_ids=[...] (token ids, no STRING tensor)
    with GrpcStream("127.0.0.1:8001") as st:                      # one gRPC stream, many requests in turn
        for piece in st.generate(req):                            # Piece(text, token_ids, final)
            print(piece.text, end="")

The served models (serve/make_model_repository.py): `lm` (one response) and `lm_stream` (decoupled: one response per
token, then a last response flagged `triton_final_response`). Inputs: `text_input` BYTES or `input_ids`
INT64, optional `max_tokens` INT32, `temperature` FP32, `top_k` INT32, `top_p` FP32, `seed` INT64, `stop` BYTES,
`ignore_eos` BOOL; request parameters `grammar` (a lmopt.grammar spec: structured output) and `logprobs` (int k);
outputs `text_output` BYTES, `token_ids` INT64, and in a request's last response `finish_reason` INT32 (the index in
lmopt.detokenize.FINISH_REASONS; Piece.finish_reason gives the name); with `logprobs`: `logprobs` FP32,
`top_logprob_ids` INT64 and `top_logprobs` FP32 (k per token; Piece.logprobs and Piece.top_logprobs). With max_batch_size > 0 every input has a leading batch dimension
(`[1, 1]` per value; input_ids `[1, n]`).
"""
from __future__ import annotations

import json
import queue
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

STREAM_MODEL = "lm_stream"
UNARY_MODEL = "lm"
FINAL_FLAG = "triton_final_response"


@dataclass
class GenRequest:
    """One generation request: the prompt as text or token ids, and its sampling settings (None = server default)."""
    prompt: str | None = None
    input_ids: Sequence[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | None = None
    ignore_eos: bool | None = None  # True: the end-of-sequence token does not end the request (max_tokens does)
    grammar: str | None = None      # structured output: a lmopt.grammar spec (sent as a request parameter)
    logprobs: int | None = None     # k: each token's log-probability and the top k (a request parameter)
    names: dict = field(default_factory=dict)   # tensor renames, e.g. {"text_input": "prompt"} for another model

    def parameters(self) -> dict:
        """The request parameters (not tensors) this request sets: grammar, logprobs."""
        return {k: v for k, v in (("grammar", self.grammar), ("logprobs", self.logprobs)) if v is not None}

    def values(self) -> list[tuple[str, Any, str]]:
        """(tensor name, values as a flat list, Triton datatype) of every input this request sets."""
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError("a request needs exactly one of prompt and input_ids")
        out = [("text_input", [self.prompt], "BYTES")] if self.prompt is not None else \
            [("input_ids", [int(i) for i in self.input_ids], "INT64")]
        for name, dtype in (("max_tokens", "INT32"), ("temperature", "FP32"), ("top_k", "INT32"), ("top_p", "FP32"),
                            ("seed", "INT64"), ("stop", "BYTES"), ("ignore_eos", "BOOL")):
            v = getattr(self, name)
            if v is not None:
                out.append((name, [v], dtype))
        return [(self.names.get(n, n), v, d) for n, v, d in out]


_NP = {"BYTES": "object", "INT32": "int32", "INT64": "int64", "FP32": "float32", "BOOL": "bool"}


def tensors(mod, req: GenRequest, batch_dim: bool = True) -> list:
    """InferInput tensors of `req` for a tritonclient module (tritonclient.grpc, .http or .grpc.aio)."""
    import numpy as np

    ins = []
    for name, vals, dtype in req.values():
        a = np.array([v.encode() if isinstance(v, str) else v for v in vals], dtype=_NP[dtype])
        if batch_dim:
            a = a.reshape(1, -1)
        x = mod.InferInput(name, list(a.shape), dtype)
        x.set_data_from_numpy(a)
        ins.append(x)
    return ins


def stream_request(mod, req: GenRequest, request_id: str = "", model: str = STREAM_MODEL,
                   batch_dim: bool = True) -> dict:
    """One item for tritonclient.grpc.aio's stream_infer(): the inputs plus the empty-final-response flag, so the end
    of a request is the server's word, not a guess."""
    return {"model_name": model, "inputs": tensors(mod, req, batch_dim), "request_id": request_id,
            "parameters": {"triton_enable_empty_final_response": True, **req.parameters()}}


_PACK = {"INT32": "i", "INT64": "q", "FP32": "f", "BOOL": "?"}


def infer_request_pb(req: GenRequest, request_id: str = "", model: str = STREAM_MODEL, batch_dim: bool = True):
    """The ModelInferRequest protobuf that stream_request() becomes inside tritonclient (the same bytes), built
    directly: no numpy arrays, no InferInput objects. For a client that talks to Triton's gRPC stub itself (the
    OpenAI gateway), where each request's setup is on the way to its first token."""
    import struct

    from tritonclient.grpc import service_pb2

    r = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    r.parameters["triton_enable_empty_final_response"].bool_param = True
    for k, v in req.parameters().items():
        if isinstance(v, str):
            r.parameters[k].string_param = v
        else:
            r.parameters[k].int64_param = int(v)
    for name, vals, dtype in req.values():
        r.inputs.add(name=name, datatype=dtype, shape=[1, len(vals)] if batch_dim else [len(vals)])
        if dtype == "BYTES":  # each element: its length (4 bytes, little-endian), then its bytes
            raw = b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() if isinstance(v, str) else v
                                                                    for v in vals))
        else:
            raw = struct.pack(f"<{len(vals)}{_PACK[dtype]}", *vals)
        r.raw_input_contents.append(raw)
    return r


def perf_analyzer_entry(req: GenRequest) -> dict:
    """One entry of perf_analyzer's --input-data JSON (shapes exclude the batch dimension)."""
    return {name: {"content": vals, "shape": [len(vals)]} for name, vals, _ in req.values()}


def generate_body(req: GenRequest) -> bytes:
    """JSON body for Triton's HTTP generate / generate_stream endpoints."""
    return json.dumps({name: (vals if name == "input_ids" else vals[0]) for name, vals, _ in req.values()}).encode()


@dataclass
class Piece:
    text: str                 # "" for the empty final response
    token_ids: list[int]
    final: bool
    finish_reason: str | None = None   # the server's word, in a request's last response (stop, length, ...)
    logprobs: list[float] | None = None        # with GenRequest.logprobs: one per token of token_ids
    top_logprobs: list[list[tuple[int, float]]] | None = None   # k (id, log-probability) per token, most likely first


def _reason(code) -> str | None:
    from .detokenize import FINISH_REASONS

    return FINISH_REASONS[int(code)] if code is not None and 0 <= int(code) < len(FINISH_REASONS) else None


def parse_response(result, tokens_output: str = "token_ids") -> Piece:
    """A streamed or unary InferResult as text, token ids and the final flag."""
    resp = result.get_response()
    names = {o.name for o in resp.outputs}
    text = result.as_numpy("text_output").reshape(-1)[0] if "text_output" in names else b""
    ids = result.as_numpy(tokens_output).reshape(-1) if tokens_output in names else []
    code = result.as_numpy("finish_reason").reshape(-1)[0] if "finish_reason" in names else None
    flag = resp.parameters.get(FINAL_FLAG)
    piece = Piece(text.decode() if isinstance(text, bytes) else str(text), [int(i) for i in ids],
                  bool(flag is not None and flag.bool_param), _reason(code))
    if "logprobs" in names:
        piece.logprobs = [float(x) for x in result.as_numpy("logprobs").reshape(-1)]
        n = len(piece.logprobs)
        top_ids = result.as_numpy("top_logprob_ids").reshape(n, -1) if "top_logprob_ids" in names else [[]] * n
        top_lp = result.as_numpy("top_logprobs").reshape(n, -1) if "top_logprobs" in names else [[]] * n
        piece.top_logprobs = [[(int(t), float(v)) for t, v in zip(a, b)] for a, b in zip(top_ids, top_lp)]
    return piece


def parse_response_pb(resp, tokens_output: str = "token_ids") -> Piece:
    """parse_response() of a raw ModelInferResponse protobuf (as Triton's gRPC stub streams it), without tritonclient's
    InferResult and numpy: the token ids (INT64), the finish reason and the final flag. Text outputs are not read."""
    import struct

    ids: list[int] = []
    code = lps = top_ids = top_lps = None
    for i, out in enumerate(resp.outputs):
        raw = resp.raw_output_contents[i] if i < len(resp.raw_output_contents) else None  # how Triton sends outputs
        if out.name == tokens_output:
            ids = list(struct.unpack(f"<{len(raw) // 8}q", raw)) if raw is not None else \
                list(out.contents.int64_contents)
        elif out.name == "finish_reason":
            code = struct.unpack("<i", raw[:4])[0] if raw is not None else out.contents.int_contents[0]
        elif out.name in ("logprobs", "top_logprobs"):
            v = list(struct.unpack(f"<{len(raw) // 4}f", raw)) if raw is not None else list(out.contents.fp32_contents)
            if out.name == "logprobs":
                lps = v
            else:
                top_lps = v
        elif out.name == "top_logprob_ids":
            top_ids = list(struct.unpack(f"<{len(raw) // 8}q", raw)) if raw is not None else \
                list(out.contents.int64_contents)
    flag = resp.parameters.get(FINAL_FLAG)
    piece = Piece("", ids, bool(flag is not None and flag.bool_param), _reason(code))
    if lps is not None:
        piece.logprobs = lps
        k = len(top_ids) // len(lps) if top_ids and lps else 0
        piece.top_logprobs = [list(zip(top_ids[j * k:(j + 1) * k], top_lps[j * k:(j + 1) * k]))
                              for j in range(len(lps))]
    return piece


class StreamError(RuntimeError):
    """Triton answered a streamed request with an error message."""


def aio_channel(url: str):
    """A grpc.aio channel to Triton with tritonclient's message limits and keepalive, and its inference stub."""
    import grpc
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions, service_pb2_grpc

    k = KeepAliveOptions()
    channel = grpc.aio.insecure_channel(url, options=[
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", k.keepalive_time_ms), ("grpc.keepalive_timeout_ms", k.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", k.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", k.http2_max_pings_without_data)])
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


async def stream_pb(stub, item, timeout: float):
    """The Pieces of one request (an infer_request_pb) over Triton's gRPC stream, through the stub itself, up to and
    including the final one. Raises StreamError for an error response, grpc.aio.AioRpcError for the call's own.
    Left early (use contextlib.aclosing, so that happens at once), the request is cancelled on the server; a finished
    one is not: Triton 2.51's gRPC frontend can crash (SIGSEGV) when a cancellation races the completion of the same
    request (docs/ENVIRONMENT.md)."""
    async def requests():
        yield item

    call = stub.ModelStreamInfer(requests(), timeout=timeout)
    finished = False
    try:
        async for resp in call:
            if resp.error_message:
                raise StreamError(resp.error_message)
            piece = parse_response_pb(resp.infer_response)
            finished = piece.final
            yield piece
            if finished:
                return
    finally:
        if not finished:
            call.cancel()


async def stream_aio(client, item, timeout: float):
    """The Pieces of one request (a stream_request item) over tritonclient.grpc.aio's stream_infer, up to and
    including the final one: the same loop as stream_pb through the client a user of tritonclient would reach for.
    Raises StreamError for an error response. Left early (contextlib.aclosing), the call is cancelled; a finished one
    is not (Triton 2.51's gRPC frontend can crash when a cancellation races the completion, docs/ENVIRONMENT.md)."""
    async def requests():
        yield item

    it = client.stream_infer(requests(), stream_timeout=timeout)
    finished = False
    try:
        async for result, error in it:
            if error is not None:
                raise StreamError(str(error).splitlines()[0] if str(error) else "stream error")
            piece = parse_response(result)
            finished = piece.final
            yield piece
            if finished:
                return
    finally:
        if not finished:
            it.cancel()


class GrpcStream:
    """One gRPC bidirectional stream to the decoupled model; requests on it run one after the other."""

    def __init__(self, url: str, timeout: float = 120.0, model: str = STREAM_MODEL, batch_dim: bool = True,
                 headers: dict[str, str] | None = None):
        import tritonclient.grpc as grpcclient

        self.mod, self.url, self.timeout, self.model, self.batch_dim = grpcclient, url, timeout, model, batch_dim
        self.headers = headers  # gRPC metadata sent when the stream opens (e.g. a request id a proxy logs)
        self.client = grpcclient.InferenceServerClient(url)
        self._open()

    def _open(self) -> None:
        # a fresh queue per stream: no late answer of a cancelled stream is read as the next request's
        q = self._q = queue.Queue()
        # no stream_timeout: that is a deadline for the whole stream's life, not per response (generate() bounds
        # the wait for each response); a long-lived stream would fail with "Deadline Exceeded" after it
        self.client.start_stream(callback=lambda result, error: q.put((result, error)), headers=self.headers)

    def cancel(self) -> None:
        """Leave the request in flight mid-answer (the server sees its stream cancelled) and open a fresh stream."""
        self.client.stop_stream(cancel_requests=True)
        self._open()

    def generate(self, req: GenRequest, request_id: str = "") -> Iterator[Piece]:
        """Send one request; yield its pieces up to and including the final one. A server error raises
        RuntimeError with its message; no response within `timeout` raises TimeoutError (the stream's state is
        then unknown: close it)."""
        try:
            self.client.async_stream_infer(self.model, tensors(self.mod, req, self.batch_dim), request_id=request_id,
                                           enable_empty_final_response=True, parameters=req.parameters() or None)
        except Exception as e:  # tritonclient's InferenceServerException: the stream is broken
            raise RuntimeError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        while True:
            try:
                result, error = self._q.get(timeout=self.timeout)
            except queue.Empty:
                raise TimeoutError(f"no response for {self.timeout} s") from None
            if error is not None:
                raise RuntimeError(str(error))
            piece = parse_response(result)
            yield piece
            if piece.final:
                return

    def close(self) -> None:
        try:
            self.client.stop_stream()
        finally:
            self.client.close()

    def __enter__(self) -> "GrpcStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_BATCH_DIM: dict[str, bool] = {}   # url/model -> whether the model's inputs carry a batch dimension


def has_batch_dim(url: str, model: str) -> bool:
    """max_batch_size > 0 means every input has a leading batch dimension: a request is [1, 1], not [1]."""
    key = f"{url}/{model}"
    if key not in _BATCH_DIM:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(url) as c:
            cfg = c.get_model_config(model, as_json=True)["config"]
        _BATCH_DIM[key] = int(cfg.get("max_batch_size", 0)) > 0
    return _BATCH_DIM[key]


# ---- the served model's metrics (Triton's metrics port) ---------------------------------------------------------------
def scrape_metrics(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Triton's metrics port (http://host:port/metrics) as {'name{labels}': value} (Prometheus text format)."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=timeout).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def served_timeline(before: dict[str, float], after: dict[str, float], model: str = STREAM_MODEL) -> dict:
    """The served engine's per-step timeline between two scrape_metrics() snapshots (docs/serving.md): steps, host
    time per step (step wall time not in engine calls), the engine's share of the steps, the sender's time per
    response, responses and tokens per step."""
    def d(name: str) -> float:
        key = f'{name}{{model="{model}"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)

    steps, step_s, engine_s = d("lm_scheduler_steps_total"), d("lm_scheduler_step_seconds_total"), \
        d("lm_scheduler_engine_seconds_total")
    responses, send_s, tokens = d("lm_sender_responses_total"), d("lm_sender_seconds_total"), \
        d("lm_scheduler_tokens_total")
    per = (lambda x, n: round(x / n, 6) if n else None)
    return {"steps": int(steps), "step_ms": per(step_s * 1e3, steps), "host_ms_per_step": per((step_s - engine_s) * 1e3, steps),
            "engine_share": per(engine_s, step_s), "send_ms_per_response": per(send_s * 1e3, responses),
            "responses_per_step": per(responses, steps), "tokens_per_step": per(tokens, steps),
            "sender_busy_share": per(send_s, step_s)}
