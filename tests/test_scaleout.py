"""Scale-out: model instances on every GPU of a host (the generated config only: no GPU here), replicas behind
HAProxy with a replica killed under load, and the Kubernetes manifests against the Kubernetes schemas."""
from __future__ import annotations

import subprocess

import pytest

from conftest import REPO, assert_one_line_error, load_script, run_cli

from lmopt.errors import UserError


def _parse(text: str):
    """The generated config.pbtxt parsed by Triton's own ModelConfig schema."""
    m = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(text, m.ModelConfig())


def test_gpus_list_gives_one_instance_group_entry_per_gpu():
    repo = load_script("serve/make_model_repository.py")
    s = repo.RepoSettings(engine="compiled", device="cuda", instances=2, gpus="0,1")
    gpus = repo.resolve_gpus(s.gpus, s.device)
    assert gpus == [0, 1]
    for name, decoupled in (("lm", False), ("lm_stream", True)):
        cfg = _parse(repo.config_pbtxt(name, s, "fp16", decoupled, {"engine": "compiled"}, gpus))
        groups = [(g.count, g.kind, list(g.gpus)) for g in cfg.instance_group]
        kind_gpu = type(cfg.instance_group[0]).KIND_GPU
        assert groups == [(2, kind_gpu, [0]), (2, kind_gpu, [1])]
    # without --gpus: one entry, Triton's placement (as before)
    cfg = _parse(repo.config_pbtxt("lm", repo.RepoSettings(device="cuda"), "fp16", False, {}, []))
    assert len(cfg.instance_group) == 1 and not cfg.instance_group[0].gpus


def test_gpus_all_counts_the_machines_gpus(monkeypatch):
    repo = load_script("serve/make_model_repository.py")
    monkeypatch.setattr(repo, "count_gpus", lambda: 2)
    assert repo.resolve_gpus("all", "cuda") == [0, 1]
    monkeypatch.setattr(repo, "count_gpus", lambda: 0)
    with pytest.raises(UserError, match="--gpus 0,1"):
        repo.resolve_gpus("all", "cuda")
    for bad, msg in (("0,x", "list of GPU indices"), ("1,1", "distinct"), ("-1", ">= 0")):
        with pytest.raises(UserError, match=msg):
            repo.resolve_gpus(bad, "cuda")


def test_gpus_without_cuda_is_a_one_line_error(tmp_path):
    proc = run_cli("serve/make_model_repository.py", "--artifacts", str(tmp_path / "a"), "--gpus", "0,1",
                   check=False)
    assert_one_line_error(proc, "--device cuda")
    assert not (tmp_path / "a").exists()


def test_engines_place_onnx_runtime_on_the_instance_gpu():
    from lmopt.engines.base import cuda_device_id

    assert [cuda_device_id(d) for d in ("cuda", "cuda:0", "cuda:3")] == [0, 0, 3]


K8S = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.31.0"


def _k8s_resources():
    import yaml

    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_kubernetes_manifests_pass_schema_validation():
    """Every manifest in deploy/kubernetes against the Kubernetes OpenAPI schemas, strict (unknown fields fail);
    the schemas ship inside kubernetes-validate, so this runs offline."""
    import kubernetes_validate as kv  # requirements.txt: a missing install fails here rather than skipping
    docs = _k8s_resources()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for name, d in docs:
        kv.validate(d, K8S_VERSION, strict=True)  # raises ValidationError naming the field
    bad = next(d for _, d in docs if d["kind"] == "Deployment")
    bad = {**bad, "spec": {**bad["spec"], "replica": 2}}          # a typo is caught, not ignored
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_kubernetes_deployment_probes_gpu_and_autoscaling_metric():
    docs = {d["kind"]: d for _, d in _k8s_resources()}
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    assert c["args"][0].startswith("/artifacts/") and c["volumeMounts"][0]["mountPath"] == "/artifacts"
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    # the metric the model's scheduler exports on the metrics port (serve/templates/model.py)
    metric = hpa["metrics"][0]["pods"]["metric"]["name"]
    assert metric in (REPO / "serve" / "templates" / "model.py").read_text()


