#!/usr/bin/env bash
# `make serve-openai` / `make serve-stop`: Triton (serve/run_triton.sh) on the newest model repository of MODEL plus
# the OpenAI-compatible gateway (serve/openai_server.py) in front of it, both in the background; prints the base URL.
#
#   bash serve/serve_openai.sh start [MODEL] [ARTIFACTS]   # ports: OPENAI_PORT (8080); HTTP_PORT/GRPC_PORT/METRICS_PORT
#                                                          # READY_TIMEOUT_S (120): a GPU engine compiling at load
#                                                          # SERVED_MODEL_NAME: the `model` clients send
#   bash serve/serve_openai.sh stop  [MODEL] [ARTIFACTS]   # stops both; no process is left
#   bash serve/serve_openai.sh stop-all "" [ARTIFACTS]     # `make serve-stop`: what serve-openai and serve-replicas
#                                                          # started for any model under ARTIFACTS
#
# Pid files and logs: ARTIFACTS/<model key>/serve/run/{triton,openai}.{pid,log} (the key: lmopt.models.model_key). Both run in their own process group, so
# stopping one stops everything it started (Triton's backend stubs included). Env: PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
ACTION="${1:-}" MODEL="${2:-tiny}" ART="${3:-artifacts}"
OPENAI_PORT="${OPENAI_PORT:-8080}" HTTP_PORT="${HTTP_PORT:-8000}" GRPC_PORT="${GRPC_PORT:-8001}"
METRICS_PORT="${METRICS_PORT:-8002}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-120}"   # seconds each of Triton and the gateway may take to become ready
PY="${PYTHON:-.venv/bin/python}"
# the gateway imports this checkout's lmopt package
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
die() { echo "error: $*" >&2; exit 1; }
KEY="$("$PY" -c 'import sys; from lmopt.models import model_key; print(model_key(sys.argv[1]))' "$MODEL")"
RUN="$ART/$KEY/serve/run"

stop_gateway() {
  local f="$RUN/openai.pid" pgid i
  [ -f "$f" ] || return 0
  pgid="$(cat "$f")"
  if kill -TERM -- "-$pgid" 2>/dev/null; then
    for i in $(seq 1 40); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
  rm -f "$f"
  echo "openai gateway stopped"
}

stop_run() {  # stop_run DIR: the gateway and Triton whose pid files are in DIR
  RUN="$1"
  [ -f "$RUN/openai.pid" ] || [ -f "$RUN/triton.pid" ] || return 1
  stop_gateway
  [ ! -f "$RUN/triton.pid" ] || bash serve/run_triton.sh stop --pid-file "$RUN/triton.pid"
}

case "$ACTION" in
  stop) stop_run "$RUN" || echo "nothing running under $RUN"; exit 0 ;;
  stop-all)
    n=0
    for d in "$ART"/*/serve/run; do [ -d "$d" ] && stop_run "$d" && n=$((n + 1)) || true; done
    for d in "$ART"/*/serve/run-replicas; do
      [ -n "$(ls "$d"/*.pid 2>/dev/null)" ] && RUN_DIR="$d" bash serve/run_replicas.sh stop && n=$((n + 1)) || true
    done
    [ "$n" -gt 0 ] || echo "nothing running under $ART"
    exit 0 ;;
  start) ;;
  *) die "usage: bash serve/serve_openai.sh start|stop [MODEL] [ARTIFACTS], or stop-all \"\" [ARTIFACTS]" ;;
esac

for f in openai triton; do
  if [ -f "$RUN/$f.pid" ] && kill -0 -- "-$(cat "$RUN/$f.pid")" 2>/dev/null; then
    die "already running ($RUN/$f.pid) — run: make serve-stop"
  fi
  rm -f "$RUN/$f.pid"
done
# the repository serve-repo wrote last
REPO="$("$PY" -c "import sys; from lmopt.serving import newest_repository as n; print(n(*sys.argv[1:]) or '-')" "$ART" "$MODEL")"
[ "$REPO" != "-" ] || die "no model repository for $MODEL under $ART — run: make serve-repo"
mkdir -p "$RUN"
# refuse a busy gateway port before Triton is started
"$PY" -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $OPENAI_PORT))" \
  2>/dev/null || die "OPENAI_PORT $OPENAI_PORT is in use — pick a free one: make serve-openai OPENAI_PORT=..."

bash serve/run_triton.sh "$REPO" --background --pid-file "$RUN/triton.pid" --log-file "$RUN/triton.log" \
  --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" --timeout "$READY_TIMEOUT_S"
setsid "$PY" serve/openai_server.py --port "$OPENAI_PORT" --triton-grpc "127.0.0.1:$GRPC_PORT" \
  ${SERVED_MODEL_NAME:+--served-model-name "$SERVED_MODEL_NAME"} >"$RUN/openai.log" 2>&1 </dev/null &
echo "$!" > "$RUN/openai.pid"
for i in $(seq 1 $((READY_TIMEOUT_S * 2))); do
  if "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$OPENAI_PORT/health', timeout=2)" 2>/dev/null
  then
    echo "OpenAI-compatible endpoint ready: base URL http://127.0.0.1:$OPENAI_PORT/v1  (model: ${SERVED_MODEL_NAME:-$MODEL})"
    echo "logs: $RUN/openai.log $RUN/triton.log; stop: make serve-stop"
    exit 0
  fi
  kill -0 "$(cat "$RUN/openai.pid")" 2>/dev/null || break
  sleep 0.5
done
tail -n 20 "$RUN/openai.log" >&2
stop_gateway >/dev/null
bash serve/run_triton.sh stop --pid-file "$RUN/triton.pid" >/dev/null
die "the gateway did not become ready (log: $RUN/openai.log)"
