#!/usr/bin/env bash
# `make serve-replicas` / `make serve-replicas-stop`: N Triton replicas (serve/run_triton.sh, each on free ports of its
# own) behind HAProxy on 127.0.0.1, plus one OpenAI-compatible gateway (serve/openai_server.py) in front of the
# balancer's gRPC port; all in the background. The model repository is the one serve-repo wrote last, or REPO.
#
#   bash serve/run_replicas.sh start [MODEL] [ARTIFACTS]   # REPLICAS (2); balancer HTTP_PORT (8000), GRPC_PORT (8001),
#                                                          # STATS_PORT (8404: /stats, /metrics); OPENAI_PORT (8080,
#                                                          # 0 = no gateway); GPUS=0,1: replica i sees only GPU GPUS[i]
#                                                          # (CUDA_VISIBLE_DEVICES), one server per GPU
#   bash serve/run_replicas.sh stop  [MODEL] [ARTIFACTS]   # stops everything it started; no process is left
#
# Why one gateway in front of the balancer rather than one per replica: the gateway holds no state between requests
# and only forwards gRPC streams, so a replica's death costs the gateway nothing and the balancer alone decides where
# requests go (one health view, one place to read what was sent where).
# State under ARTIFACTS/<model key>/serve/run-replicas/: replica-I.{pid,log,ports}, haproxy.{cfg,pid,log}, openai.{pid,log}.
# Env: PYTHON (default .venv/bin/python), HAPROXY (default: haproxy on PATH; `make setup-haproxy` installs it),
#      CHECK_MS (health-check interval, 500), FALL (failed checks before a replica is out, 2), READY_TIMEOUT_S (120).
set -euo pipefail
cd "$(dirname "$0")/.."
ACTION="${1:-}" MODEL="${2:-tiny}" ART="${3:-artifacts}"
REPLICAS="${REPLICAS:-2}" HTTP_PORT="${HTTP_PORT:-8000}" GRPC_PORT="${GRPC_PORT:-8001}" STATS_PORT="${STATS_PORT:-8404}"
OPENAI_PORT="${OPENAI_PORT:-8080}" GPUS="${GPUS:-}" CHECK_MS="${CHECK_MS:-500}" FALL="${FALL:-2}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-120}"
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
KEY="$("$PY" -c 'import sys; from lmopt.models import model_key; print(model_key(sys.argv[1]))' "$MODEL")"
RUN="${RUN_DIR:-$ART/$KEY/serve/run-replicas}"  # RUN_DIR: `make serve-stop` stops each folder it finds
die() { echo "error: $*" >&2; exit 1; }
STARTING=0  # set while starting: a failure then stops what was already started
stop_group() {  # stop_group PIDFILE NAME: its whole process group (run_triton.sh's stop: TERM, then KILL after 30 s)
  [ -f "$1" ] || return 0
  bash serve/run_triton.sh stop --pid-file "$1" >/dev/null
  echo "$2 stopped"
}
stop_all() {
  local f
  stop_group "$RUN/openai.pid" "openai gateway"
  stop_group "$RUN/haproxy.pid" "haproxy"
  for f in "$RUN"/replica-*.pid; do stop_group "$f" "$(basename "$f" .pid)"; done
}
case "$ACTION" in
  stop) [ -d "$RUN" ] || { echo "nothing running under $RUN"; exit 0; }; stop_all; exit 0 ;;
  start) ;;
  *) die "usage: bash serve/run_replicas.sh start|stop [MODEL] [ARTIFACTS]" ;;
esac
[[ "$REPLICAS" =~ ^[1-9][0-9]*$ ]] || die "REPLICAS must be a positive integer (got '$REPLICAS')"
HAPROXY="${HAPROXY:-$(command -v haproxy || true)}"
[ -n "$HAPROXY" ] || die "haproxy is not installed — run: make setup-haproxy (Debian package haproxy)"
IFS=, read -r -a GPU_LIST <<< "$GPUS"
if [ -n "$GPUS" ] && [ "${#GPU_LIST[@]}" -ne "$REPLICAS" ]; then
  die "GPUS=$GPUS names ${#GPU_LIST[@]} GPUs for REPLICAS=$REPLICAS — give one GPU per replica"
