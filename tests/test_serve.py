"""Stage 4-5 (serve/): the real Triton server on free ports, started once for this module and stopped at the end.

Unary and streaming requests over HTTP and gRPC (and the generate endpoints) must return the in-process engine's
greedy tokens; the metrics port counts them; the dynamic batcher really batches; bad requests get an error naming
the problem while the server keeps serving; a client that leaves mid-stream cancels its request; no process is left.
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, load_script, read_json, run_cli
from lmopt.serving import free_ports as _free_ports   # the name test_openai imports from here

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

RUN = REPO / "serve" / "run_triton.sh"
VARIANT = "ort-fp32-cpu"
CAP = 256  # --max-tokens-cap of the test repository (long enough that a cancellation lands mid-answer)
SLOTS, QUEUE = 4, 8  # its in-flight batching capacity: 4 running + 8 waiting


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class Server:
    def __init__(self, artifacts: Path, repo: Path, tmp: Path):
        self.artifacts, self.repo = artifacts, repo
        self.http, self.grpc, self.metrics = _free_ports(3)
        self.pid_file = tmp / "triton.pid"
        self.log = tmp / "triton.log"

    def start(self):
        proc = subprocess.run(["bash", str(RUN), str(self.repo), "--background", "--pid-file", str(self.pid_file),
                               "--log-file", str(self.log), "--http-port", str(self.http), "--grpc-port",
                               str(self.grpc), "--metrics-port", str(self.metrics), "--timeout", "240"],
                              text=True, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"http://127.0.0.1:{self.http}" in proc.stdout and "lm_stream" in proc.stdout
        self.pgid = int(self.pid_file.read_text())

    def stop(self):
        proc = subprocess.run(["bash", str(RUN), "stop", "--pid-file", str(self.pid_file)], text=True,
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def client_args(self, *extra: str) -> list[str]:
        return ["--http-port", str(self.http), "--grpc-port", str(self.grpc), *extra]

    def stats(self, model: str) -> dict:
        return json.load(urllib.request.urlopen(self.url(f"/v2/models/{model}/stats")))["model_stats"][0]


@pytest.fixture(scope="module")
def server(tiny_export, artifacts, tmp_path_factory):
    run_cli("serve/make_model_repository.py", "--model", "tiny", "--artifacts", str(artifacts), "--precision",
            "fp32", "--max-tokens-cap", str(CAP), "--default-max-tokens", "8", "--slots", str(SLOTS),
            "--max-queue", str(QUEUE))
    srv = Server(artifacts, artifacts / "tiny" / "serve" / VARIANT / "model_repository",
                 tmp_path_factory.mktemp("triton"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        # the whole process group is gone: server and every backend stub
        deadline = time.time() + 10
        while _group_alive(srv.pgid) and time.time() < deadline:
            time.sleep(0.2)
        alive = _group_alive(srv.pgid)
        if alive:
            os.killpg(srv.pgid, signal.SIGKILL)
        assert not alive, "processes left after run_triton.sh stop"
        assert not srv.pid_file.exists()


def _http(mod_name="http"):
    import tritonclient.grpc as g
    import tritonclient.http as h

    return h if mod_name == "http" else g


def _inputs(mod, text, **opt):
    from lmopt.triton_client import GenRequest, tensors

    return tensors(mod, GenRequest(prompt=text, **opt))


def _infer(server, text, protocol="http", **opt):
    mod = _http(protocol)
    c = mod.InferenceServerClient(f"127.0.0.1:{server.http if protocol == 'http' else server.grpc}")
    try:
        return c.infer("lm", _inputs(mod, text, **opt)).as_numpy("token_ids").reshape(-1).tolist()
    finally:
        c.close()


def _post(server, path, body: bytes):
    req = urllib.request.Request(server.url(path), data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_repository_is_generated_with_manifest(server):
    folder = server.repo.parent
    man = read_json(folder / "manifest.json")
    assert man["stage"] == "serve" and man["precision"] == "fp32" and man["instance_kind"] == "KIND_CPU"
    lm = (server.repo / "lm" / "config.pbtxt").read_text()
    st = (server.repo / "lm_stream" / "config.pbtxt").read_text()
    assert "decoupled: false" in lm and "decoupled: true" in st
    assert "dynamic_batching" in lm and "kind: KIND_CPU" in lm
    assert re.search(r'key: "max_tokens_cap" value: \{ string_value: "256" \}', lm)
    assert re.search(r'key: "slots" value: \{ string_value: "4" \}', st) and "dynamic_batching" not in st
    assert man["batching"] == "inflight" and man["choice"]["reason"] == "--precision given"
    assert (folder / "README.md").is_file()


def test_client_cli_greedy_tokens_equal_in_process_engine(server):
    proc = run_cli("serve/client/infer_client.py", *server.client_args(
        "--check", "--max-new-tokens", "12", "--prompt", "The list", "--prompt", "def f(", "--concurrency", "2"))
    assert "PASS: served greedy tokens equal the in-process ort fp32 engine of tiny (2/2 prompts)" in proc.stdout
    assert "time to first token" in proc.stdout


@pytest.mark.parametrize("mode", [
    dict(protocol="grpc"),                                   # unary over gRPC
    dict(protocol="grpc", stream=True),                      # gRPC bidirectional stream, one response per token
    dict(protocol="http", api="generate"),                   # HTTP generate
    dict(protocol="http", api="generate", stream=True),      # HTTP generate_stream (server-sent events)
], ids=["grpc-unary", "grpc-stream", "http-generate", "http-generate-stream"])
def test_served_greedy_tokens_equal_in_process_engine(server, mode):
    # in-process run_client (the function the CLI calls): the CLI itself is covered above; this saves a Python
    # start-up per protocol on the shared 2-core machine
    client = load_script("serve/client/infer_client.py")
    ClientSettings, run_client = client.ClientSettings, client.run_client

    s = ClientSettings(prompt=["The list", "def f("], concurrency=2, max_new_tokens=12, check=True,
                       http_port=server.http,
                       grpc_port=server.grpc, **mode)
    report = run_client(settings=s)
    assert report["failed"] == 0 and report["check"]["passed"], report["check"]
    assert all(r["ttft_s"] is not None and len(r["tokens"]) == 12 for r in report["results"])
    if mode.get("stream"):  # tokens arrived one by one: the first came before the last
        assert all(r["ttft_s"] < r["total_s"] for r in report["results"])


def test_streaming_sends_tokens_as_they_come_then_final(server):
    """Token responses in order (one token each, or several when they came faster than a send), the last of them
    flagged final with the finish reason; together the tokens the non-streaming model returns."""
    import tritonclient.grpc as g

    from lmopt.triton_client import parse_response

    q: queue.Queue = queue.Queue()
    c = g.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    c.async_stream_infer("lm_stream", _inputs(g, "The list", max_tokens=6), enable_empty_final_response=True)
    responses = []
    while True:
        result, error = q.get(timeout=60)
        assert error is None, error
        responses.append(parse_response(result))
        if responses[-1].final:
            break
    c.stop_stream()
    c.close()
    tokens = [r.token_ids for r in responses]
    assert all(len(t) >= 1 for t in tokens[:-1])
    assert len(sum(tokens, [])) == 6  # tiny does not emit EOS this early
    assert [r.finish_reason for r in responses] == [None] * (len(responses) - 1) + ["length"]
    assert sum(tokens, []) == _infer(server, "The list", max_tokens=6)


def test_sampling_settings_and_seed(server):
    a = _infer(server, "The", max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = _infer(server, "The", max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert a == b and len(a) == 10
    assert len(_infer(server, "The")) == 8  # default_max_tokens of the repository


def test_metrics_count_requests(server):
    def count():
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics").read().decode()
        m = re.search(r'^nv_inference_request_success\{model="lm",version="1"\} (\d+)', text, re.M)
        return int(m.group(1)) if m else 0

    def settled(expected):  # metrics are refreshed on an interval (2 s): wait until they catch up
        deadline = time.time() + 15
        while count() != expected and time.time() < deadline:
            time.sleep(0.5)
        return count()

    # a request of an earlier test may still be on its way into the statistics (Triton records them after the
    # responses are out): start from a count the statistics and the metrics agree on
    deadline = time.time() + 40
    while True:
        before = server.stats("lm")["inference_stats"]["success"]["count"]
        if settled(before) == before or time.time() > deadline:
            break
    assert settled(before) == before
    for i in range(3):
        _infer(server, f"Count {i}", max_tokens=2)
    assert settled(before + 3) == before + 3


def test_dynamic_batching_groups_concurrent_requests(server):
    s0 = server.stats("lm")
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: _infer(server, f"Batch {i}", max_tokens=8), range(16)))
    deadline = time.time() + 10   # Triton records an execution's statistics after its responses are out
    while (s1 := server.stats("lm"))["inference_count"] - s0["inference_count"] < 16 and time.time() < deadline:
        time.sleep(0.2)
    n_inf = s1["inference_count"] - s0["inference_count"]
    n_exec = s1["execution_count"] - s0["execution_count"]
    assert all(len(o) == 8 for o in outs) and n_inf == 16
    assert n_exec < n_inf, f"{n_exec} executions for {n_inf} requests: not batched"


BAD_HTTP = [
    ("empty prompt", "/v2/models/lm/generate", {"text_input": ""}, "empty prompt"),
    ("prompt over context", "/v2/models/lm/generate", {"text_input": "word " * 600}, "exceeds the context length"),
    ("max_tokens 0", "/v2/models/lm/generate", {"text_input": "x", "max_tokens": 0}, "max_tokens must be > 0"),
    ("max_tokens negative", "/v2/models/lm_stream/generate_stream", {"text_input": "x", "max_tokens": -3},
     "max_tokens must be > 0"),
    ("max_tokens over cap", "/v2/models/lm/generate", {"text_input": "x", "max_tokens": CAP + 1},
     f"above this server's cap of {CAP}"),
    ("top_p out of range", "/v2/models/lm/generate", {"text_input": "x", "top_p": 1.5}, "top_p"),
    ("wrong JSON type", "/v2/models/lm/generate", {"text_input": "x", "max_tokens": "many"}, "data"),
    ("unknown model", "/v2/models/nope/generate", {"text_input": "x"}, "unknown model"),
]


@pytest.mark.parametrize("case", BAD_HTTP, ids=[c[0] for c in BAD_HTTP])
def test_bad_request_gets_error_naming_it(server, case):
    _, path, body, needle = case
    status, text = _post(server, path, json.dumps(body).encode())
    assert status >= 400 or '"error"' in text, text
    assert needle.lower() in text.lower(), text
    assert len(_infer(server, "Still serving", max_tokens=2)) == 2


def test_malformed_json_and_wrong_tensor_type_or_shape(server):
    from tritonclient.utils import InferenceServerException
    import tritonclient.grpc as g

    status, text = _post(server, "/v2/models/lm/generate", b'{"text_input": "x", ')
    assert status >= 400 and "JSON" in text  # Triton 2.51 answers 500 here, with the parse error
    c = g.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    x = _inputs(g, "The")[0]
    wrong_type = g.InferInput("max_tokens", [1, 1], "INT64")
    wrong_type.set_data_from_numpy(np.array([[4]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="max_tokens.*INT64.*expects 'INT32'"):
        c.infer("lm", [x, wrong_type])
    wrong_shape = g.InferInput("text_input", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="unexpected shape for input 'text_input'"):
        c.infer("lm", [wrong_shape])
    with pytest.raises(InferenceServerException, match="max_tokens 1000 is above"):
        c.infer("lm", _inputs(g, "The", max_tokens=1000))
    c.close()
    assert len(_infer(server, "Still serving", protocol="grpc", max_tokens=2)) == 2


def _metric(server, name: str, model: str = "lm_stream") -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics").read().decode()
    m = re.search(rf'^{name}\{{model="{model}"\}} (\S+)', text, re.M)
    return float(m.group(1)) if m else None


def _stream_many(server, requests: list[tuple[str, str, int]], timeout=120) -> tuple[dict[str, list[int]], list[str]]:
    """Send (request_id, prompt, max_tokens) on one gRPC stream to lm_stream at once; (token ids per request id that
    got its final response, error messages: an error on a stream names no request)."""
    import tritonclient.grpc as g

    q: queue.Queue = queue.Queue()
    c = g.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    for rid, text, n in requests:
        c.async_stream_infer("lm_stream", _inputs(g, text, max_tokens=n), request_id=rid,
                             enable_empty_final_response=True)
    tokens: dict[str, list[int]] = {}
    done, errors = set(), []
    try:
        while len(done) + len(errors) < len(requests):
            result, error = q.get(timeout=timeout)
            if error is not None:
                errors.append(str(error))
                continue
            resp = result.get_response()
            ids = result.as_numpy("token_ids")
            if ids is not None:
                tokens.setdefault(resp.id, []).extend(ids.reshape(-1).tolist())
            if resp.parameters["triton_final_response"].bool_param:
                done.add(resp.id)
                tokens.setdefault(resp.id, [])
    finally:
        c.stop_stream()
        c.close()
    return tokens, errors


@pytest.fixture(scope="module")
def in_process(server):
    from lmopt.engines import create_engine
    from lmopt.generate import SamplingParams, generate
    from lmopt.models import load_tokenizer

    eng, tok = create_engine("ort", "tiny", artifacts=str(server.artifacts), threads=1), load_tokenizer("tiny")

    def tokens(text, n):
        return generate(eng, [tok(text)["input_ids"]],
                        SamplingParams(max_new_tokens=n, stop_token_ids=(tok.eos_token_id,))).tokens[0]

    yield tokens
    eng.close()


def test_concurrent_streams_of_different_lengths_equal_in_process(server, in_process):
    prompts = ["The list", "def f(", "A class attribute", "The import statement", "Exceptions", "for x in",
               "The with statement", "Numbers", "Return a new", "import"]
    lengths = [3, 40, 7, 64, 12, 25, 5, 50, 2, 33]
    steps0, tokens0 = _metric(server, "lm_scheduler_steps_total") or 0, _metric(server, "lm_scheduler_tokens_total") or 0
    got, errors = _stream_many(server, [(f"mix-{i}", p, n) for i, (p, n) in enumerate(zip(prompts, lengths))])
    assert not errors
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert got[f"mix-{i}"] == in_process(p, n), (p, n)
    # requests shared decode steps: more tokens than steps (in-flight batching, not one request at a time; how many
    # more depends on how the arrivals spread, which a busy machine changes)
    deadline = time.time() + 10
    while (_metric(server, "lm_scheduler_tokens_total") or 0) - tokens0 < sum(lengths) and time.time() < deadline:
        time.sleep(0.2)
    d_tokens = _metric(server, "lm_scheduler_tokens_total") - tokens0
    d_steps = _metric(server, "lm_scheduler_steps_total") - steps0
    assert d_tokens == sum(len(t) for t in got.values()) and d_steps < d_tokens, (d_steps, d_tokens)
    # the non-streaming model, concurrently
    with ThreadPoolExecutor(4) as pool:
        unary = list(pool.map(lambda pn: _infer(server, pn[0], max_tokens=pn[1]), zip(prompts[:6], lengths[:6])))
    assert unary == [in_process(p, n) for p, n in zip(prompts[:6], lengths[:6])]


def test_full_queue_gets_busy_error_and_server_keeps_serving(server, in_process):
    n = 3 * (SLOTS + QUEUE)
    served, busy = _stream_many(server, [(f"flood-{i}", "The list", CAP) for i in range(n)])
    assert busy and all("server busy: " in e for e in busy), set(busy)
    assert len(served) + len(busy) == n and len(served) >= SLOTS + QUEUE
    assert all(t == in_process("The list", CAP) for t in served.values())
    assert _infer(server, "Still serving", max_tokens=3) == in_process("Still serving", 3)


def test_client_disconnect_mid_stream_cancels_request(server):
    import tritonclient.grpc as g

    def leave_early(request_id: str) -> None:
        q: queue.Queue = queue.Queue()
        c = g.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        c.start_stream(callback=lambda result, error: q.put((result, error)))
        c.async_stream_infer("lm_stream", _inputs(g, "The", max_tokens=CAP), request_id=request_id)
        result, error = q.get(timeout=60)     # the first response, then the client leaves
        assert error is None
        c.stop_stream(cancel_requests=True)
        c.close()

    # The engine loop does not wait for the sender thread, so on a loaded machine a tiny model can finish all CAP
    # tokens before the client's cancellation reaches the server: then there is nothing left to stop, and the
    # request is tried again, up to 5 times (a cancellation the server sees in time stops it mid-answer).
    pat = re.compile(r"request '(leaves-early-\d)' cancelled after (\d+) tokens")

    def stopped_mid_answer() -> list:
        return [n for _, n in pat.findall(server.log.read_text()) if int(n) < CAP]

    for attempt in range(5):
        leave_early(f"leaves-early-{attempt}")
        deadline = time.time() + 10
        while not stopped_mid_answer() and time.time() < deadline:
            time.sleep(0.2)
        if stopped_mid_answer():
            break
    # an HTTP SSE client that closes its socket after the first event
    s = socket.create_connection(("127.0.0.1", server.http))
    body = json.dumps({"text_input": "The", "max_tokens": CAP}).encode()
    s.sendall(b"POST /v2/models/lm_stream/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    # the headers and the first event can arrive in separate packets: read until the first event
    s.settimeout(60)
    got = b""
    while b"data:" not in got:
        chunk = s.recv(4096)
        assert chunk, f"stream closed before the first event: {got[-300:]!r}"
        got += chunk
    s.close()
    assert stopped_mid_answer(), ("in 5 tries no request was stopped mid-answer: the server generated the whole "
                                  f"answer for clients that left ({pat.findall(server.log.read_text())}; log: "
                                  f"{[l for l in server.log.read_text().splitlines() if 'cancel' in l][-6:]})")
    def slots_settle_at_zero() -> bool:
        deadline = time.time() + 10
        while _metric(server, "lm_scheduler_slots_in_use") != 0 and time.time() < deadline:
            time.sleep(0.2)
        return _metric(server, "lm_scheduler_slots_in_use") == 0

    # both cancelled requests gave their slots back: the gauge reads 0 once the scheduler is idle. (Once in several
    # loaded CI runs it still read 1 ten seconds after both cancellations were logged; a short request after them
    # tells a slot still held, which it would find taken, from a gauge update that did not arrive.)
    if not slots_settle_at_zero():
        got, errors = _stream_many(server, [("after-the-cancellations", "After", 2)])
        assert not errors and len(got["after-the-cancellations"]) == 2, (got, errors)
        assert slots_settle_at_zero(), f"a cancelled request kept its slot ({server.stats('lm_stream')})"
    assert _metric(server, "lm_scheduler_queue_length") == 0
    assert len(_infer(server, "Still serving", max_tokens=2)) == 2


def test_user_errors_are_one_line(tmp_path):
    proc = run_cli("serve/make_model_repository.py", "--model", "tiny", "--artifacts", str(tmp_path / "a"),
                   "--precision", "fp32", check=False)
    assert_one_line_error(proc, "export/fp32/manifest.json", "make export")
    assert not list((tmp_path / "a").rglob("model_repository"))
    proc = run_cli("serve/make_model_repository.py", "--engine", "onnx", check=False)
    assert_one_line_error(proc, "unknown --engine")
    proc = run_cli("serve/make_model_repository.py", "--gil-switch-us", "-1", check=False)
    assert_one_line_error(proc, "--gil-switch-us must be >= 0")
    proc = run_cli("serve/make_model_repository.py", "--decode-kernels", "fused", check=False)
    assert_one_line_error(proc, "options of the compiled engine", "--engine compiled")
    proc = subprocess.run(["bash", str(RUN), str(tmp_path / "none")], text=True, capture_output=True)
    assert_one_line_error(proc, "does not exist", "make serve-repo")
    port = _free_ports(1)[0]
    proc = run_cli("serve/client/infer_client.py", "--http-port", str(port), check=False)
    assert_one_line_error(proc, "no ready Triton server", "run_triton.sh")


@pytest.fixture(scope="module")
def soak_server(tiny_export, artifacts, tmp_path_factory):
    """A second server sized for 64 streams (8 slots + 128 waiting), on its own artifacts root that links the
    export, so its repository does not replace the one the first server runs."""
    root = tmp_path_factory.mktemp("soak-artifacts")
    (root / "tiny" / "export").mkdir(parents=True)
    (root / "tiny" / "export" / "fp32").symlink_to(tiny_export, target_is_directory=True)
    run_cli("serve/make_model_repository.py", "--model", "tiny", "--artifacts", str(root), "--precision", "fp32",
            "--max-tokens-cap", "64", "--slots", "8", "--max-queue", "128", "-q")
    srv = Server(root, root / "tiny" / "serve" / VARIANT / "model_repository", tmp_path_factory.mktemp("soak"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_soak_64_streams_with_random_cancellation(soak_server, tmp_path):
    # 60 s of load: long enough for memory to settle and for cancellations to land at every stage of a request
    out = tmp_path / "soak.json"
    run_cli("serve/soak.py", "--pid-file", str(soak_server.pid_file), "--grpc-port", str(soak_server.grpc),
            "--http-port", str(soak_server.http), "--metrics-port", str(soak_server.metrics), "--clients", "64",
            "--duration", "60", "--max-new-tokens", "32", "--cancel-fraction", "0.25", "--timeout", "30",
            "--artifacts", str(soak_server.artifacts), "--out", str(out), "-q", timeout=240)
    s = read_json(out)["summary"]
    assert s["failed"] == 0, s["failed_examples"]
    assert s["cancelled"] > 0 and s["completed"] > 64
    assert s["slots_in_use_after"] == 0          # every cancelled request gave its slot back
    assert abs(s["rss_change_pct"]) <= 5.0, s["server_rss_mb"]


def test_auto_precision_serves_the_faster_measured_graph(tiny_export, tmp_path, monkeypatch):
    """--precision auto: FP32 and the CPU INT8 graph (present only when it met its accuracy budget) are timed, and the
    faster one is served; the manifest says which and why. The timings are faked here (which graph is faster depends
    on the CPU); the speed check itself runs for real on FP32."""
    repo = load_script("serve/make_model_repository.py")
    root = tmp_path / "a"
    (root / "tiny" / "export").mkdir(parents=True)
    (root / "tiny" / "export" / "fp32").symlink_to(tiny_export, target_is_directory=True)
    s = repo.RepoSettings(artifacts=str(root))
    assert repo.resolve_precision(s)[0] == "fp32"  # no INT8 graph: FP32, without a speed check
    real = repo._speed_check(s, "fp32", tokens=4, repeats=1)
    assert 0 < real < 1000
    int8 = root / "tiny" / "quantize" / "int8-cpu"
    int8.mkdir(parents=True)
    (int8 / "manifest.json").write_text(json.dumps({
        "stage": "quantize", "precision": "int8", "targets": ["onnxruntime"], "default": True,
        "accuracy": {"ppl_increase_pct": 0.4}, "settings": {"max_ppl_increase": 1.0}}))
    for fast, slow in (("fp32", "int8"), ("int8", "fp32")):
        times = {fast: 1.87, slow: 5.72}
        monkeypatch.setattr(repo, "_speed_check", lambda s, p, **kw: times[p])
        precision, choice = repo.resolve_precision(s)
        assert precision == fast and choice["candidates"][slow]["ms_per_token"] == 5.72
        assert "fastest measured here: 1.87 ms/token" in choice["reason"]
    assert choice["candidates"]["int8"]["accuracy"] == {"ppl_increase_pct": 0.4}


# ---- the raw protobuf request and response helpers (the OpenAI gateway's path to Triton) --------------------------
@pytest.mark.parametrize("req", [
    dict(input_ids=[5, 300, 4095], max_tokens=8, temperature=0.0, top_p=1.0),
    dict(input_ids=[1], max_tokens=3, temperature=0.7, top_p=0.9, seed=-(2**63), stop="\n\né"),
    dict(prompt="def f(", max_tokens=16)])
@pytest.mark.parametrize("batch_dim", [True, False])
def test_infer_request_pb_is_what_tritonclient_sends(req, batch_dim):
    import tritonclient.grpc.aio as aio
    from tritonclient.grpc._utils import _get_inference_request

    from lmopt.triton_client import GenRequest, infer_request_pb, stream_request

    r = GenRequest(**req)
    item = stream_request(aio, r, "rid", "lm_stream", batch_dim)
    want = _get_inference_request(model_name=item["model_name"], inputs=item["inputs"], model_version="",
                                  request_id=item["request_id"], outputs=None, sequence_id=0, sequence_start=False,
                                  sequence_end=False, priority=0, timeout=None, parameters=item["parameters"])
    assert infer_request_pb(r, "rid", "lm_stream", batch_dim).SerializeToString() == want.SerializeToString()


@pytest.mark.parametrize("ids, final, reason", [([7], False, None), ([1, 2, 2**40], False, None), ([], True, "length"),
                                                ([5], True, "stop"), ([], True, None)])
def test_parse_response_pb_equals_parse_response(ids, final, reason):
    from tritonclient.grpc import InferResult, service_pb2

    from lmopt.detokenize import FINISH_REASONS
    from lmopt.triton_client import FINAL_FLAG, parse_response, parse_response_pb

    resp = service_pb2.ModelInferResponse(model_name="lm_stream", id="rid")
    if ids:
        resp.outputs.add(name="text_output", datatype="BYTES", shape=[1, 1])
        resp.raw_output_contents.append(np.array([3], "<u4").tobytes() + b"abc")
        resp.outputs.add(name="token_ids", datatype="INT64", shape=[1, len(ids)])
        resp.raw_output_contents.append(np.array(ids, "<i8").tobytes())
    if reason is not None:  # a request's last response carries why it ended
        resp.outputs.add(name="finish_reason", datatype="INT32", shape=[1, 1])
        resp.raw_output_contents.append(np.array([FINISH_REASONS.index(reason)], "<i4").tobytes())
    resp.parameters[FINAL_FLAG].bool_param = final
    got, want = parse_response_pb(resp), parse_response(InferResult(resp))
    assert (got.token_ids, got.final, got.finish_reason) == (want.token_ids, want.final, want.finish_reason) == \
        (ids, final, reason)


@pytest.fixture(scope="module")
def reference_text(server):
    """The offline path's greedy text and finish reason for a prompt (ORT FP32, as served)."""
    from lmopt.engines import create_engine
    from lmopt.generate import SamplingParams, generate_text
    from lmopt.models import load_tokenizer

    eng, tok = create_engine("ort", "tiny", artifacts=str(server.artifacts), threads=1), load_tokenizer("tiny")

    def ref(prompt, n):
        (text,), out = generate_text(eng, tok, [prompt], SamplingParams(max_new_tokens=n,
                                                                        stop_token_ids=(tok.eos_token_id,)))
        return text, out.finish_reasons[0]

    yield ref
    eng.close()


