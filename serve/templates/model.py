"""Triton Python-backend model: serves the pipeline's engine (lmopt.engines) through the in-flight batching scheduler
(lmopt.scheduler). Generated into the model repository by serve/make_model_repository.py; do not edit the copy.

The same file serves both models; config.pbtxt decides which:
  lm_stream  decoupled: execute() hands each request to the scheduler and returns at once; the scheduler's loop
             thread queues each generated token and a sender thread sends it through the request's response sender
             (tokens that arrive faster than one send takes share one response), then an empty response flagged
             FINAL. Requests join and leave the running batch at every decode step. A cancelled request (client
             gone, stream closed: response_sender.is_cancelled(), asked by the sender thread at most every
             `cancel_poll_ms` per stream, since each ask is a round trip to the server; no tokens are sent to it after)
             frees its slot at the next step after. Only the sender thread touches a stream's response sender.
  lm         one response per request with the full text. execute() submits its requests to the same kind of
             scheduler and waits for them (the Python backend runs one execute() per instance at a time, so requests
             arriving meanwhile wait in Triton's queue: in-flight joining is the streaming model's).
Parameter `batching` = "static" keeps the previous behaviour (each execute() batch runs as ONE generation, under a
lock), for side-by-side measurements.

Busy: the scheduler holds `slots` running and `max_queue` waiting requests; a request beyond that gets an error
response whose message starts with "server busy: " with code UNAVAILABLE (HTTP 503 / gRPC UNAVAILABLE): the
Python backend of the bundled Triton (2.51) has no RESOURCE_EXHAUSTED code. Retry later.

Metrics (Triton custom metrics, on the metrics port next to Triton's own; label model=<model name>; _Metrics lists
them): lm_scheduler_slots_in_use, lm_scheduler_queue_length, lm_scheduler_decode_batch_size,
lm_scheduler_prefill_chunk (gauges); lm_scheduler_steps_total, lm_scheduler_tokens_total and the per-step timeline
(lm_scheduler_step_seconds_total, lm_scheduler_engine_seconds_total, lm_sender_seconds_total,
lm_sender_responses_total) (counters); the latency histograms lm_time_to_first_token_seconds,
lm_inter_token_latency_seconds, lm_request_time_per_output_token_seconds, lm_e2e_request_latency_seconds,
lm_request_queue_time_seconds (docs/serving.md); with a paged KV cache also lm_kv_blocks_used, lm_kv_blocks_free,
lm_kv_cache_usage_perc, lm_prefix_cache_queries_total, lm_prefix_cache_hits_total, lm_kv_evictions_total and
lm_num_preemptions_total (docs/paged_kv.md).

Inputs  (per request; batch dim added by Triton): text_input STRING [1] or input_ids INT64 [-1] (the prompt already
        tokenized; exactly one of the two); optional max_tokens INT32 [1], temperature FP32 [1], top_k INT32 [1],
        top_p FP32 [1], seed INT64 [1], stop STRING [1]
        Request parameters (Triton's request `parameters`, not tensors): grammar (string: a lmopt.grammar spec — the
        output follows that JSON schema; structured output, docs/structured_output.md), logprobs (int k in 0..20)
Outputs: text_output STRING [1] (lm: full text; lm_stream: this token's text, from lmopt.detokenize; only for
         text_input requests), token_ids INT64 [-1], finish_reason INT32 [1] (only in a request's last response: the
         index in lmopt.detokenize.FINISH_REASONS — stop, length, cancelled, error); with the logprobs parameter:
         logprobs FP32 [-1] (one per token of token_ids), top_logprob_ids INT64 [-1] and top_logprobs FP32 [-1] (k per
         token, row-major, most likely first; log-softmax of the model's logits before any grammar mask)
A request that sends input_ids gets token_ids only: no STRING tensor crosses the backend boundary. That is the path
that works with Triton 2.51's Python-backend stub on the GPU machine we measured, where decoding a STRING input
crashed the stub (results/nvidia-h200/triton-gpu-attempt.log).

Settings come from config.pbtxt `parameters` (engine, precision, device, artifacts, model, max_tokens_cap, slots,
max_queue, prefill_chunk, batching, ...).
"""
import collections
import json
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

