"""Stage 4c: an OpenAI-compatible HTTP endpoint in front of the Triton server (a thin ASGI gateway).

    python serve/openai_server.py --triton-grpc 127.0.0.1:8001 --port 8080      # foreground; Ctrl-C stops
    make serve-openai                                                          # Triton + this, in the background

Endpoints: POST /v1/completions, POST /v1/chat/completions ("stream": true -> server-sent events ending in
`data: [DONE]`; `stream_options.include_usage` adds a last chunk with usage), GET /v1/models, GET /health.
Request fields: model, prompt | messages, max_tokens (chat also max_completion_tokens), temperature, top_p, seed,
stop (string or list of up to 4), n (1 only), stream, stream_options, ignore_eos (vLLM's extension: run to max_tokens);
structured output: response_format {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema",
"strict"}}, and for chat tools with tool_choice "required" or {"type": "function", "function": {"name"}} (the call's
arguments follow the function's parameter schema, returned as tool_calls); logprobs (chat: logprobs + top_logprobs
<= 20; completions: logprobs = k <= 20), streamed too (docs/structured_output.md). Fields this server cannot honour
(echo, best_of > 1, penalties, logit_bias, tool_choice "auto", ...) are refused with 400 rather than ignored.
Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 malformed JSON, wrong type, value out of
range, prompt over the context; 401 no or a wrong API key (with --api-key); 404 unknown model or path; 413 a body
over --max-body-bytes (read and dropped, never parsed or tokenized); 429 the backend's queue is full ("server busy:
..."); 503 Triton or the model not ready. The server keeps serving after every one of them.

Access: with --api-key KEY (or the environment variable LMOPT_API_KEY, which keeps the key out of `ps`), every /v1/
route wants `Authorization: Bearer KEY` (the `openai` client's api_key); /health stays open for probes, as in
`vllm serve`. Without a key the endpoint is open: it listens on loopback unless --host says otherwise.

How it works: the prompt is tokenized here (chat template from the tokenizer, lmopt.chat) and sent as `input_ids` to
the decoupled model `lm_stream` over Triton's gRPC bidirectional stream (one channel for the process, one stream per
request); each response carries the token ids since the last one, detokenized here and forwarded at once as an SSE
chunk, so usage counts are exact and nothing is buffered. Text and stop strings come from the repository's one output
path (lmopt.detokenize.TextStream: text that may be the start of a stop string is held back until it is not), and
the backend request is cancelled when one matches; the finish reason is the backend's (its last response says why
the request ended), "stop" when a stop string ended the text here.
The prompt of a body over 2 KB is tokenized in a worker thread, so a long prompt never stalls the other requests
(docs/openai_gateway.md, "Limits and access").
Why a gateway and not Triton's own OpenAI frontend: docs/openai_endpoint.md.

Reads:  Triton's config of the served model (its `parameters`: model spec, max_tokens_cap, default_max_tokens), the
        model's tokenizer and config (context length) through lmopt.models
Writes: nothing; logs to stderr
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from lmopt import cli
from lmopt.detokenize import TextStream
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("openai")

BUSY_PREFIX = "server busy: "        # what the backend's bounded queue answers when it is full
API_KEY_ENV = "LMOPT_API_KEY"        # the API key when --api-key is not given (vLLM reads VLLM_API_KEY the same way)
# the prompt of a body up to this size is validated and tokenized on the event loop (<= ~1 ms on 2 CPU cores); of a
# larger one in a worker thread, with the GIL released while the Rust tokenizer runs (lmopt.models.encode):
# docs/openai_gateway.md
INLINE_BODY_BYTES = 2048
# An oversized body is read to its end and dropped before the 413 goes out (up to this much): a server that answers
# and closes while the client is still sending resets the connection, and the client (urllib, aiohttp, the openai
# client send the whole body before they read) sees "connection reset" instead of the 413 (docs/openai_gateway.md)
DRAIN_BYTES = 64 << 20
MAX_STOP_STRINGS = 4                 # OpenAI's limit
_MARK = "\x00text\x00"               # stands for a token's text while an SSE chunk's template is serialized


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"          # address to listen on; loopback unless asked (beyond it, set an API key)
    port: int = 8080                 # the endpoint's TCP port; clear of Triton's 8000, 8001 and 8002
    triton_grpc: str = "127.0.0.1:8001"  # Triton's gRPC address host:port
    triton_model: str = "lm_stream"  # the decoupled model: token responses as tokens come
    served_model_name: str = ""      # the model's id in /v1/models and answers (default: preset/hub id, folder name)
    request_timeout: float = 600.0   # seconds one request may stream before it is cut
    api_key: str = ""                # /v1/ routes want "Authorization: Bearer KEY" (default: $LMOPT_API_KEY)
    max_body_bytes: int = 1 << 20    # a request body over this gets 413, never parsed (1 MiB)


# ---- errors -------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def not_ready(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", None, "backend_not_ready")


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {limit} bytes — send a shorter prompt, or "
                    "start the server with a higher --max-body-bytes", "invalid_request_error", None,
                    "request_too_large")


def unauthorized(given: bool) -> APIError:
    msg = ("incorrect API key provided" if given else
           "no API key provided — send it as the header 'Authorization: Bearer KEY' (the openai client's api_key)")
    return APIError(401, msg, "invalid_request_error", None, "invalid_api_key")


def bearer_ok(headers, key: bytes) -> bool | None:
    """True: the request's `Authorization: Bearer` token is `key`; False: a wrong token; None: none sent."""
    import hmac

    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
    return None


