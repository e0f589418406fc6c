"""Stage 5: send prompts to the Triton server (serve/run_triton.sh), print the text, time to first token and total
per request, and check the served greedy tokens against the in-process engine (PASS/FAIL).

    python serve/client/infer_client.py --prompt "The list" --check                       # HTTP, unary (model lm)
    python serve/client/infer_client.py --protocol grpc --stream --prompt "def f(" --prompt "The" --concurrency 2
    python serve/client/infer_client.py --api generate --stream --prompt "The"           # HTTP generate_stream (SSE)
    python serve/client/infer_client.py --temperature 0.8 --top-k 40 --top-p 0.9 --seed 1 --prompt "The"

Protocols and APIs: --protocol http|grpc with --api infer (KServe v2 infer; --stream = gRPC bidirectional stream to
lm_stream) or --api generate (HTTP only: /v2/models/lm/generate, or lm_stream/generate_stream with --stream).
Streaming prints tokens as they arrive (one prompt at a time on screen; with --concurrency > 1 the text is printed
when each request completes).

--check asks the server what it runs (Triton's config of the model called, GET /v2/models/<lm|lm_stream>/config: its
`parameters`, written by serve/make_model_repository.py, name the model, engine, precision, device and artifacts
root), builds that engine in-process through lmopt.engines and compares greedy tokens: the served model's own engine,
whichever model the server was started on.

Reads:  the server (for --check also its model config, and the engine files under the artifacts root it names)
Writes: --out FILE (optional): JSON with settings, per-request results (tokens, ttft_s, total_s) and the check
Exit code: 0, or 1 when --check fails or a request fails.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging

log = get_logger("client")


@dataclass
class ClientSettings:
    prompt: list[str] = field(default_factory=lambda: ["The list"])
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    protocol: str = "http"           # http | grpc
    api: str = "infer"               # infer | generate (HTTP generate / generate_stream endpoints)
    stream: bool = False             # lm_stream (token responses as tokens come) instead of lm
    concurrency: int = 1             # prompts in flight at once
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: str = ""                   # stop string
    check: bool = False              # compare greedy tokens with the served model's engine, in-process
    artifacts: str = ""              # --check: artifacts root of the served engine (default: the server's own)
    timeout: float = 120.0
    out: str = ""                    # write results JSON here


def _request(s: ClientSettings, prompt: str):
    from lmopt.triton_client import GenRequest

    return GenRequest(prompt=prompt, max_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                      top_p=s.top_p, seed=s.seed, stop=s.stop or None)


def request_once(s: ClientSettings, prompt: str, on_piece=None) -> dict:
    """One request; returns {prompt, text, tokens, ttft_s, total_s, error}. on_piece(text) gets streamed pieces."""
    t0 = time.perf_counter()
    res = {"prompt": prompt, "text": "", "tokens": [], "ttft_s": None, "total_s": None, "error": None}

    def piece(text, ids):
        if res["ttft_s"] is None:
            res["ttft_s"] = time.perf_counter() - t0
        res["text"] += text
        res["tokens"].extend(int(i) for i in ids)
        if on_piece is not None:
            on_piece(text)

    try:
        if s.api == "generate":
            _generate_http(s, prompt, piece)
        elif s.protocol == "grpc" and s.stream:
            _stream_grpc(s, prompt, piece)
        else:
            _infer_unary(s, prompt, piece)
    except Exception as e:  # server errors are results to report, not crashes
        res["error"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    res["total_s"] = time.perf_counter() - t0
    return res


def _infer_unary(s: ClientSettings, prompt: str, piece):
    import numpy as np

    from lmopt.triton_client import tensors

    if s.stream:
        raise UserError("streaming over the infer API needs gRPC — use --protocol grpc, or --api generate")
    if s.protocol == "grpc":
        import tritonclient.grpc as mod

        client = mod.InferenceServerClient(f"{s.host}:{s.grpc_port}")
    else:
        import tritonclient.http as mod

        client = mod.InferenceServerClient(f"{s.host}:{s.http_port}", network_timeout=s.timeout)
    r = client.infer("lm", tensors(mod, _request(s, prompt)))
    text = r.as_numpy("text_output").reshape(-1)[0]
    piece(text.decode() if isinstance(text, bytes) else str(text), np.asarray(r.as_numpy("token_ids")).reshape(-1))
    client.close()


def _stream_grpc(s: ClientSettings, prompt: str, piece):
    from lmopt.triton_client import GrpcStream

    with GrpcStream(f"{s.host}:{s.grpc_port}", timeout=s.timeout) as st:
        for p in st.generate(_request(s, prompt)):
            if p.token_ids or p.text:
                piece(p.text, p.token_ids)


def _generate_http(s: ClientSettings, prompt: str, piece):
    import http.client

    from lmopt.triton_client import generate_body

    if s.protocol != "http":
        raise UserError("the generate endpoints are HTTP only — use --protocol http")
    conn = http.client.HTTPConnection(s.host, s.http_port, timeout=s.timeout)
    path = "/v2/models/lm_stream/generate_stream" if s.stream else "/v2/models/lm/generate"
    conn.request("POST", path, body=generate_body(_request(s, prompt)), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    try:
        if not s.stream:
            body = json.loads(resp.read())
            if resp.status != 200 or "error" in body:
                raise RuntimeError(body.get("error", f"HTTP {resp.status}"))
            piece(body["text_output"], body["token_ids"])
            return
        if resp.status != 200:
            raise RuntimeError(json.loads(resp.read()).get("error", f"HTTP {resp.status}"))
        for line in resp:  # server-sent events: "data: {...}" lines
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            ev = json.loads(line[5:])
            if "error" in ev:
                raise RuntimeError(ev["error"])
            ids = ev.get("token_ids", [])
            piece(ev.get("text_output", ""), ids if isinstance(ids, list) else [ids])
    finally:
        conn.close()


def served_model(s: ClientSettings) -> dict[str, str]:
    """What the server runs: the `parameters` of Triton's config of the model this client calls (model spec, engine,
    precision, device, artifacts root; serve/make_model_repository.py writes them)."""
    import urllib.error
    import urllib.request

    name = "lm_stream" if s.stream else "lm"
    url = f"http://{s.host}:{s.http_port}/v2/models/{name}/config"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            cfg = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"cannot read the served model's config at {url} ({getattr(e, 'reason', e)}) — --check needs "
                        "Triton's HTTP port (--http-port)") from None
    params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
    missing = [k for k in ("model", "engine", "precision") if not params.get(k)]
    if missing:
        raise UserError(f"the server's model '{name}' does not say what it runs (no {', '.join(missing)} among its "
                        "config parameters) — --check needs a repository made by serve/make_model_repository.py")
    return params


def reference_tokens(s: ClientSettings, prompts: list[str]) -> tuple[list[list[int]], dict[str, str]]:
    """Greedy tokens of the engine the server runs (model, engine, precision and device from the server's own model
    config), in-process, batch 1."""
    from lmopt.engines import create_engine
    from lmopt.generate import SamplingParams, generate_text
    from lmopt.models import load_tokenizer

    served = served_model(s)
    artifacts = s.artifacts or served.get("artifacts") or "artifacts"
    if not Path(artifacts).is_dir():
        raise UserError(f"the served engine's artifacts root {artifacts} is not on this machine — run --check where "
                        "the server's artifacts are, or pass --artifacts DIR with a copy of them")
    device = "cuda" if served.get("device", "cpu").startswith("cuda") else "cpu"
    log.info("checking against %s %s %s on %s (the served model's config)", served["model"], served["engine"],
             served["precision"], device)
    engine = create_engine(served["engine"], served["model"], served["precision"], device=device, artifacts=artifacts)
    tok = load_tokenizer(served["model"])
    toks = []
    for p in prompts:  # one at a time: the reference is batch 1
        _, out = generate_text(engine, tok, [p], SamplingParams(max_new_tokens=s.max_new_tokens,
                                                                stop_strings=(s.stop,) if s.stop else ()))
        toks.append(out.tokens[0])
    engine.close()
    return toks, {k: served.get(k, "") for k in ("model", "engine", "precision", "device")}


def run_client(*, settings: ClientSettings) -> dict:
    s = settings
    if s.protocol not in ("http", "grpc"):
        raise UserError(f"unknown --protocol '{s.protocol}' — use http or grpc")
    if s.api not in ("infer", "generate"):
        raise UserError(f"unknown --api '{s.api}' — use infer or generate")
    if s.api == "generate" and s.protocol != "http":
        raise UserError("the generate endpoints are HTTP only — use --protocol http")
    if s.stream and s.api == "infer" and s.protocol != "grpc":
        raise UserError("streaming over the infer API needs gRPC — use --protocol grpc, or --api generate")
    if s.check and s.temperature > 0:
        raise UserError("--check compares greedy tokens — drop --temperature (or set it to 0)")
    if not s.prompt:
        raise UserError("no prompt — pass --prompt TEXT")
    _check_server(s)
    live = s.stream and s.concurrency == 1
    lock = threading.Lock()

    def one(p):
        if live:
            print(f"> {p}", end="", flush=True)
        r = request_once(s, p, (lambda t: print(t, end="", flush=True)) if live else None)
        with lock:
            if live:
                print()
            elif r["error"] is None:
                print(f"> {p}{r['text']}")
            if r["error"]:
                print(f"request failed: {r['error']}")
            if r["ttft_s"] is not None:
                print(f"  [{len(r['tokens'])} tokens, time to first token {r['ttft_s'] * 1e3:.1f} ms, "
                      f"total {r['total_s'] * 1e3:.1f} ms]")
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, s.concurrency)) as pool:
        results = list(pool.map(one, s.prompt))
    wall = time.perf_counter() - t0
    failed = [r for r in results if r["error"]]
    report = {"settings": asdict(s), "results": results, "wall_s": wall, "failed": len(failed)}
    if s.check:
        ref, served = reference_tokens(s, s.prompt)
        same = [r["error"] is None and r["tokens"] == t for r, t in zip(results, ref)]
        report["check"] = {"served": served, "passed": all(same), "per_prompt": same, "reference": ref}
        for p, ok, r, t in zip(s.prompt, same, results, ref):
            if not ok:
                print(f"  mismatch for {p!r}: served {r['tokens']} vs in-process {t}")
        print(f"{'PASS' if all(same) else 'FAIL'}: served greedy tokens "
              f"{'equal' if all(same) else 'differ from'} the in-process {served['engine']} {served['precision']} "
              f"engine of {served['model']} ({sum(same)}/{len(same)} prompts)")
    if s.out:
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(report, indent=2) + "\n")
        log.info("Saving results to %s", s.out)
    return report


def _check_server(s: ClientSettings) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"http://{s.host}:{s.http_port}/v2/health/ready", timeout=5)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"no ready Triton server at http://{s.host}:{s.http_port} ({getattr(e, 'reason', e)}) — "
                        "start it: bash serve/run_triton.sh <model_repository>") from None


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    d = ClientSettings()
    cli.add_settings(p, ClientSettings, skip=("prompt", "seed"))
    p.add_argument("--prompt", action="append", help=f"prompt text (repeat for several; default {d.prompt})")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    vals = {f.name: getattr(args, f.name) for f in fields(ClientSettings)}
    if vals["prompt"] is None:
        vals["prompt"] = ClientSettings().prompt
    report = run_client(settings=ClientSettings(**vals))
    return 1 if report["failed"] or not report.get("check", {}).get("passed", True) else 0


if __name__ == "__main__":
    cli.run(main)