CANCEL_FINAL_DELAY_S = 0.2


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
        self.use_dlpack = _dlpack_choice(_param(cfg, "output_transport", "auto"))
        self.default_max_tokens = int(_param(cfg, "default_max_tokens"))
        self.empty = _param(cfg, "engine") == "empty"
        if self.empty:  # the floor of Triton's own per-response cost: no engine, no tokenizer
            self.scheduler = None
            self.logger.log_info(f"{self.model_name}: empty decoupled model (streams max_tokens responses of token 0)")
            return
        switch_us = int(_param(cfg, "gil_switch_us", "0"))
        if switch_us > 0:
            # the scheduler thread, the sender thread and Triton's execute() share one interpreter lock: a thread
            # waiting for it is otherwise kept waiting up to 5 ms by one that keeps it busy
            sys.setswitchinterval(switch_us / 1e6)
        self.spec = _param(cfg, "model")
        device = _param(cfg, "device", "cpu")
        engine = _param(cfg, "engine")
        if args.get("model_instance_kind") == "GPU":
            # one instance per GPU of its instance_group entry: every engine is placed on that GPU, and torch's
            # current device follows (CUDA graphs, streams and caches otherwise land on GPU 0)
            device = f"cuda:{args['model_instance_device_id']}"
            try:
                import torch

                torch.cuda.set_device(int(args["model_instance_device_id"]))
            except ImportError:
                pass
        threads = int(_param(cfg, "threads", "0")) or None
        kwargs = {}
        if engine == "compiled":  # its KV-cache slots: one per request generating at once
            kwargs = {"num_slots": max(int(_param(cfg, "slots", "8")), int(cfg.get("max_batch_size", 1))),
                      "max_len": int(_param(cfg, "max_len", "0")) or None,
                      "max_prefill_chunk": int(_param(cfg, "prefill_chunk", "256")),
                      "decode_kernels": _param(cfg, "decode_kernels", "inductor"),
                      "weight_quant": _param(cfg, "weight_quant", "") or None,
                      # the KV cache: contiguous slots, or paged blocks with prefix caching (docs/paged_kv.md)
                      "kv_layout": _param(cfg, "kv_layout", "contiguous"),
                      "block_size": int(_param(cfg, "kv_block_size", "16")),
                      "num_blocks": int(_param(cfg, "kv_num_blocks", "0")) or None,
                      "kv_memory_fraction": float(_param(cfg, "kv_memory_fraction", "0")) or None,
                      "prefix_cache": _param(cfg, "prefix_cache", "1") == "1",
                      "paged_attention": _param(cfg, "paged_attention", "gather")}
        self.engine = create_engine(engine, self.spec, _param(cfg, "precision"), device=device,
                                    artifacts=_param(cfg, "artifacts"), threads=threads, **kwargs)
        from lmopt.engines.slots import SlotEngine

        native = isinstance(self.engine, SlotEngine)    # an engine with slots of its own (declares capabilities)
        capture_kv = int(_param(cfg, "capture_kv", "0"))
        if capture_kv and native and self.engine.capabilities.capture:
            # compile and capture every decode batch bucket now: a first use would otherwise stall live requests
            # for seconds per bucket
            t0 = time.perf_counter()
            buckets = list(self.engine.capabilities.batch_buckets)
            self.engine.capture(buckets, capture_kv)
            self.logger.log_info(f"{self.model_name}: captured decode buckets {buckets} "
                                 f"(kv {capture_kv}) in {time.perf_counter() - t0:.1f} s")
        self.tokenizer = load_tokenizer(self.spec)
        eos = self.tokenizer.eos_token_id       # a property that looks the token up: once, not per request
        self._stop_ids = (eos,) if eos is not None else ()
        self.max_tokens_cap = int(_param(cfg, "max_tokens_cap"))
        self.batching = _param(cfg, "batching", "inflight")
        self.lock = threading.Lock()
        self._trace = None
        self.scheduler = None
        if self.batching == "inflight":
            from lmopt.engines.slotted import create_slot_engine
            from lmopt.scheduler import Scheduler

            # an engine with its own slots was built with them (and its prefill chunk) above
            slots = create_slot_engine(self.engine, num_slots=None if native else int(_param(cfg, "slots", "8")),
                                       max_prefill_chunk=int(_param(cfg, "prefill_chunk", "256")))
            from lmopt.profiling.step_trace import StepTrace

            # LMOPT_STEP_TRACE=<folder>: every engine call and send pass timed (profile/serve_bench.py's timeline)
            self._trace = StepTrace.from_env(self.model_name)
            if self._trace is not None:
                slots = self._trace.wrap(slots)
            self.metrics = _Metrics(self.model_name, self.logger, kv=slots.capabilities.paged_kv)
            max_queue = int(_param(cfg, "max_queue", "32"))
            if not self.decoupled:  # one execute() hands over up to max_batch_size requests: never refuse its own
                max_queue = max(max_queue, int(cfg.get("max_batch_size", 1)) - slots.num_slots)
            self._cancel_poll_s = float(_param(cfg, "cancel_poll_ms", "0")) / 1e3
            if self.decoupled:
                self._streams = {}           # id(state) -> state of every stream not yet final (sender thread only)
                self._new_streams = collections.deque()   # streams execute() handed over, not yet in _streams
                self._late_finals = []       # (due time, response sender) of cancelled streams (sender thread only)
                self._ttft_parts = TtftParts(self.model_name, self.logger)
            self.scheduler = Scheduler(slots, max_queue=max_queue, tokenizer=self.tokenizer,
                                       # streams: the sender thread asks Triton and sets a flag (no round trip here)
                                       cancel_poll_s=0.0 if self.decoupled else self._cancel_poll_s,
                                       on_step=self.metrics.update, name=f"{self.model_name}-scheduler",
                                       first_token_pause_s=(float(_param(cfg, "first_token_pause_us", "0")) / 1e6
                                                            if self.decoupled else 0.0),
                                       decode_wait_ratio=float(_param(cfg, "decode_wait_ratio", "1.0")),
                                       # streams: the sender thread is the output side (drain()): text, stop strings
                                       # and the responses happen there, off the engine loop
                                       output_thread=not self.decoupled)
            if self.decoupled:
                self._sender = threading.Thread(target=self._send_loop, name=f"{self.model_name}-sender", daemon=True)
                self._sender.start()
            # structured output's view of the vocabulary, built beside the first requests rather than in one
            threading.Thread(target=self._prepare_grammars, name=f"{self.model_name}-grammar", daemon=True).start()
        self.logger.log_info(f"{self.model_name}: {self.engine.info} decoupled={self.decoupled} "
                             f"batching={self.batching} outputs via {'DLPack' if self.use_dlpack else 'numpy'}"
                             + (f" slots={self.scheduler.engine.num_slots} ({type(self.scheduler.engine).__name__}) "
                                f"max_queue={self.scheduler.max_queue}" if self.scheduler else ""))

    def _prepare_grammars(self):
        try:
            t0 = time.perf_counter()
            self.scheduler.prepare_grammars()
            self.logger.log_info(f"{self.model_name}: grammar engine ready in {time.perf_counter() - t0:.2f} s")
        except Exception as e:  # noqa: BLE001  (structured output then fails per request, with its reason)
            self.logger.log_warn(f"{self.model_name}: grammar engine not prepared: {e}")

    # ---- outputs: the one place that decides DLPack or numpy ---------------------------------------------------
    def _ids_tensor(self, ids, name="token_ids", dtype=np.int64):
        """An integer output (token_ids, finish_reason). DLPack first: on the GPU machines numpy-built outputs failed (docs/ENVIRONMENT.md, "Triton Inference Server without a container")."""
        arr = np.asarray(ids, dtype=dtype)
        if self.use_dlpack:
            import torch

            return pb_utils.Tensor.from_dlpack(name, torch.from_numpy(arr.copy()))
        return pb_utils.Tensor(name, arr)

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

    def _response(self, text, ids, batched, finish_reason=None, logprobs=None):
        """`text` None (an input_ids request): token_ids only. `finish_reason` (the request's last response): its
        index in lmopt.detokenize.FINISH_REASONS as the finish_reason output, so no client re-derives it. A last
        response without tokens has no token_ids (the bundled stub refuses an empty DLPack tensor as not contiguous).
        `logprobs`: one lmopt.scheduler.TokenLogprob per token of `ids` (requests that asked for them)."""
        ids = list(ids)
        outputs = []
        if ids or finish_reason is None:
            outputs.append(self._ids_tensor([ids] if batched else ids))  # batched: the request's batch dim (1)
        if logprobs:
            k = len(logprobs[0].top)
            lp = [x.logprob for x in logprobs]
            top_ids = [t for x in logprobs for t, _ in x.top]
            top_lp = [v for x in logprobs for _, v in x.top]
            outputs.append(self._ids_tensor([lp] if batched else lp, "logprobs", np.float32))
            if k:
                outputs.append(self._ids_tensor([top_ids] if batched else top_ids, "top_logprob_ids"))
                outputs.append(self._ids_tensor([top_lp] if batched else top_lp, "top_logprobs", np.float32))
        if finish_reason is not None:
            from lmopt.detokenize import FINISH_REASONS

            code = [[FINISH_REASONS.index(finish_reason)]] if batched else [FINISH_REASONS.index(finish_reason)]
            outputs.append(self._ids_tensor(code, "finish_reason", np.int32))
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
        extra = json.loads(request.parameters() or "{}")   # request parameters: grammar, logprobs
        grammar, logprobs = extra.get("grammar"), extra.get("logprobs")
        if grammar is not None and not isinstance(grammar, str):
            raise ValueError("the request parameter 'grammar' must be a string (a JSON grammar spec)")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
            raise ValueError(f"the request parameter 'logprobs' must be an integer (got {logprobs!r})")
        if (grammar is not None or logprobs is not None) and self.scheduler is None:
            raise ValueError("structured output and logprobs need batching=inflight (the scheduler)")
        p = SamplingParams(max_new_tokens=max_tokens, temperature=float(scalar("temperature", 0.0)),
                           top_k=int(scalar("top_k", 0)), top_p=float(scalar("top_p", 1.0)),
                           seed=None if seed is None else int(seed),
                           # ignore_eos: the request runs to max_tokens (a benchmark's fixed output length)
                           stop_token_ids=() if scalar("ignore_eos", False) else self._stop_ids,
                           stop_strings=(stop,) if stop else (), grammar=grammar, logprobs=logprobs)
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
        if self.empty:
            return self._execute_empty(requests)
        if self.scheduler is None:
            return self._execute_static(requests)
        from lmopt.errors import UserError
        from lmopt.scheduler import ServerBusy

        batched = True  # both configs set max_batch_size > 0
        responses = [None] * len(requests)
        handles = []
        for i, r in enumerate(requests):
            t_exec = time.perf_counter()
            sender = r.get_response_sender() if self.decoupled else None
            try:
                ids, p, want_text = self._parse(r)
                if self.decoupled:
                    st = self._stream_state(r.request_id(), sender, want_text, t_exec)
                    self.scheduler.submit(ids, p, is_cancelled=lambda st=st: st["cancelled"], request_id=r.request_id(),
                                          text=want_text, tag=st)
                    # picked up at the sender's next pass, without waking it: a wake here would compete with the
                    # prefill
                    self._new_streams.append(st)
                else:
                    h = self.scheduler.submit(ids, p, is_cancelled=r.is_cancelled, request_id=r.request_id(),
                                              text=want_text)
                    handles.append((i, h, want_text))
                continue
            except ServerBusy as e:
                err = pb_utils.InferenceResponse(error=_busy(str(e)))
            except (ValueError, UserError) as e:
                err = pb_utils.InferenceResponse(error=_invalid_arg(str(e)))
            if self.decoupled:
                sender.send(err, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                responses[i] = err
        if self.decoupled:
            return None
        for i, h, want_text in handles:
            lps = [ev.logprob for ev in h.events() if ev.logprob is not None]   # ends with the final event
            h.wait()
            if h.finish_reason == "error":
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(h.error or "generation failed"))
            else:
                if h.finish_reason == "cancelled":
                    self._log_cancelled(h)
                responses[i] = self._response(h.text if want_text else None, h.tokens, batched, h.finish_reason,
                                              lps[:len(h.tokens)])
        return responses

    def _stream_state(self, request_id, response_sender, want_text, t_exec):
        """The sender thread's state of one streaming request (the scheduler hands it back as the request's tag).
        The scheduler reads its cancelled flag, which only the sender thread sets (_watch_cancellation). The response
        sender is dropped once the final response is out: nothing is sent on it after that."""
        return {"id": request_id, "sender": response_sender, "want_text": want_text, "count": 0, "cancelled": False,
                "asked": 0.0, "t_exec": t_exec, "t_last": None}

    def _send_loop(self):
        """The sender thread, the scheduler's output side (Scheduler.drain()): everything the engine loop produced
        since its last pass, through each request's TextStream (text, stop strings, finish reason), one response per
        request. A request whose tokens came faster than they could be sent gets them together in one response
        (token_ids holds several); its last tokens, the text held back and its finish reason go in its final
        response. Each send is a round trip to the server process (lm_empty measures it), so under load this keeps
        the decode loop, not the sends, setting the pace. Tokens are never held back: the first one goes at once."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        poll = self._poll = self._cancel_poll_s or 0.01
        sched = self.scheduler
        while True:
            try:
                busy = self._streams or self._late_finals or self._new_streams
                # idle with a step trace on: wake every half second to write it once the load is over
                outs = sched.drain(timeout=poll if busy else 0.5 if self._trace is not None else None)
            except Exception as e:  # noqa: BLE001  (a bug on the output side must not stop every stream)
                self.logger.log_error(f"{self.model_name}: the output side failed: {e}")
                outs = []
            t0 = time.perf_counter()
            while self._new_streams:
                st = self._new_streams.popleft()
                if st["sender"] is not None and not st.get("final"):
                    # first asked one poll interval from now: no round trip on the way to the first token
                    st["asked"] = time.monotonic()
                    self._streams[id(st)] = st
            for o in outs:
                st = o.request.tag
                try:
                    self._deliver(st, o, final)
                except Exception as e:  # noqa: BLE001  (one stream's failure must not stop the others)
                    self.logger.log_warn(f"{self.model_name}: sending to request {st['id']!r} failed: {e}")
                if o.finished:
                    self._streams.pop(id(st), None)
            if self._trace is not None and outs:
                self._trace.send(t0, time.perf_counter(), len(outs))
            now = time.monotonic()
            stop = sched.output_closed
            while self._late_finals and (stop or self._late_finals[0][0] <= now):
                try:
                    self._late_finals.pop(0)[1].send(flags=final)
                except Exception:  # noqa: BLE001  (a cancelled stream may refuse it)
                    pass
            if outs:
                self.metrics.sent(len(outs), time.perf_counter() - t0)
            if stop:
                return
            self._watch_cancellation(poll)
            if self._trace is not None and not self._streams and not self._new_streams:
                self._trace.dump_when_idle()

    def _watch_cancellation(self, poll):
        """Ask Triton whether streams were cancelled (client gone), each at most every `poll` s (every ask is a
        round trip to the server process); a stream is also asked before tokens are sent to it, when due. Runs on the sender thread, the only thread that
        touches a stream's response sender (concurrent use from two threads crashed the bundled server)."""
        now = time.monotonic()
        for st in list(self._streams.values()):
            self._cancelled(st, now)

    def _cancelled(self, st, now):
        """Whether the client left this stream: Triton is asked at most every cancel_poll_ms per stream."""
        if not st["cancelled"] and st["sender"] is not None and now - st["asked"] >= self._poll:
            st["asked"] = now
            st["cancelled"] = st["sender"].is_cancelled()
        return st["cancelled"]

    def _deliver(self, st, o, final):
        """One response for RequestOutput `o` of stream `st`: its new tokens (and text); if it is the request's
        last, with its finish reason and the final flag."""
        sender = st["sender"]
        if sender is None:
            return
        want_text = st["want_text"]
        cancelled = self._cancelled(st, time.monotonic())   # nothing is written to a stream the client left
        first = st["count"] == 0 and bool(o.token_ids)
        if o.token_ids:
            st["count"] += len(o.token_ids)
        if not o.finished:
            if o.token_ids and not cancelled:
                sender.send(self._response(o.text if want_text else None, o.token_ids, True, None, o.logprobs))
                self._sent(st, o, first)
            return
        st["sender"], st["final"] = None, True
        if cancelled or o.finish_reason == "cancelled":
            self.logger.log_info(f"{self.model_name}: request {st['id']!r} cancelled after {st['count']} tokens")
            # the final flag of a request the client cancelled goes out CANCEL_FINAL_DELAY_S later: completing it
            # while the server still processes the cancellation crashes Triton 2.51's gRPC frontend (docs/ENVIRONMENT.md)
            self._late_finals.append((time.monotonic() + CANCEL_FINAL_DELAY_S, sender))
            return
        if o.finish_reason == "error":
            if o.token_ids:
                sender.send(self._response(o.text if want_text else None, o.token_ids, True, None, o.logprobs))
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(o.error or "generation failed")),
                        flags=final)
            return
        # the last tokens, the text held back until the end (an incomplete character, a stop-string start) and the
        # finish reason: one response, flagged final
        sender.send(self._response(o.text if want_text else None, o.token_ids, True, o.finish_reason, o.logprobs),
                    flags=final)
        self._sent(st, o, first)

    def _sent(self, st, o, first):
        """Timings of a response just handed to Triton: TTFT parts, and the latency histograms."""
        now = time.perf_counter()
        h = o.request
        if first:
            self._ttft_parts.add(st["t_exec"], h, now)
            self.metrics.observe("ttft", now - st["t_exec"])
            if h.admitted_at is not None:
                self.metrics.observe("queue", h.admitted_at - h.submitted_at)
        elif st["t_last"] is not None and o.token_ids:
            self.metrics.observe("itl", (now - st["t_last"]) / len(o.token_ids))
        st["t_last"] = now
        if o.finished:
            self.metrics.observe("e2e", now - st["t_exec"])
            # the engine loop's clock: defined even when every token came in one response
            if st["count"] > 1 and h.first_token_at is not None and h.finished_at is not None:
                self.metrics.observe("tpot", (h.finished_at - h.first_token_at) / (st["count"] - 1))

    def _log_cancelled(self, h):
        self.logger.log_info(f"{self.model_name}: request {h.id!r} cancelled after {len(h.tokens)} tokens")

    def _execute_empty(self, requests):
        """engine=empty: each request gets max_tokens responses of token id 0 at once, then FINAL (what is left of a
        streaming request when generating costs nothing)."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for r in requests:
            sender = r.get_response_sender()
            t = pb_utils.get_input_tensor_by_name(r, "max_tokens")
            n = int(self._values(t)[0]) if t is not None else self.default_max_tokens
            for _ in range(max(n, 0)):
                sender.send(self._response(None, [0], True))
            sender.send(flags=final)
        return None

    def _execute_static(self, requests):
        """batching=static: the requests of one execute() run as one generation (lmopt.generate)."""
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
            from lmopt.detokenize import TextStream

            tok = self.tokenizer
            cancelled = [False] * len(rows)
            # the one output path (lmopt.detokenize): text, stop strings, finish reason
            streams = [TextStream(tok if wants_text[r] or params[r].stop_strings else None, prompts[r],
                                  params[r].stop_strings) for r in range(len(rows))]

            def on_token(r, token):
                req = requests[rows[r]]
                if _is_cancelled(req, senders[rows[r]] if senders else None):
                    cancelled[r] = True
                    return True
                piece = streams[r].add(token)
                if self.decoupled:
                    try:
                        senders[rows[r]].send(self._response(piece if wants_text[r] else None, [token], batched))
                    except Exception:  # the stream is gone: treat as cancellation
                        cancelled[r] = True
                        return True
                return False

            def stop_check(r, toks):
                return streams[r].stopped

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
                st = streams[r]
                reason = st.finish_reason(out.finish_reasons[r])
                if cancelled[r]:
                    self.logger.log_info(f"{self.model_name}: request {requests[i].request_id()!r} cancelled "
                                         f"after {len(out.tokens[r])} tokens")
                if self.decoupled:
                    try:
                        if cancelled[r]:
                            senders[i].send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                        else:  # the text held back until the end, and the finish reason
                            tail = st.finish()
                            senders[i].send(self._response(tail if wants_text[r] else None, [], batched, reason),
                                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    except Exception:
                        pass
                else:
                    text = st.text + st.finish()
                    responses[i] = self._response(text if wants_text[r] else None, out.tokens[r], batched, reason)
        return None if self.decoupled else responses

    def finalize(self):
        self.logger.log_info(f"{self.model_name}: finalize")
        if self.empty:
            return
        if self.scheduler is not None:
            self.scheduler.close()
            self.logger.log_info(f"{self.model_name}: scheduler stopped")
            if self.decoupled:
                self._sender.join(timeout=10)
            self.metrics.close()
            if self._trace is not None:
                self.logger.log_info(f"{self.model_name}: step trace written to {self._trace.dump()}")
        self.engine.close()


def _invalid_arg(msg):
    """A bad request is the client's mistake: HTTP 400 / gRPC INVALID_ARGUMENT rather than an internal error."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)


