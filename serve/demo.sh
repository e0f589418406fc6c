#!/usr/bin/env bash
# `make serve-demo`: start Triton on the newest model repository of MODEL, send unary and streaming requests over
# HTTP and gRPC with the greedy check against the in-process engine (PASS/FAIL), then stop the server.
#
#   bash serve/demo.sh [MODEL] [ARTIFACTS]      # defaults: tiny artifacts; ports: HTTP_PORT/GRPC_PORT/METRICS_PORT
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-tiny}" ART="${2:-artifacts}"
HTTP_PORT="${HTTP_PORT:-8000}" GRPC_PORT="${GRPC_PORT:-8001}" METRICS_PORT="${METRICS_PORT:-8002}"
PY="${PYTHON:-.venv/bin/python}"
# the repository serve-repo wrote last (--check then asks the server which model and engine it runs)
read -r VARIANT REPO < <("$PY" - "$ART" "$MODEL" <<'PY'
import sys
sys.path.insert(0, ".")
from lmopt.manifest import list_variants
from lmopt.paths import stage_dir
v = list_variants(sys.argv[1], sys.argv[2], "serve")
best = max(v, key=lambda k: v[k].get("created", "")) if v else None
print(best, stage_dir(sys.argv[1], sys.argv[2], "serve", best) / "model_repository" if best else "-")
PY
)
[ "$VARIANT" != "None" ] || { echo "error: no model repository for $MODEL under $ART — run: make serve-repo" >&2; exit 1; }
RUN_DIR="$(mktemp -d)"
PIDF="$RUN_DIR/triton.pid"
trap 'bash serve/run_triton.sh stop --pid-file "$PIDF" >/dev/null 2>&1 || true; rm -rf "$RUN_DIR"' EXIT
bash serve/run_triton.sh "$REPO" --background --pid-file "$PIDF" --log-file "$RUN_DIR/triton.log" \
  --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT"
C=(--http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT")   # --check asks the server which model and engine it runs
echo "== HTTP, unary, 3 prompts concurrently (model lm, dynamic batching) =="
"$PY" serve/client/infer_client.py "${C[@]}" --check --concurrency 3 \
  --prompt "The list" --prompt "def f(" --prompt "A class attribute"
echo "== gRPC, streaming (model lm_stream, one response per token) =="
"$PY" serve/client/infer_client.py "${C[@]}" --check --protocol grpc --stream --prompt "The import statement"
echo "== HTTP generate_stream (server-sent events), sampling =="
"$PY" serve/client/infer_client.py "${C[@]}" --api generate --stream --temperature 0.8 --top-k 40 --top-p 0.95 \
  --seed 1 --prompt "Exceptions"
echo "== server statistics =="
"$PY" - "$HTTP_PORT" <<'PY'
import json, sys, urllib.request
for m in ("lm", "lm_stream"):
    s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/models/{m}/stats"))["model_stats"][0]
    print(f"{m}: {s['inference_count']} requests in {s['execution_count']} executions")
PY