@pytest.mark.parametrize("case, prompt", __import__("stop_cases").cases(single_only=True))
def test_stop_string_table_through_triton(server, reference_text, case, prompt):
    """The shared stop-string table (tests/stop_cases.py) through lm_stream and lm: the same text and finish reason
    as offline (tests/test_scheduler.py) and through the gateway (tests/test_openai.py)."""
    import tritonclient.grpc as g

    from lmopt.detokenize import FINISH_REASONS
    from lmopt.triton_client import GenRequest, GrpcStream
    from stop_cases import CASES, MAX_TOKENS, expected

    full, reason = reference_text(prompt, MAX_TOKENS)
    stops = CASES[case](full)
    want = expected(stops, full, reason)
    req = GenRequest(prompt=prompt, max_tokens=MAX_TOKENS, stop=stops[0] if stops else None)
    with GrpcStream(f"127.0.0.1:{server.grpc}") as st:
        pieces = list(st.generate(req))
    assert ("".join(p.text for p in pieces), pieces[-1].finish_reason) == want
    c = g.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    try:
        res = c.infer("lm", _inputs(g, prompt, max_tokens=MAX_TOKENS, stop=req.stop))
    finally:
        c.close()
    text = res.as_numpy("text_output").reshape(-1)[0].decode()
    assert (text, FINISH_REASONS[int(res.as_numpy("finish_reason").reshape(-1)[0])]) == want


