"""Lean clients for the OpenAI-compatible endpoint (serve/openai_server.py) that timestamp every streamed event:
what the measuring scripts use (profile/openai_overhead.py, profile/aiperf_compare.py). Functional tests use the
official `openai` SDK instead; its per-chunk parsing would be measured as the endpoint's time here.

    async with aiohttp.ClientSession() as session:
        t = await stream_completion(session, "http://127.0.0.1:8080", {"model": "tiny", "prompt": "The", ...})
        t.ttft_s, t.event_times_s, t.text, t.usage

    conn = RawConnection("http://127.0.0.1:8080")     # HTTP/1.1 on asyncio streams, nothing else
    t = await conn.stream_completion({...}); await conn.close()

Two clients because a client's own cost lands in every time it measures: aiohttp is what a Python service would use;
RawConnection writes the request with one `write` and reads the chunked body with `readline`/`readexactly`, so what
it measures is the endpoint's time plus as little client as Python allows. Both read the same events the same way.
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


class _Events:
    """Server-sent event lines in, a StreamTiming out (the same for both clients)."""

    def __init__(self, t_send: float):
        self.t_send, self.rec, self.pieces = t_send, StreamTiming(), []

    def line(self, line: bytes) -> bool:
        """One line of the body; False once the stream carried an error (stop reading)."""
        rec = self.rec
        if not line.startswith(b"data: ") or rec.end_s is not None:
            return True
        now = time.perf_counter() - self.t_send
        data = line[6:].strip()
        if data == b"[DONE]":
            # the caller reads on to the end of the body (the chunked encoding's last chunk): a response left unread
            # makes a connection pool close the connection, and the next request would pay for a new one
            rec.end_s = now
            return True
        ev = json.loads(data)
        if "error" in ev:
            rec.error = str(ev["error"].get("message"))[:200]
            return False
        if ev.get("usage"):
            rec.usage = ev["usage"]
        piece = ev["choices"][0].get("text", "") if ev.get("choices") else ""
        if piece:
            self.pieces.append(piece)
            rec.event_times_s.append(now)
        return True

    def done(self) -> StreamTiming:
        rec = self.rec
        rec.text = "".join(self.pieces)
        if rec.error is None and rec.end_s is None:
            rec.error = "stream ended without data: [DONE]"
        return rec


def _stream_body(body: dict) -> dict:
    return dict(body, stream=True, stream_options={"include_usage": True})


async def stream_completion(session, base_url: str, body: dict) -> StreamTiming:
    """POST /v1/completions with "stream": true (usage requested) through an aiohttp session; read the raw SSE."""
    body = _stream_body(body)
    ev = _Events(time.perf_counter())
    try:
        async with session.post(f"{base_url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                ev.rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return ev.rec
            async for line in resp.content:
                if not ev.line(line):
                    break
    except Exception as e:  # connection errors end this request, not the run
        ev.rec.error = f"{type(e).__name__}: {e}"[:200]
    return ev.done()


class RawConnection:
    """One keep-alive HTTP/1.1 connection to the endpoint on asyncio streams: POST /v1/completions (streamed),
    the response read by its Content-Length or its chunked encoding. Reconnects when the server closed it."""

    def __init__(self, base_url: str):
        from urllib.parse import urlsplit

        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"{base_url!r}: RawConnection speaks plain http://HOST:PORT only")
        self.host, self.port = u.hostname, u.port or 80
        self.reader = self.writer = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def stream_completion(self, body: dict) -> StreamTiming:
        """As stream_completion above, on this connection."""
        import asyncio

        t_send = time.perf_counter()
        ev = _Events(t_send)
        data = json.dumps(_stream_body(body)).encode()
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (self.host.encode(), self.port, len(data), data))
            status, headers = await self._head()
            if status != 200:
                ev.rec.error = f"HTTP {status}: {(await self._body(headers)).decode(errors='replace')[:200]}"
                return ev.rec
            if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
                for line in (await self._body(headers)).splitlines(keepends=True):
                    ev.line(line)
            else:
                await self._chunked_lines(ev)
            if headers.get(b"connection", b"").lower() == b"close":
                await self.close()
        except Exception as e:  # connection errors end this request, not the run
            ev.rec.error = f"{type(e).__name__}: {e}"[:200]
            await self.close()
        return ev.done()

    async def _head(self) -> tuple[int, dict]:
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        status = int(line.split(b" ", 2)[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    async def _body(self, headers: dict) -> bytes:
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts: list[bytes] = []
            await self._chunks(parts.append)
            return b"".join(parts)
        return await self.reader.readexactly(int(headers.get(b"content-length", b"0")))

    async def _chunked_lines(self, ev: _Events) -> None:
        """Hand out each complete line of the chunked body as soon as its bytes are in."""
        state = {"text": b"", "ok": True}

        def data(piece: bytes) -> None:
            *lines, state["text"] = (state["text"] + piece).split(b"\n")
            for line in lines:
                state["ok"] = state["ok"] and ev.line(line + b"\n")

        await self._chunks(data)
        if state["text"] and state["ok"]:
            ev.line(state["text"])

    async def _chunks(self, on_data) -> None:
        """Read a chunked body to its last (size 0) chunk with one `read` per arrival, calling on_data with each
        chunk's bytes as soon as the chunk is complete."""
        buf = b""
        while True:
            while (eol := buf.find(b"\r\n")) >= 0:     # every complete chunk in buf
                size = int(buf[:eol].split(b";")[0], 16)
                if len(buf) < eol + 2 + size + 2:
                    break
                if size == 0:          # the last chunk (no trailers are sent)
                    return
                on_data(buf[eol + 2:eol + 2 + size])
                buf = buf[eol + 2 + size + 2:]
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the connection mid-response")
            buf += data