# Texts of the model's own request checks (serve/templates/model.py): the backend streams errors as text only, so
# these identify a client mistake the gateway did not catch first (e.g. an engine whose context is shorter).
_CLIENT_ERROR_TEXTS = ("exceeds the context length", "is above this server's cap", "must be", "empty prompt",
                       "outside the vocabulary", "invalid JSON schema", "a grammar is")


def backend_error(message: str) -> APIError:
    """An error the backend sent for a request, as the status a client should see."""
    msg = message.strip()
    if BUSY_PREFIX in msg:
        return APIError(429, msg[msg.index(BUSY_PREFIX):], "rate_limit_error", None, "server_busy")
    if any(t in msg for t in _CLIENT_ERROR_TEXTS):
        return bad(msg, None, "invalid_value")
    return APIError(500, f"backend error: {msg}", "server_error", None, "backend_error")


# ---- the backend: Triton over gRPC --------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    name: str                 # served model name (what `model` must be)
    spec: str                 # lmopt model spec
    tokenizer: object
    context: int              # prompt + generated tokens
    max_tokens_cap: int
    default_max_tokens: int
    batch_dim: bool = True    # the Triton model has max_batch_size > 0: inputs carry a leading batch dimension
    vocab: int = 0            # len(tokenizer), computed once: transformers rebuilds the vocabulary on every len()
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False   # vLLM's extension: the end-of-sequence token does not end the request
    grammar: str | None = None    # structured output: a lmopt.grammar spec (response_format, forced tool calls)
    logprobs: int | None = None   # k: each token's log-probability and the top k


class TritonBackend:
    """One gRPC channel to Triton for the process; one bidirectional stream per request. Calls Triton's gRPC stub
    (tritonclient's generated service_pb2) directly, with the channel options tritonclient's client uses: requests are
    built as protobufs and token ids read from the responses' raw bytes, without tritonclient's InferInput/InferResult
    and numpy per request and token (lmopt.triton_client.infer_request_pb, parse_response_pb)."""

    def __init__(self, url: str, model: str, served_name: str = "", timeout: float = 600.0):
        self.url, self.model, self.served_name, self.timeout = url, model, served_name, timeout
        self.channel = self.stub = None
        self._info: ModelInfo | None = None
        self._lock = asyncio.Lock()

    async def start(self):
        from lmopt.triton_client import aio_channel

        self.channel, self.stub = aio_channel(self.url)

    async def close(self):
        if self.channel is not None:
            await self.channel.close()

    async def ready(self) -> bool:
        from tritonclient.grpc import service_pb2

        try:
            return bool((await self.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2)).ready
                        and (await self.stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model),
                                                        timeout=2)).ready)
        except Exception:
            return False

    async def _model_config(self) -> dict:
        """Triton's config of the served model as JSON (what tritonclient's get_model_config(as_json=True) gives)."""
        import grpc
        from google.protobuf import json_format
        from tritonclient.grpc import service_pb2

        try:
            resp = await self.stub.ModelConfig(service_pb2.ModelConfigRequest(name=self.model), timeout=5)
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(f"[{e.code()}] {e.details()}") from None
        return json_format.MessageToDict(resp.config, preserving_proto_field_name=True)

    async def info(self) -> ModelInfo:
        """Model settings from Triton's config of the served model, loaded once (when the backend first answers)."""
        if self._info is not None:
            return self._info
        async with self._lock:
            if self._info is None:
                if not await self.ready():
                    raise not_ready(f"Triton at {self.url} or its model '{self.model}' is not ready")
                try:
                    cfg = await self._model_config()
                except Exception as e:
                    raise not_ready(f"cannot read the config of '{self.model}' from Triton at {self.url}: "
                                    f"{str(e).strip()[:200]}") from None
                params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
                self._info = await asyncio.to_thread(_load_info, params, self.served_name)
                self._info.batch_dim = int(cfg.get("max_batch_size", 0)) > 0
                log.info("serving '%s' (context %d tokens, max_tokens cap %d) from Triton model '%s' at %s",
                         self._info.name, self._info.context, self._info.max_tokens_cap, self.model, self.url)
        return self._info

    async def generate(self, prompt_ids: list[int], p: GenParams) -> AsyncIterator:
        """The backend's responses as lmopt.triton_client.Piece (token ids; the last one with the finish reason).
        Raises APIError. Leaving the loop early (client gone, stop string) cancels the request on the server."""
        import contextlib

        import grpc

        from lmopt.triton_client import GenRequest, StreamError, infer_request_pb, stream_pb

        # the model stops on one string itself; several are matched (and the request cancelled) here
        req = GenRequest(input_ids=prompt_ids, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                         seed=p.seed, stop=p.stop[0] if len(p.stop) == 1 else None,
                         ignore_eos=True if p.ignore_eos else None, grammar=p.grammar, logprobs=p.logprobs)
        item = infer_request_pb(req, os.urandom(8).hex(), self.model, self._info.batch_dim)
        try:
            # aclosing: leaving this loop early cancels the request in Triton at once, not when the GC gets to it
            async with contextlib.aclosing(stream_pb(self.stub, item, self.timeout)) as pieces:
                async for piece in pieces:
                    if piece.token_ids or piece.finish_reason:
                        yield piece
        except StreamError as e:
            raise backend_error(str(e)) from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise not_ready(f"Triton at {self.url} is not reachable: {e.details()}") from None
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise APIError(504, f"request took longer than {self.timeout:g} s", "server_error", None,
                               "timeout") from None
            raise backend_error(f"{e.code().name}: {e.details()}") from None


