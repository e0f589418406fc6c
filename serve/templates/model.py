"""Triton Python-backend model: runs the pipeline's engine (lmopt.engines) through the shared generation loop
(lmopt.generate). Generated into the model repository by serve/make_model_repository.py; do not edit the copy.

The same file serves both models; config.pbtxt decides which:
  lm         non-streaming: one response per request with the full text; Triton's dynamic batcher hands execute()
             several requests, which run as ONE batched generation (left padding, per-row sampling settings).
  lm_stream  decoupled: one response per generated token, then an empty response flagged FINAL; requests batched
             the same way; a cancelled request (client gone, stream closed) stops its row at the next token.

Inputs  (per request; batch dim added by Triton): text_input STRING [1] or input_ids INT64 [-1] (the prompt already
        tokenized; exactly one of the two); optional max_tokens INT32 [1], temperature FP32 [1], top_k INT32 [1],
        top_p FP32 [1], seed INT64 [1], stop STRING [1]
Outputs: text_output STRING [1] (lm: full text; lm_stream: this token's text; only for text_input requests),
         token_ids INT64 [-1]
A request that sends input_ids gets token_ids only: no STRING tensor crosses the backend boundary. That is the path
that works with Triton 2.51's Python-backend stub on the GPU machine we measured, where decoding a STRING input
crashed the stub (results/nvidia-h200/triton-gpu-attempt.log).

Settings come from config.pbtxt `parameters` (engine, precision, device, artifacts, model, max_tokens_cap, ...).
"""
import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