def _busy(msg):
    """The queue is full: UNAVAILABLE (HTTP 503, gRPC UNAVAILABLE), the closest code the bundled Python backend has to
    RESOURCE_EXHAUSTED; the message starts with "server busy: "."""
    code = getattr(pb_utils.TritonError, "UNAVAILABLE", None)
    return pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)


class _Metrics:
    """Scheduler counters and request latency histograms as Triton custom metrics (pb_utils.MetricFamily, on the
    metrics port beside Triton's own; logged instead where it is missing). Gauges and counters are updated at most
    every INTERVAL_S (a scrape every few seconds sees them current), and whenever the scheduler goes idle. Every
    metric call is a round trip to the server process, so histogram observations are queued and made by a thread
    of their own, never on the engine loop or between two sends.

    Histograms (vLLM's names with lm_ for vllm:; seconds; label model=<model name>; the Python backend of Triton
    2.51 has MetricFamily.HISTOGRAM):
      lm_time_to_first_token_seconds            execute() entry to the first response handed to Triton
      lm_inter_token_latency_seconds            gap between two responses of a stream / the tokens in the later one
      lm_request_time_per_output_token_seconds  per request: (last token - first) / (tokens - 1), engine loop's clock
      lm_e2e_request_latency_seconds            execute() entry to the final response
      lm_request_queue_time_seconds             submitted to the scheduler until given a KV-cache slot
    A paged KV cache adds the gauges lm_kv_blocks_used, lm_kv_blocks_free, lm_kv_cache_usage_perc and the counters
    lm_prefix_cache_queries_total, lm_prefix_cache_hits_total (prompt tokens), lm_kv_evictions_total and
    lm_num_preemptions_total (docs/paged_kv.md).
    Per-step timeline counters: lm_scheduler_step_seconds_total (wall time of the engine loop's steps),
    lm_scheduler_engine_seconds_total (of which in engine calls: launches and waits for the device; the rest is the
    loop's host work), lm_sender_seconds_total and lm_sender_responses_total (the sender thread's passes: handing
    responses to Triton)."""

    INTERVAL_S = 0.1
    # vLLM's buckets, with finer ones below 10 ms for a GPU's inter-token latency
    BUCKETS = {
        "ttft": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0],
        "itl": [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5],
        "e2e": [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0],
        "queue": [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
    }
    HISTOGRAMS = (("ttft", "time_to_first_token_seconds", "ttft", "time to first token"),
                  ("itl", "inter_token_latency_seconds", "itl", "time between tokens of a stream"),
                  ("tpot", "request_time_per_output_token_seconds", "itl", "mean time per output token of a request"),
                  ("e2e", "e2e_request_latency_seconds", "e2e", "end-to-end request latency"),
                  ("queue", "request_queue_time_seconds", "queue", "time waiting for a KV-cache slot"))

    def __init__(self, model_name, logger, kv=False):
        import queue

        self.logger, self.labels = logger, {"model": model_name}
        self.last = {}
        self.flushed_at = 0.0
        self.sender = {"sender_seconds": 0.0, "sender_responses": 0}
        self.hists = {}
        self._obs = queue.SimpleQueue()
        try:
            fam = pb_utils.MetricFamily
            self.families = []  # a Metric stops working once its MetricFamily is garbage-collected: keep them

            def metric(name, description, kind, **kw):
                self.families.append(fam(name=name, description=description, kind=kind))
                return self.families[-1].Metric(labels=self.labels, **kw)

            self.gauges = {k: metric(f"lm_scheduler_{n}", d, fam.GAUGE)
                           for k, n, d in (("slots_in_use", "slots_in_use", "KV-cache slots holding a request"),
                                           ("queue_length", "queue_length", "requests waiting for a slot"),
                                           ("last_decode_batch", "decode_batch_size", "rows of the last decode step"),
                                           ("prefill_chunk", "prefill_chunk", "prompt tokens a step may prefill "
                                            "while requests decode"))}
            self.counters = {k: metric(n, d, fam.COUNTER)
                             for k, n, d in (("steps", "lm_scheduler_steps_total", "scheduler steps"),
                                             ("tokens", "lm_scheduler_tokens_total", "generated tokens"),
                                             ("step_seconds", "lm_scheduler_step_seconds_total",
                                              "wall time of the engine loop's steps"),
                                             ("engine_seconds", "lm_scheduler_engine_seconds_total",
                                              "time of the steps spent in engine calls"),
                                             ("sender_seconds", "lm_sender_seconds_total",
                                              "time the sender thread spent handing responses to Triton"),
                                             ("sender_responses", "lm_sender_responses_total",
                                              "responses the sender thread handed to Triton"))}
            if kv:   # a paged KV cache (lmopt.kv_blocks): vLLM's names with lm_ for vllm:
                self.gauges.update({k: metric(n, d, fam.GAUGE) for k, n, d in (
                    ("kv_blocks_used", "lm_kv_blocks_used", "KV-cache blocks held by requests"),
                    ("kv_blocks_free", "lm_kv_blocks_free", "KV-cache blocks free (cached ones nobody holds included)"),
                    ("kv_cache_usage", "lm_kv_cache_usage_perc", "fraction of KV-cache blocks in use (0-1)"))})
                self.counters.update({k: metric(n, d, fam.COUNTER) for k, n, d in (
                    ("prefix_cache_queries", "lm_prefix_cache_queries_total", "prompt tokens looked up in the "
                     "prefix cache"),
                    ("prefix_cache_hits", "lm_prefix_cache_hits_total", "prompt tokens found in the prefix cache"),
                    ("kv_evictions", "lm_kv_evictions_total", "cached KV blocks evicted for new ones"),
                    ("preemptions", "lm_num_preemptions_total", "requests preempted for lack of KV blocks "
                     "(recomputed)"))})
            try:
                hist = fam.HISTOGRAM
            except AttributeError:  # a Python backend older than histograms
                hist = None
            if hist is not None:
                self.hists = {k: metric(f"lm_{n}", d, hist, buckets=self.BUCKETS[b])
                              for k, n, b, d in self.HISTOGRAMS}
                threading.Thread(target=self._observe_loop, name=f"{model_name}-metrics", daemon=True).start()
        except Exception as e:  # noqa: BLE001  (an older Python backend without custom metrics)
            logger.log_warn(f"custom metrics unavailable ({e}): scheduler stats go to the log")
            self.gauges = None

    def observe(self, key, seconds):
        """Queue one observation of histogram `key` (made by the metrics thread)."""
        if self.hists:
            self._obs.put((key, seconds))

    def _observe_loop(self):
        while True:
            item = self._obs.get()
            if item is None:
                return
            try:
                self.hists[item[0]].observe(float(item[1]))
            except Exception as e:  # noqa: BLE001  (metrics must never stop serving)
                self.logger.log_warn(f"observing {item[0]} failed: {e}")

    def sent(self, responses, seconds):
        """A sender pass that handed `responses` responses to Triton in `seconds` (read by the next update)."""
        self.sender["sender_responses"] += responses
        self.sender["sender_seconds"] += seconds

    def close(self):
        self._obs.put(None)

    def update(self, st):
        if self.gauges is None:
            if st["steps"] % 1000 == 0:
                self.logger.log_info("scheduler " + json.dumps(st))
            return
        # every metric update is a round trip to the server process: at most every INTERVAL_S (and always when the
        # scheduler goes idle, so the gauges settle at their final values)
        idle = st["slots_in_use"] == 0 and st["queue_length"] == 0
        now = time.monotonic()
        if not idle and now - self.flushed_at < self.INTERVAL_S:
            return
        st = dict(st, **self.sender)
        for k, m in self.gauges.items():
            if self.last.get(k) != st[k]:
                m.set(st[k])
        for k, m in self.counters.items():
            d = st[k] - self.last.get(k, 0)
            if d:
                m.increment(d)
        self.flushed_at = now
        self.last.update({k: st[k] for k in (*self.gauges, *self.counters)})


class TtftParts:
    """Where a stream's time to first token goes inside the server, logged as medians every N streams:
    parse (execute() entry to the scheduler's queue), wait (queue to a slot), prefill (slot to first token, the
    engine's share), send (first token to its response handed to Triton)."""

    EVERY = 100

    def __init__(self, model_name, logger):
        self.model_name, self.logger, self.rows = model_name, logger, []

    def add(self, t_exec, h, t_sent):
        if h.admitted_at is None or h.first_token_at is None:
            return
        self.rows.append((h.submitted_at - t_exec, h.admitted_at - h.submitted_at, h.first_token_at - h.admitted_at,
                          t_sent - h.first_token_at))
        if len(self.rows) >= self.EVERY:
            med = np.median(np.asarray(self.rows) * 1e3, axis=0)
            self.logger.log_info(f"{self.model_name}: ttft parts over {len(self.rows)} streams, ms median: " +
                                 json.dumps(dict(zip(("parse", "wait", "prefill", "send"), np.round(med, 3).tolist()))))
            self.rows = []


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