def _load_info(params: dict, served_name: str) -> ModelInfo:
    from lmopt.models import load_config, load_tokenizer, model_shape

    spec = params.get("model") or "tiny"
    tok = load_tokenizer(spec)
    try:
        context = int(model_shape(load_config(spec))["max_positions"])
    except UserError:
        context = int(getattr(tok, "model_max_length", 0) or 2048)
    return ModelInfo(name=served_name or default_served_name(spec), spec=spec, tokenizer=tok, context=context,
                     vocab=len(tok), max_tokens_cap=int(params.get("max_tokens_cap") or 256),
                     default_max_tokens=int(params.get("default_max_tokens") or 16))


def default_served_name(spec: str) -> str:
    """The model's id on the endpoint when --served-model-name is not given: a preset or hub id as is, a local folder
    by its folder name (its path is this machine's business, and changes when the folder moves)."""
    from lmopt.models import classify

    m = classify(spec)  # the name only: no hub lookup
    return m.path.name if m.kind == "local" and m.path is not None else spec


# ---- request validation -------------------------------------------------------------------------------------------
@dataclass
class Job:
    chat: bool
    prompt_ids: list[int]
    params: GenParams
    stream: bool
    include_usage: bool
    tool: tuple[str, str] | None = None   # a forced tool call: ("named", function name) or ("required", "")