def _param(cfg, name, default=None):
    p = cfg.get("parameters", {}).get(name)
    return p["string_value"] if p and p.get("string_value", "") != "" else default


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        from lmopt.engines import create_engine
        from lmopt.models import load_tokenizer

        self.logger = pb_utils.Logger
        self.spec = _param(cfg, "model")
        device = _param(cfg, "device", "cpu")
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}" if _param(cfg, "engine") == "torch" else "cuda"
        threads = int(_param(cfg, "threads", "0")) or None
        self.engine = create_engine(_param(cfg, "engine"), self.spec, _param(cfg, "precision"), device=device,
                                    artifacts=_param(cfg, "artifacts"), threads=threads)
        self.tokenizer = load_tokenizer(self.spec)
        self.max_tokens_cap = int(_param(cfg, "max_tokens_cap"))
        self.default_max_tokens = int(_param(cfg, "default_max_tokens"))
        self.use_dlpack = _dlpack_choice(_param(cfg, "output_transport", "auto"))
        self.lock = threading.Lock()
        self.logger.log_info(f"{self.model_name}: {self.engine.info} decoupled={self.decoupled} "
                             f"outputs via {'DLPack' if self.use_dlpack else 'numpy'}")

    # ---- outputs: the one place that decides DLPack or numpy ---------------------------------------------------
    def _ids_tensor(self, ids):
        """token_ids output. DLPack first: on the GPU machines numpy-built outputs failed (docs/ENVIRONMENT.md, "Triton Inference Server without a container")."""
        arr = np.asarray(ids, dtype=np.int64)
        if self.use_dlpack:
            import torch

            return pb_utils.Tensor.from_dlpack("token_ids", torch.from_numpy(arr.copy()))
        return pb_utils.Tensor("token_ids", arr)

    def _values(self, t):
        """A numeric input as a flat numpy array, read through DLPack when outputs use it too (the path that worked
        on the GPU machine); STRING tensors have no DLPack form and always come through as_numpy()."""
        if self.use_dlpack:
            try:
                import torch

                return torch.utils.dlpack.from_dlpack(t.to_dlpack()).reshape(-1).cpu().numpy()
            except Exception:  # BYTES tensors (and older stubs) have no DLPack export
                pass
        return t.as_numpy().reshape(-1)

    def _response(self, text, ids, batched):
        """`text` None (an input_ids request): token_ids only."""
        ids = list(ids)
        if batched:  # max_batch_size > 0: outputs carry the batch dim of the request (1)
            ids = [ids]
        outputs = [self._ids_tensor(ids)]
        if text is not None:
            # BYTES (string) tensors have no DLPack form: text is always a numpy object array
            t = np.array([text.encode("utf-8")], dtype=np.object_)
            outputs.insert(0, pb_utils.Tensor("text_output", t.reshape(1, 1) if batched else t))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    # ---- request parsing: every problem becomes an error response naming it -------------------------------------
    def _parse(self, request):
        from lmopt.generate import SamplingParams

        def scalar(name, default):
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                return default
            a = self._values(t)
            if a.size != 1:
                raise ValueError(f"input '{name}' must hold one value per request, got {a.size}")
            v = a[0]
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v

        id_tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
        text = scalar("text_input", None)
        if id_tensor is not None and text is not None:
            raise ValueError("send the prompt once: either 'text_input' or 'input_ids', not both")
        if id_tensor is not None:
            prompt_ids = [int(x) for x in self._values(id_tensor)]
            vocab = self.engine.info.vocab_size
            if not prompt_ids:
                raise ValueError("empty prompt: 'input_ids' holds no token")
            if vocab > 0 and not all(0 <= t < vocab for t in prompt_ids):
                raise ValueError(f"'input_ids' holds a token id outside the vocabulary [0, {vocab})")
        elif text is None or not str(text).strip():
            raise ValueError("empty prompt: 'text_input' must contain some text")
        max_tokens = int(scalar("max_tokens", self.default_max_tokens))
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0 (got {max_tokens})")
        if max_tokens > self.max_tokens_cap:
            raise ValueError(f"max_tokens {max_tokens} is above this server's cap of {self.max_tokens_cap}")
        stop = scalar("stop", "")
        seed = scalar("seed", None)
        p = SamplingParams(max_new_tokens=max_tokens, temperature=float(scalar("temperature", 0.0)),
                           top_k=int(scalar("top_k", 0)), top_p=float(scalar("top_p", 1.0)),
                           seed=None if seed is None else int(seed),
                           stop_token_ids=(self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None
                           else (), stop_strings=(stop,) if stop else ())
        try:
            p.check()
        except Exception as e:  # lmopt.errors.UserError: its message already names the field
            raise ValueError(str(e)) from None
        ids = prompt_ids if id_tensor is not None else self.tokenizer(str(text))["input_ids"]
        ctx = self.engine.info.max_positions
        if len(ids) + max_tokens > ctx:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the context length {ctx}")
        return ids, p, id_tensor is None

    def execute(self, requests):
        from lmopt.generate import generate

        batched = True  # both configs set max_batch_size > 0 (dynamic batching)
        senders = [r.get_response_sender() for r in requests] if self.decoupled else None
        responses = [None] * len(requests)
        rows, prompts, params, wants_text = [], [], [], []
        for i, r in enumerate(requests):
            try:
                ids, p, want_text = self._parse(r)
                rows.append(i), prompts.append(ids), params.append(p), wants_text.append(want_text)
            except ValueError as e:
                err = pb_utils.InferenceResponse(error=_invalid_arg(str(e)))
                if self.decoupled:
                    senders[i].send(err, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    responses[i] = err
        if rows:
            tok = self.tokenizer
            emitted = [""] * len(rows)
            cancelled = [False] * len(rows)

            def on_token(r, token):
                req = requests[rows[r]]
                if _is_cancelled(req, senders[rows[r]] if senders else None):
                    cancelled[r] = True
                    return True
                if self.decoupled:
                    toks = out_so_far[r]
                    toks.append(token)
                    # decode the whole row so multi-byte characters split over tokens come out whole
                    full = tok.decode(toks, skip_special_tokens=True)
                    piece, emitted[r] = full[len(emitted[r]):], full
                    try:
                        senders[rows[r]].send(self._response(piece if wants_text[r] else None, [token], batched))
                    except Exception:  # the stream is gone: treat as cancellation
                        cancelled[r] = True
                        return True
                return False

            def stop_check(r, toks):
                ss = params[r].stop_strings
                return bool(ss) and any(s in tok.decode(toks) for s in ss)

            out_so_far = [[] for _ in rows]
            try:
                with self.lock:
                    out = generate(self.engine, prompts, params, on_token, pad_id=tok.pad_token_id or 0,
                                   stop_check=stop_check)
            except Exception as e:  # a failure of the engine: every request of this batch gets the error
                for i in rows:
                    err = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {e}"))
                    if self.decoupled:
                        senders[i].send(err, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    else:
                        responses[i] = err
                return None if self.decoupled else responses
            for r, i in enumerate(rows):
                if cancelled[r]:
                    self.logger.log_info(f"{self.model_name}: request {requests[i].request_id()!r} cancelled "
                                         f"after {len(out.tokens[r])} tokens")
                if self.decoupled:
                    try:
                        senders[i].send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    except Exception:
                        pass
                else:
                    text = tok.decode(out.tokens[r], skip_special_tokens=True)
                    for s in params[r].stop_strings:  # cut at the stop string, as generate_text does
                        if s and s in text:
                            text = text[: text.index(s)]
                    responses[i] = self._response(text if wants_text[r] else None, out.tokens[r], batched)
        return None if self.decoupled else responses

    def finalize(self):
        self.engine.close()


def _invalid_arg(msg):
    """A bad request is the client's mistake: HTTP 400 / gRPC INVALID_ARGUMENT rather than an internal error."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)


def _is_cancelled(request, sender):
    try:
        if sender is not None and sender.is_cancelled():
            return True
        return request.is_cancelled()
    except Exception:
        return False


def _dlpack_choice(mode):
    """DLPack whenever torch is importable (it builds the DLPack capsule); numpy only as the CPU fallback."""
    if mode == "numpy":
        return False
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        if mode == "dlpack":
            raise
        return False
