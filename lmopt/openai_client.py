"""A lean client for the OpenAI-compatible endpoint (serve/openai_server.py) that timestamps every streamed event:
what the measuring scripts use (profile/openai_overhead.py, profile/aiperf_compare.py). Functional tests use the
official `openai` SDK instead; its per-chunk parsing would be measured as the endpoint's time here.

    async with aiohttp.ClientSession() as session:
        t = await stream_completion(session, "http://127.0.0.1:8080", {"model": "tiny", "prompt": "The", ...})
        t.ttft_s, t.event_times_s, t.text, t.usage

Times are perf_counter seconds relative to the send; an event counts as a token event when it carries text.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


@dataclass
class StreamTiming:
    event_times_s: list = field(default_factory=list)   # arrival of each event with text, relative to send
    text: str = ""
    usage: dict = field(default_factory=dict)
    end_s: float | None = None                           # `data: [DONE]`
    error: str | None = None
    setup_s: float | None = None                         # part of the times: the client building its request

    @property
    def ttft_s(self) -> float | None:
        return self.event_times_s[0] if self.event_times_s else None

    def metrics(self) -> dict:
        """TTFT, every gap between token events, end to end (ms) and the completion tokens the server counted."""
        t = self.event_times_s
        out = {"ttft_ms": t[0] * 1e3 if t else None, "itl_ms": [(b - a) * 1e3 for a, b in zip(t, t[1:])],
               "e2e_ms": self.end_s * 1e3 if self.end_s is not None else None,
               "output_tokens": self.usage.get("completion_tokens")}
        if self.setup_s is not None:
            out["setup_ms"] = self.setup_s * 1e3
        return out


async def stream_completion(session, base_url: str, body: dict) -> StreamTiming:
    """POST /v1/completions with "stream": true (usage requested) through an aiohttp session; read the raw SSE."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    rec, pieces = StreamTiming(), []
    t_send = time.perf_counter()
    try:
        async with session.post(f"{base_url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            async for line in resp.content:
                if not line.startswith(b"data: ") or rec.end_s is not None:
                    continue
                now = time.perf_counter() - t_send
                data = line[6:].strip()
                if data == b"[DONE]":
                    # read on to the end of the body (the chunked encoding's last chunk): a response left unread
                    # makes aiohttp close the connection, and the next request would pay for a new one
                    rec.end_s = now
                    continue
                ev = json.loads(data)
                if "error" in ev:
                    rec.error = str(ev["error"].get("message"))[:200]
                    break
                if ev.get("usage"):
                    rec.usage = ev["usage"]
                piece = ev["choices"][0].get("text", "") if ev.get("choices") else ""
                if piece:
                    pieces.append(piece)
                    rec.event_times_s.append(now)
    except Exception as e:  # connection errors end this request, not the run
        rec.error = f"{type(e).__name__}: {e}"[:200]
    rec.text = "".join(pieces)
    if rec.error is None and rec.end_s is None:
        rec.error = "stream ended without data: [DONE]"
    return rec