_UNSUPPORTED = {  # field: value that means "off" (anything else is refused, not silently ignored)
    "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "functions": (None, []), "function_call": (None,),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    return body


def check_model(body: dict, info: ModelInfo) -> None:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise bad("'model' is required: a string, the id from GET /v1/models", "model", "missing_model")
    if m != info.name:
        raise APIError(404, f"the model '{m}' does not exist — this server serves '{info.name}'",
                       "invalid_request_error", "model", "model_not_found")


def parse_job(body: dict, info: ModelInfo, chat: bool) -> Job:
    for k, off in _UNSUPPORTED.items():
        if k in body and body[k] not in off:
            raise bad(f"'{k}' is not supported by this server — leave it out", k, "unsupported_parameter")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad(f"'n' must be 1 (got {n!r}): this server returns one choice per request", "n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false (got {stream!r})", "stream", "invalid_type")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not stream:
            raise bad("'stream_options' is only allowed with \"stream\": true", "stream_options")
        if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
            raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options",
                      "invalid_type")
        include_usage = so.get("include_usage", False)

    ids = _chat_ids(body, info) if chat else _prompt_ids(body, info)
    room = info.context - len(ids)
    if room <= 0:   # before the vocabulary scan: a huge prompt is refused without a Python loop over its ids
        raise bad(f"the prompt has {len(ids)} tokens, at or over the model's context of {info.context} — "
                  "shorten it", "messages" if chat else "prompt", "context_length_exceeded")
    vocab = info.vocab or len(info.tokenizer)
    if any(not 0 <= t < vocab for t in ids):
        raise bad(f"the prompt holds a token id outside the vocabulary [0, {vocab})", "prompt")

    key = "max_tokens"
    mt = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        key, mt = "max_completion_tokens", body["max_completion_tokens"]
    if mt is None:
        mt = min(info.default_max_tokens, room)
    elif not _is_int(mt):
        raise bad(f"'{key}' must be an integer (got {mt!r})", key, "invalid_type")
    elif mt < 1:
        raise bad(f"'{key}' must be >= 1 (got {mt})", key)
    elif mt > info.max_tokens_cap:
        raise bad(f"'{key}' {mt} is above this server's cap of {info.max_tokens_cap}", key)
    elif len(ids) + mt > info.context:
        raise bad(f"the prompt has {len(ids)} tokens + {key} {mt} = {len(ids) + mt}, over the model's context of "
                  f"{info.context} — shorten the prompt or lower {key}", key, "context_length_exceeded")

    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default: sampling
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad("'top_p' must be in (0, 1] (got 0)", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad(f"'seed' must be an integer (got {seed!r})", "seed", "invalid_type")
    if seed is not None and not -2**63 <= seed < 2**63:
        raise bad("'seed' must fit in 64 bits", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise bad(f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS}", "stop")
        stops = tuple(s for s in stop if s)
    else:
        raise bad(f"'stop' must be a string or a list of strings (got {stop!r})", "stop", "invalid_type")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad(f"'ignore_eos' must be true or false (got {ignore_eos!r})", "ignore_eos", "invalid_type")
    grammar = _response_format(body)
    tool = None
    if chat:
        tool_grammar, tool = _tool_choice(body, info)
        if tool_grammar is not None:
            if grammar is not None:
                raise bad("a forced tool call and a JSON 'response_format' cannot both constrain one answer — send "
                          "one of them", "response_format")
            grammar = tool_grammar
    elif body.get("tools") not in (None, []):
        raise bad("'tools' belongs to /v1/chat/completions", "tools", "unsupported_parameter")
    return Job(chat, ids, GenParams(mt, float(temperature), float(top_p), seed, stops, ignore_eos, grammar,
                                    _logprobs(body, chat)), stream, include_usage, tool)


def _logprobs(body: dict, chat: bool) -> int | None:
    """k of GenParams.logprobs: chat's logprobs (bool) + top_logprobs (0..20); completions' logprobs (int 0..20)."""
    from lmopt.generate import MAX_TOP_LOGPROBS

    lp = body.get("logprobs")
    if chat:
        top = body.get("top_logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise bad(f"'logprobs' must be true or false (got {lp!r})", "logprobs", "invalid_type")
        if top is not None:
            if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
                raise bad(f"'top_logprobs' must be an integer between 0 and {MAX_TOP_LOGPROBS} (got {top!r})",
                          "top_logprobs")
            if not lp:
                raise bad("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
        return (top or 0) if lp else None
    if body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' belongs to chat; completions take 'logprobs': k", "top_logprobs",
                  "unsupported_parameter")
    if lp is None:
        return None
    if not _is_int(lp) or not 0 <= lp <= MAX_TOP_LOGPROBS:
        raise bad(f"'logprobs' must be an integer between 0 and {MAX_TOP_LOGPROBS} (got {lp!r})", "logprobs")
    return lp


def _checked_spec(spec: str, param: str) -> str:
    from lmopt.grammar import check_spec

    try:
        check_spec(spec)
    except UserError as e:
        raise bad(f"'{param}': {e}", param) from None
    return spec


def _response_format(body: dict) -> str | None:
    """The grammar spec of `response_format` (None: free text)."""
    from lmopt.grammar import json_object_spec, json_schema_spec

    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_spec()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise bad("'response_format': json_schema must be an object like {\"name\": ..., \"schema\": {...}, "
                      "\"strict\": true}", "response_format", "invalid_type")
        if not isinstance(js.get("name", ""), str) or not isinstance(js.get("strict", False) or False, bool):
            raise bad("'response_format': json_schema's name is a string and strict a boolean", "response_format",
                      "invalid_type")
        # strict or not, the output follows the schema (as vLLM does): constraining costs nothing extra here
        return _checked_spec(json_schema_spec(js.get("schema") or {"type": "object"}), "response_format")
    raise bad(f"'response_format' type must be text, json_object or json_schema (got {kind!r})", "response_format")


def _tool_choice(body: dict, info: ModelInfo) -> tuple[str | None, tuple[str, str] | None]:
    """(grammar spec, ("named", name) | ("required", "")) of a forced tool call; (None, None) without one."""
    from lmopt.grammar import json_schema_spec

    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return None, None
    if not isinstance(tools, list):
        raise bad("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools", "invalid_type")
    fns = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                      "\"parameters\": {...}}}", f"tools[{i}]", "invalid_type")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}]")
        fns[fn["name"]] = params
    if choice is None or choice == "auto":
        from lmopt.chat import template_supports_tools

        why = ("this server has no parser that finds tool calls in free text" if template_supports_tools(info.tokenizer)
               else "the model's chat template does not render tools")
        raise bad(f"tool_choice \"auto\" (the default with 'tools') is not supported: {why} — send tool_choice "
                  "\"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}, or \"none\"",
                  "tool_choice", "unsupported_value")
    if choice == "none":
        return None, None
    if choice == "required":
        one = [{"type": "object", "properties": {"name": {"const": n}, "arguments": p},
                "required": ["name", "arguments"], "additionalProperties": False} for n, p in fns.items()]
        schema = one[0] if len(one) == 1 else {"anyOf": one}
        return _checked_spec(json_schema_spec(schema), "tools"), ("required", "")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise bad("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                  "\"function\": {\"name\": ...}}", "tool_choice", "invalid_type")
    if name not in fns:
        raise bad(f"tool_choice names the function '{name}', which is not in 'tools'", "tool_choice")
    return _checked_spec(json_schema_spec(fns[name]), "tools"), ("named", name)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not _is_num(v):
        raise bad(f"'{key}' must be a number (got {v!r})", key, "invalid_type")
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be between {lo:g} and {hi:g} (got {v})", key)
    return float(v)