def test_kubernetes_manifest_gateway_binds_beyond_loopback_only_with_a_key_from_a_secret():
    """The OpenAI gateway beside Triton listens on 0.0.0.0, so its API key comes from a Secret (never a literal in
    the manifest); its arguments are ones serve/openai_server.py takes; the Service exposes its port."""
    docs = {d["kind"]: d for _, d in _k8s_resources()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    gw = next(c for c in pod["containers"] if "serve/openai_server.py" in c["command"] + c.get("args", []))
    args = load_script("serve/openai_server.py").build_parser().parse_args(gw["args"])
    assert args.host == "0.0.0.0" and args.triton_grpc == "127.0.0.1:8001" and not args.api_key
    env = {e["name"]: e for e in gw["env"]}
    assert "value" not in env["LMOPT_API_KEY"]
    assert set(env["LMOPT_API_KEY"]["valueFrom"]["secretKeyRef"]) == {"name", "key"}   # not optional: fail closed
    assert "LMOPT_API_KEY" in (REPO / "serve" / "openai_server.py").read_text()
    assert gw["readinessProbe"]["httpGet"]["path"] == "/health"        # the one route that needs no key
    assert {p["containerPort"] for p in gw["ports"]} == {args.port}
    assert args.port in {p["port"] for p in docs["Service"]["spec"]["ports"]}


@pytest.fixture(scope="module")
def replica_root(tiny_export, tmp_path_factory):
    """An artifacts root with the tiny model's FP32 repository (its own, linking the shared export)."""
    import shutil

    pytest.importorskip("tritonclient.grpc")
    if not shutil.which("haproxy"):
        pytest.skip("haproxy not installed (make setup-haproxy could not install it: see its message)")
    root = tmp_path_factory.mktemp("replicas")
    (root / "tiny" / "export").mkdir(parents=True)
    (root / "tiny" / "export" / "fp32").symlink_to(tiny_export, target_is_directory=True)
    run_cli("serve/make_model_repository.py", "--model", "tiny", "--artifacts", str(root), "--precision", "fp32", "-q")
    return root


def _left(root) -> list[str]:
    """Processes whose command line names `root` (servers, backend stubs, the balancer, the gateway)."""
    return subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()


def test_replicas_serve_http_grpc_stream_and_openai_through_the_balancer(replica_root):
    import json
    import os
    import sys
    import urllib.request

    from lmopt.serving import free_ports
    from lmopt.triton_client import GenRequest, GrpcStream

    http, grpc, stats, openai = free_ports(4)
    env = dict(os.environ, PYTHON=sys.executable, REPLICAS="2", HTTP_PORT=str(http), GRPC_PORT=str(grpc),
               STATS_PORT=str(stats), OPENAI_PORT=str(openai))
    script = ["bash", str(REPO / "serve" / "run_replicas.sh")]
    start = subprocess.run(script + ["start", "tiny", str(replica_root)], env=env, capture_output=True, text=True,
                           timeout=300)
    try:
        assert start.returncode == 0, start.stderr
        assert start.stdout.count("replica ") == 2
        body = json.dumps({"text_input": "hello", "max_tokens": 4}).encode()
        for _ in range(4):  # both replicas answer over HTTP
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{http}/v2/models/lm/generate",
                                                               data=body), timeout=30) as r:
                assert len(json.loads(r.read())["token_ids"]) == 4
        with GrpcStream(f"127.0.0.1:{grpc}", timeout=30) as st:   # gRPC streaming over HTTP/2 through HAProxy
            pieces = list(st.generate(GenRequest(prompt="hello", max_tokens=5)))
        assert sum(len(p.token_ids) for p in pieces) == 5 and pieces[-1].final
        req = urllib.request.Request(f"http://127.0.0.1:{openai}/v1/completions", headers={"content-type":
                                     "application/json"}, data=json.dumps({"model": "tiny", "prompt": "hi",
                                                                            "max_tokens": 3}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{stats}/stats;csv", timeout=5) as r:
            rows = [line.split(",") for line in r.read().decode().splitlines() if line.startswith("triton_")]
        served = {(row[0], row[1]): int(row[7]) for row in rows if row[1] in ("r0", "r1")}  # stot: sessions
        assert all(served[("triton_http", r)] >= 1 for r in ("r0", "r1")), served   # balanced over both
        again = subprocess.run(script + ["start", "tiny", str(replica_root)], env=env, capture_output=True, text=True)
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        subprocess.run(script + ["stop", "tiny", str(replica_root)], env=env, capture_output=True, timeout=120)
    assert not _left(replica_root), "processes left after stop"


def test_fault_test_kills_a_replica_and_the_survivor_serves_the_rest(replica_root, tmp_path):
    """Two replicas behind HAProxy, 15 s of streaming load, one replica SIGKILLed at a random moment: only requests in
    flight on it fail, each with an error and none hanging; every request sent after the kill completes on the
    survivor; the balancer takes the dead replica out within its health-check window; no process is left."""
    root = replica_root
    out = tmp_path / "fault.json"
    run_cli("profile/fault_test.py", "--artifacts", str(root), "--duration", "15", "--clients", "4",
            "--max-new-tokens", "16", "--timeout", "20", "--out", str(out), "-q", timeout=240)
    import json

    s = json.loads(out.read_text())["summary"]
    assert s["hung"] == 0
    # every failure had been sent to the killed replica (HAProxy's log); requests sent to it in the moment after the
    # SIGKILL, before its connections were reset, fail like those in flight; none on the survivor
    assert s["failed_on_survivor"] == 0, s["errors"]
    assert s["failed"] == s["failed_on_killed_replica"] + s["failed_not_in_balancer_log"]
    assert s["failed"] <= s["in_flight_at_kill"] + s["sent_after_kill_to_killed_replica"]
    assert s["failure_latency_s"]["max"] is None or s["failure_latency_s"]["max"] < 20
    assert all(e.strip() for e in s["errors"]) and bool(s["errors"]) == (s["failed"] > 0)   # each with its error
    assert s["sent_after_kill"] > 0
    assert s["completed_after_kill"] == s["sent_after_kill"] - s["sent_after_kill_to_killed_replica"]
    survivor = "r1" if s["killed_replica"] == "r0" else "r0"
    # HAProxy's log: which replica each request sent after the kill went to ("?": its line was not yet in the log when
    # it was read). Every one sent after the kill is accounted for; those the killed replica took in the moment of the
    # SIGKILL (before the balancer saw it down) failed; every completed one was served by the survivor.
    by, done_by = s["after_kill_served_by"], s["after_kill_completed_by"]
    assert sum(by.values()) == s["sent_after_kill"]
    assert by.get(s["killed_replica"], 0) == s["sent_after_kill_to_killed_replica"]
    assert done_by.get(s["killed_replica"], 0) == 0
    assert done_by.get(survivor, 0) + done_by.get("?", 0) == s["completed_after_kill"]
    assert done_by.get(survivor, 0) >= 0.9 * s["completed_after_kill"]
    assert s["sent_after_kill_to_killed_replica"] <= 4     # at most one per client, in the moment of the kill
    assert set(s["taken_out_after_s"]) == {"triton_http", "triton_grpc"}
    assert max(s["taken_out_after_s"].values()) < 0.5 * (2 + 1) + 1.0   # check every 0.5 s, out after 2 failures
    assert s["completed"] > 20
    assert not _left(root), "processes left after the test"