fi
for f in "$RUN"/*.pid; do
  [ -f "$f" ] || continue
  kill -0 -- "-$(cat "$f")" 2>/dev/null && die "already running ($f) — run: make serve-stop"
  rm -f "$f"
done
if [ -z "${REPO:-}" ]; then
  REPO="$("$PY" -c "import sys; from lmopt.serving import newest_repository as n; print(n(*sys.argv[1:]) or '-')" "$ART" "$MODEL")"
  [ "$REPO" != "-" ] || die "no model repository for $MODEL under $ART — run: make serve-repo"
fi
mkdir -p "$RUN"
# the balancer's own ports must be free before anything starts
for p in "$HTTP_PORT" "$GRPC_PORT" "$STATS_PORT" $([ "$OPENAI_PORT" = 0 ] || echo "$OPENAI_PORT"); do
  "$PY" -c "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $p))" \
    2>/dev/null || die "port $p is in use — pick free ones (HTTP_PORT, GRPC_PORT, STATS_PORT, OPENAI_PORT)"
done
STARTING=1
trap '[ "$STARTING" = 0 ] || { echo "start failed — stopping what was started" >&2; stop_all >&2; }' EXIT
HTTP_SERVERS="" GRPC_SERVERS=""
for i in $(seq 0 $((REPLICAS - 1))); do
  read -r H G M < <("$PY" -c "from lmopt.serving import free_ports; print(*free_ports(3))")
  echo "$H $G $M" > "$RUN/replica-$i.ports"
  env ${GPUS:+CUDA_VISIBLE_DEVICES="${GPU_LIST[$i]}"} bash serve/run_triton.sh "$REPO" --background \
    --pid-file "$RUN/replica-$i.pid" --log-file "$RUN/replica-$i.log" --http-port "$H" --grpc-port "$G" \
    --metrics-port "$M" --timeout "$READY_TIMEOUT_S" >/dev/null
  echo "replica $i: http $H grpc $G metrics $M${GPUS:+ (GPU ${GPU_LIST[$i]})}"
  HTTP_SERVERS+="    server r$i 127.0.0.1:$H check"$'\n'
  GRPC_SERVERS+="    server r$i 127.0.0.1:$G proto h2 check port $H check-proto h1"$'\n'
done
"$PY" - serve/templates/haproxy.cfg "$RUN/haproxy.cfg" <<PY
import os, sys
text = open(sys.argv[1]).read()
for k, v in {"REPLICAS": "$REPLICAS", "HTTP_PORT": "$HTTP_PORT", "GRPC_PORT": "$GRPC_PORT", "STATS_PORT": "$STATS_PORT",
             "CHECK_MS": "$CHECK_MS", "FALL": "$FALL", "HTTP_SERVERS": """$HTTP_SERVERS""".rstrip(),
             "GRPC_SERVERS": """$GRPC_SERVERS""".rstrip()}.items():
    text = text.replace(f"@{k}@", v)
open(sys.argv[2] + ".tmp", "w").write(text)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
"$HAPROXY" -c -q -f "$RUN/haproxy.cfg" || die "haproxy rejected $RUN/haproxy.cfg"
setsid "$HAPROXY" -W -db -f "$RUN/haproxy.cfg" >"$RUN/haproxy.log" 2>&1 </dev/null &
echo "$!" > "$RUN/haproxy.pid"
ready() { "$PY" -c "import urllib.request; urllib.request.urlopen('$1', timeout=2)" 2>/dev/null; }
for i in $(seq 1 40); do ready "http://127.0.0.1:$HTTP_PORT/v2/health/ready" && break; sleep 0.25; done
ready "http://127.0.0.1:$HTTP_PORT/v2/health/ready" || die "haproxy did not pass requests (log: $RUN/haproxy.log)"
echo "haproxy: http 127.0.0.1:$HTTP_PORT grpc 127.0.0.1:$GRPC_PORT stats http://127.0.0.1:$STATS_PORT/stats"
if [ "$OPENAI_PORT" != 0 ]; then
  setsid "$PY" serve/openai_server.py --port "$OPENAI_PORT" --triton-grpc "127.0.0.1:$GRPC_PORT" \
    >"$RUN/openai.log" 2>&1 </dev/null &
  echo "$!" > "$RUN/openai.pid"
  for i in $(seq 1 $((READY_TIMEOUT_S * 2))); do ready "http://127.0.0.1:$OPENAI_PORT/health" && break; sleep 0.5; done
  ready "http://127.0.0.1:$OPENAI_PORT/health" || die "the OpenAI gateway did not start (log: $RUN/openai.log)"
  echo "openai: http://127.0.0.1:$OPENAI_PORT/v1"
fi
STARTING=0
echo "stop: bash serve/run_replicas.sh stop $MODEL $ART"