def _prompt_ids(body: dict, info: ModelInfo) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise bad("'prompt' is empty — give some text", "prompt")
        from lmopt.models import encode

        return encode(info.tokenizer, p)
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return list(p)
    if isinstance(p, list) and len(p) > 1:
        raise bad("'prompt' holds several prompts; this server takes one per request", "prompt")
    raise bad("'prompt' must be a string or a list of token ids", "prompt",
              "missing_prompt" if p is None else "invalid_type")


def _chat_ids(body: dict, info: ModelInfo) -> list[int]:
    from lmopt.chat import ROLES, chat_prompt_ids

    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                  "missing_messages" if msgs is None else "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] needs a 'role' (one of {', '.join(ROLES)})", f"messages[{i}].role")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str) for x in c):
                raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            c = "".join(x["text"] for x in c)
        if c is None and m["role"] == "assistant":
            c = ""
        if not isinstance(c, str):
            raise bad(f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
        out.append({"role": m["role"], "content": c})
    tools = body.get("tools") if isinstance(body.get("tools"), list) and body.get("tool_choice") != "none" else None
    try:
        return chat_prompt_ids(info.tokenizer, out, tools)
    except Exception as e:  # a template that refuses this conversation (e.g. roles out of order)
        raise bad(f"the model's chat template refused these messages: {str(e).strip()[:200]}", "messages") from None


# ---- responses ----------------------------------------------------------------------------------------------------
def _usage(job: Job, n_out: int) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n_out,
            "total_tokens": len(job.prompt_ids) + n_out}


def _finish_reason(text: TextStream, backend_reason: str | None) -> str:
    """The backend's word (its last response says why the request ended), "stop" when a stop string ended the text
    here (the backend request was then cancelled)."""
    if backend_reason is None and not text.stopped:
        raise backend_error("the backend's last response carries no finish_reason — regenerate the model repository "
                            "(make serve)")
    return text.finish_reason(backend_reason or "cancelled")


async def run_job(backend: TritonBackend, info: ModelInfo, job: Job):
    """Starts the backend request and waits for its first response, so an error before the first token still gets
    its own HTTP status. Returns (first response, the rest of the backend iterator)."""
    it = backend.generate(job.prompt_ids, job.params).__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await it.aclose()
        raise
    return first, it


def _token_text(info: ModelInfo, t: int) -> str:
    cache = info.__dict__.setdefault("_token_texts", {})
    s = cache.get(t)
    if s is None:
        s = cache[t] = info.tokenizer.decode([t])
    return s