HISTOGRAMS = ("lm_time_to_first_token_seconds", "lm_inter_token_latency_seconds",
              "lm_request_time_per_output_token_seconds", "lm_e2e_request_latency_seconds",
              "lm_request_queue_time_seconds")


def test_latency_histograms_on_the_metrics_endpoint(server):
    """What a user scrapes: the latency histograms in Prometheus' text format on Triton's metrics port, beside the
    gauges: cumulative buckets ending in le="+Inf", _sum and _count, and a count that grows with the streams sent."""
    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics").read().decode()

    def count(text: str, name: str) -> int:
        m = re.search(rf'^{name}_count\{{model="lm_stream"\}} (\S+)', text, re.M)
        return int(float(m.group(1))) if m else 0

    from lmopt.triton_client import scrape_metrics, served_timeline

    url = f"http://127.0.0.1:{server.metrics}/metrics"
    before, snap0 = scrape(), scrape_metrics(url)
    n = 3
    # 24 tokens each: several responses per stream even when the sender merges tokens (inter-token latency)
    tokens, errors = _stream_many(server, [(f"h{i}", "The list", 24) for i in range(n)])
    assert not errors and all(len(t) == 24 for t in tokens.values())
    deadline = time.time() + 15   # observations are made by the model's metrics thread, shortly after
    while count(scrape(), "lm_e2e_request_latency_seconds") < count(before, "lm_e2e_request_latency_seconds") + n \
            and time.time() < deadline:
        time.sleep(0.2)
    text = scrape()
    assert re.search(r"^# TYPE lm_scheduler_slots_in_use gauge", text, re.M)
    for name in HISTOGRAMS:
        assert re.search(rf"^# TYPE {name} histogram", text, re.M), name
        buckets = [(float(le), float(v)) for le, v in
                   re.findall(rf'^{name}_bucket\{{model="lm_stream",le="([^"]+)"\}} (\S+)', text, re.M)]
        assert buckets and buckets[-1][0] == float("inf"), name
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), name   # cumulative
        assert buckets[-1][1] == count(text, name), name
        assert re.search(rf'^{name}_sum\{{model="lm_stream"\}} \S+', text, re.M), name
    for name in ("lm_time_to_first_token_seconds", "lm_e2e_request_latency_seconds", "lm_request_queue_time_seconds",
                 "lm_request_time_per_output_token_seconds"):   # one observation per request
        assert count(text, name) >= count(before, name) + n, name
    assert count(text, "lm_inter_token_latency_seconds") > count(before, "lm_inter_token_latency_seconds")
    # the per-step timeline a GPU run records (docs/serving.md): counters pushed when the scheduler went idle
    deadline = time.time() + 15
    while (tl := served_timeline(snap0, scrape_metrics(url)))["responses_per_step"] is None and time.time() < deadline:
        time.sleep(0.2)
    assert tl["steps"] > 0 and tl["step_ms"] > 0 and 0 < tl["engine_share"] <= 1 and tl["host_ms_per_step"] >= 0
    assert tl["send_ms_per_response"] > 0 and tl["tokens_per_step"] > 0, tl


def test_served_timeline_script_reads_the_step_split(server, tmp_path):
    """profile/served_timeline.py against the running server: the per-step timeline from the metrics port."""
    out = tmp_path / "tl.json"
    run_cli("profile/served_timeline.py", "--model", "tiny", "--grpc-port", str(server.grpc), "--metrics-port",
            str(server.metrics), "--streams", "2", "--requests", "1", "--max-new-tokens", "8", "--out", str(out),
            "-q")
    s = read_json(out)["summary"]
    assert s["tokens"] == 16 and s["steps"] > 0 and 0 < s["engine_share"] <= 1 and s["send_ms_per_response"] > 0