def _logprobs_chat(info: ModelInfo, entries: list) -> list[dict]:
    """OpenAI's chat `logprobs.content` items of (token id, logprob, [(id, logprob)...]) entries."""
    def item(t, lp):
        s = _token_text(info, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return [dict(item(t, lp), top_logprobs=[item(u, v) for u, v in top]) for t, lp, top in entries]


def _logprobs_completion(info: ModelInfo, entries: list, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset); `offset`: where
    this piece starts in the whole text (streamed chunks)."""
    toks = [_token_text(info, t) for t, _, _ in entries]
    offsets, at = [], offset
    for s in toks:
        offsets.append(at)
        at += len(s)
    return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{_token_text(info, u): v for u, v in top} for _, _, top in entries],
            "text_offset": offsets}


def _entries(piece) -> list:
    """(token id, logprob, top) of each token of a backend response that carries logprobs."""
    if piece.logprobs is None:
        return []
    tops = piece.top_logprobs or [[] for _ in piece.logprobs]
    return list(zip(piece.token_ids, piece.logprobs, tops))


def _tool_calls(job: Job, text: str) -> list[dict]:
    """OpenAI `tool_calls` of a forced call's output: the named function with `text` as its arguments, or the
    {"name", "arguments"} object a "required" call wrote (the text as is when it is incomplete)."""
    cid = "call_" + os.urandom(12).hex()
    if job.tool[0] == "named":
        return [{"id": cid, "type": "function", "function": {"name": job.tool[1], "arguments": text}}]
    try:
        call = json.loads(text)
        name, args = call["name"], json.dumps(call["arguments"], separators=(",", ":"), ensure_ascii=False)
    except (ValueError, KeyError, TypeError):   # cut by max_tokens: finish_reason "length" says so
        name, args = "", text
    return [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}]


def _tool_reason(job: Job, reason: str) -> str:
    """A "required" call that completed ends with "tool_calls"; a named one with "stop" (OpenAI's and vLLM's)."""
    return "tool_calls" if job.tool is not None and job.tool[0] == "required" and reason == "stop" else reason


async def complete(backend: TritonBackend, info: ModelInfo, job: Job) -> dict:
    first, it = await run_job(backend, info, job)
    text = TextStream(info.tokenizer, job.prompt_ids, job.params.stop)
    pieces, n_out, reason, lps = [], 0, None, []
    try:
        piece = first
        while piece is not None:
            pieces.append(text.add_many(piece.token_ids))
            n_out = len(text.tokens)     # none after a stop string's end, also within one response
            lps.extend(_entries(piece))
            reason = piece.finish_reason or reason
            if text.stopped:
                break
            try:
                piece = await it.__anext__()
            except StopAsyncIteration:
                break
    finally:
        await it.aclose()
    pieces.append(text.finish())
    out = "".join(pieces)
    rid, created = os.urandom(16).hex(), int(time.time())
    reason = _finish_reason(text, reason)
    lps = lps[:n_out] if job.params.logprobs is not None else None
    if job.chat:
        message = {"role": "assistant", "content": out}
        if job.tool is not None:
            message = {"role": "assistant", "content": None, "tool_calls": _tool_calls(job, out)}
            reason = _tool_reason(job, reason)
        choice = {"index": 0, "message": message,
                  "logprobs": None if lps is None else {"content": _logprobs_chat(info, lps), "refusal": None},
                  "finish_reason": reason}
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": info.name,
                "choices": [choice], "usage": _usage(job, n_out), "system_fingerprint": None}
    choice = {"index": 0, "text": out, "logprobs": None if lps is None else _logprobs_completion(info, lps),
              "finish_reason": reason}
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": info.name,
            "choices": [choice], "usage": _usage(job, n_out), "system_fingerprint": None}


async def stream_events(info: ModelInfo, job: Job, first, it) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per piece of text as soon as its token arrives, then finish_reason, usage
    (with include_usage) and `data: [DONE]`. Closing this generator (client gone) cancels the backend request."""
    rid, created = os.urandom(16).hex(), int(time.time())
    base = ({"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk"} if job.chat
            else {"id": f"cmpl-{rid}", "object": "text_completion"})
    base.update(created=created, model=info.name, system_fingerprint=None)

    sent = [0]                   # characters of text sent so far (completions' logprobs text_offset)

    def chunk(piece: str | None, reason: str | None, first_chunk: bool = False, lps=None, delta=None) -> bytes:
        if job.chat:
            if delta is None:
                delta = {} if piece is None else ({"role": "assistant", "content": piece} if first_chunk
                                                  else {"content": piece})
            logprobs = None if lps is None else {"content": _logprobs_chat(info, lps), "refusal": None}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            logprobs = None if lps is None else _logprobs_completion(info, lps, sent[0])
            sent[0] += len(piece or "")
            choice = {"index": 0, "text": piece or "", "logprobs": logprobs, "finish_reason": reason}
        ev = dict(base, choices=[choice])
        if job.include_usage:
            ev["usage"] = None
        return b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"

    # the chunk of each token's text, the same bytes as chunk(piece, None): serialized once around a marker, the
    # text spliced in (a JSON string encodes the same alone as inside its object)
    head, tail = chunk(_MARK, None).split(json.dumps(_MARK).encode())

    sent[0] = 0

    def text_chunk(piece: str) -> bytes:
        sent[0] += len(piece)
        return head + json.dumps(piece).encode() + tail

    # structured: a chunk is made whole for logprobs (each chunk has those of its tokens) and tool calls (the text
    # is the call's arguments: named, streamed as tool_calls deltas; "required", sent whole at the end, once parsed)
    tool, want_lp = job.tool, job.params.logprobs is not None
    buffered: list[str] = []

    def out_chunk(piece: str, lps) -> bytes | None:
        if tool is not None and tool[0] == "required":
            buffered.append(piece)
            return chunk(None, None, lps=lps, delta={}) if lps else None
        if tool is not None:
            return chunk(None, None, lps=lps, delta={"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        if not want_lp:
            return text_chunk(piece) if piece else None
        return chunk(piece, None, lps=lps) if piece or lps else None

    text = TextStream(info.tokenizer, job.prompt_ids, job.params.stop)
    n_out, reason = 0, None
    try:
        if job.chat:
            if tool is not None and tool[0] == "named":
                call = {"index": 0, "id": "call_" + os.urandom(12).hex(), "type": "function",
                        "function": {"name": tool[1], "arguments": ""}}
                yield chunk(None, None, delta={"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                yield chunk("", None, first_chunk=True)
        resp = first
        while resp is not None:
            before = len(text.tokens)
            piece = text.add_many(resp.token_ids)
            n_out = len(text.tokens)     # none after a stop string's end, also within one response
            c = out_chunk(piece, _entries(resp)[:n_out - before] if want_lp else None)
            if c is not None:
                yield c
            reason = resp.finish_reason or reason
            if text.stopped:
                break
            try:
                resp = await it.__anext__()
            except StopAsyncIteration:
                break
        reason = _finish_reason(text, reason)
    except APIError as e:  # mid-stream: the status line is gone, the error travels as an event
        yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
        return
    finally:
        await it.aclose()
    rest = text.finish()
    if rest:
        c = out_chunk(rest, [] if want_lp else None)
        if c is not None:
            yield c
    if tool is not None and tool[0] == "required":
        calls = [dict(c, index=i) for i, c in enumerate(_tool_calls(job, "".join(buffered)))]
        yield chunk(None, None, delta={"tool_calls": calls})
    if tool is not None:
        reason = _tool_reason(job, reason)
    yield chunk(None, reason)
    if job.include_usage:
        yield b"data: " + json.dumps(dict(base, choices=[], usage=_usage(job, n_out)),
                                     separators=(",", ":")).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


# ---- the ASGI app -------------------------------------------------------------------------------------------------
def create_app(backend, settings: GatewaySettings | None = None):
    """The Starlette app over `backend` (a TritonBackend, or anything with the same start/close/ready/info/generate
    methods: the tests use a stub)."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    s = settings or GatewaySettings()
    max_body, api_key = s.max_body_bytes, s.api_key.encode()
    # long prompts are tokenized here, off the event loop (two at a time: they are rare, and each holds a core)
    prompt_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prompt")

    def error(e: APIError):
        headers = ({"Retry-After": "1"} if e.status == 429 else {"WWW-Authenticate": "Bearer"} if e.status == 401
                   else None)
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    class EventStream(StreamingResponse):
        """Server-sent events written from the request's own task, and a watcher task that cancels it when the
        client disconnects. (Starlette's StreamingResponse, under uvicorn's ASGI spec 2.3, writes from a new task
        of an anyio task group instead: measured 0.25-0.5 ms more to the first token on 2 CPU cores.) Cancelling
        the stream closes the events generator, which cancels the backend request."""

        async def stream_response(self, send):
            # the first chunk (its token has arrived) is made before the status line is sent, so the two writes
            # leave back to back instead of the client waking for the headers while the chunk is being made
            chunks = self.body_iterator.__aiter__()
            first = await anext(chunks, None)
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if first is not None:
                await send({"type": "http.response.body", "body": first, "more_body": True})
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def __call__(self, scope, receive, send):
            task = asyncio.current_task()
            state = {"streaming": True, "gone": False}

            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                if state["streaming"]:
                    state["gone"] = True
                    task.cancel()

            watcher = asyncio.get_running_loop().create_task(watch())
            try:
                await self.stream_response(send)
            except asyncio.CancelledError:
                if not state["gone"]:
                    raise
                task.uncancel()  # our own cancellation, done with: the request ends quietly
            finally:
                state["streaming"] = False
                watcher.cancel()
                await self.body_iterator.aclose()

    async def health(request: Request):
        if await backend.ready():
            return JSONResponse({"status": "ok"})
        return error(not_ready("the backend (Triton or its model) is not ready"))

    async def models(request: Request):
        try:
            info = await backend.info()
        except APIError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": info.name, "object": "model", "created": info.created, "owned_by": "lmopt",
             "max_model_len": info.context}]})

    def endpoint(chat: bool):
        """POST /v1/completions or /v1/chat/completions as a bare ASGI app: the gateway calls it without Starlette's
        middleware, routing and Request object in between (they are most of the per-request Python outside the
        backend's work: each layer is another coroutine and closure run cold at one stream)."""
        async def handle(scope, receive, send):
            path = scope["path"]
            try:
                try:
                    for name, value in scope["headers"]:   # a declared size over the limit: 413, nothing parsed
                        if name == b"content-length":
                            if value.isdigit() and int(value) > DRAIN_BYTES:
                                raise too_large(max_body)     # too large even to drop: answered, then reset
                            break
                    raw, size = [], 0
                    while True:
                        m = await receive()
                        if m["type"] == "http.disconnect":
                            return                    # the client left before its body arrived: nobody to answer
                        chunk = m.get("body", b"")
                        size += len(chunk)
                        if size > DRAIN_BYTES:
                            raise too_large(max_body)
                        if size <= max_body:          # past the limit the rest is read and dropped, never kept
                            raw.append(chunk)
                        if not m.get("more_body"):
                            break
                    if size > max_body:
                        raise too_large(max_body)
                    body = parse_body(b"".join(raw))
                    info = await backend.info()
                    check_model(body, info)
                    if size <= INLINE_BODY_BYTES:
                        job = parse_job(body, info, chat)
                    else:  # a prompt that takes long to tokenize: the event loop serves the other requests meanwhile
                        job = await asyncio.get_running_loop().run_in_executor(prompt_pool, parse_job, body, info,
                                                                               chat)
                    if not job.stream:
                        response = JSONResponse(await complete(backend, info, job))
                    else:
                        first, it = await run_job(backend, info, job)
                        response = EventStream(stream_events(info, job, first, it), media_type="text/event-stream",
                                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                except APIError as e:
                    if e.status >= 500:
                        log.warning("%s: %s", path, e.message)
                    response = error(e)
            except Exception as exc:  # what Starlette's error middleware does for the other routes
                log.exception("unexpected error on %s", path)
                response = error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None,
                                          None))
            await response(scope, receive, send)
        return handle

    async def http_error(request: Request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        msg = (f"no route {request.method} {request.url.path} — this server has POST /v1/completions, "
               "POST /v1/chat/completions, GET /v1/models, GET /health")
        return error(APIError(exc.status_code, msg, "invalid_request_error", None, kind))

    async def server_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None, None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await backend.start()
        try:
            await backend.info()  # tokenizer loaded before the first request, when Triton is up already
        except APIError as e:
            log.warning("%s — requests get 503 until it is", e.message)
        yield
        await backend.close()
        prompt_pool.shutdown(wait=False, cancel_futures=True)

    class ASGIEndpoint:      # a callable that is no function: Starlette routes to it as an ASGI app, not a handler
        def __init__(self, handle):
            self.handle = handle

        async def __call__(self, scope, receive, send):
            await self.handle(scope, receive, send)

    # the two POST routes go to their endpoints straight from `gateway` below; they are in Starlette's routes too, so
    # that another method on them gets its 405 (http_error)
    fast = {"/v1/completions": endpoint(False), "/v1/chat/completions": endpoint(True)}
    routes = [*(Route(p, ASGIEndpoint(h), methods=["POST"]) for p, h in fast.items()),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})

    async def gateway(scope, receive, send):
        if scope["type"] == "http":
            if api_key and scope["path"].startswith("/v1") and not (ok := bearer_ok(scope["headers"], api_key)):
                return await error(unauthorized(ok is not None))(scope, receive, send)   # the body is never read
            if scope["method"] == "POST" and (h := fast.get(scope["path"])) is not None:
                return await h(scope, receive, send)
        return await app(scope, receive, send)
    return gateway


def serve(*, settings: GatewaySettings) -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"missing {e.name} — run: pip install -r requirements.txt") from None
    s = replace(settings, api_key=settings.api_key or os.environ.get(API_KEY_ENV, ""))
    if not 0 < s.port < 65536:
        raise UserError(f"--port {s.port} is not a TCP port — pick one in 1..65535")
    if s.max_body_bytes < 1:
        raise UserError(f"--max-body-bytes must be >= 1 (got {s.max_body_bytes})")
    _check_port_free(s.host, s.port)
    if s.api_key:
        log.info("/v1/ routes want the API key (from %s)", "--api-key" if settings.api_key else f"${API_KEY_ENV}")
    elif not _is_loopback(s.host):
        log.warning("listening on %s without an API key: anyone who reaches port %d can use it — set %s (or "
                    "--api-key)", s.host, s.port, API_KEY_ENV)
    backend = TritonBackend(s.triton_grpc, s.triton_model, s.served_model_name, s.request_timeout)
    loop, http = _io_implementations()
    log.info("OpenAI-compatible endpoint: http://%s:%d/v1 -> Triton gRPC %s (model %s); event loop %s, HTTP %s",
             s.host, s.port, s.triton_grpc, s.triton_model, loop, http)
    # no proxy headers: nothing here uses the client's address, and the middleware is one more layer per request
    # the status line leaves with the first chunk (JoinedWrites)
    uvicorn.run(create_app(backend, s), host=s.host, port=s.port, loop=loop, http=joined_head_protocol(http),
                log_level="warning", access_log=False, proxy_headers=False, timeout_graceful_shutdown=5)


class JoinedWrites:
    """A transport whose write of an HTTP status line and headers is held back and sent together with the next write
    (the response's first body chunk, which the gateway has ready when it starts a response), or on the event loop's
    next turn if no write follows at once. uvicorn writes the status line and each body chunk with a `write` of
    their own, so the client gets the headers in one TCP segment and wakes for them, then the first token in
    another; joined, both leave with one `send()`. The order of bytes never changes. Everything but write and close
    is the transport's own."""

    __slots__ = ("_t", "_loop", "_held")

    def __init__(self, transport, loop):
        self._t, self._loop, self._held = transport, loop, None

    def write(self, data) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
            self._t.write(data)
        elif data[:5] == b"HTTP/":
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._t.write(data)

    def flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            if not self._t.is_closing():
                self._t.write(data)

    def close(self) -> None:
        self.flush()
        self._t.close()

    def __getattr__(self, name):
        return getattr(self._t, name)


def joined_head_protocol(http: str):
    """uvicorn's HTTP protocol class for `http` ("httptools" or "h11") writing through JoinedWrites."""
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class JoinedHeadProtocol(Base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.transport = JoinedWrites(transport, self.loop)   # what each request's response cycle writes to

    return JoinedHeadProtocol


def _io_implementations() -> tuple[str, str]:
    """uvicorn's event loop and HTTP/1.1 parser: uvloop and httptools (requirements.txt; C, each request and token
    costs less Python) when installed, else the pure-Python asyncio loop and h11 with a warning."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if (loop, http) != ("uvloop", "httptools"):
        log.warning("uvloop or httptools is not installed: serving with %s and %s, slower per request and token "
                    "(pip install -r requirements.txt)", loop, http)
    return loop, http


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_port_free(host: str, port: int) -> None:
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"--port {port} on {host} is in use ({e.strerror}) — pick a free port with --port "
                        "(make serve-openai: OPENAI_PORT=...)") from None
    finally:
        sock.close()


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, GatewaySettings)
    return p


main = cli.main_for(build_parser, GatewaySettings, serve)

if __name__ == "__main__":
    cli.run(main)
