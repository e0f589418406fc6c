#!/usr/bin/env bash
# Stage 4b: start the real Triton Inference Server on a model repository made by serve/make_model_repository.py.
#
#   bash serve/run_triton.sh artifacts/tiny/serve/ort-fp32-cpu/model_repository            # foreground; Ctrl-C stops
#   bash serve/run_triton.sh REPO --background --pid-file /tmp/triton.pid                  # returns once ready
#   bash serve/run_triton.sh stop --pid-file /tmp/triton.pid                               # stops it, no orphans
#
# Options: --host ADDR (default 127.0.0.1) --http-port N (8000) --grpc-port N (8001) --metrics-port N (8002)
#          --log-file F (background mode; default <pid-file>.log) --timeout S (readiness wait, default 120)
# Env:     PYTHON (default .venv/bin/python: its version picks the backend stub, 3.8-3.13), TRITONSERVER (binary)
#
# Which tritonserver: the one on PATH (NGC container) when present, else the Triton 2.51.0 bundled in the
# nvidia-pytriton wheel (requirements.txt), run directly as docs/ENVIRONMENT.md describes: a backend folder
# B/python/{libtriton_python.so, triton_python_backend_utils.py, triton_python_backend_stub for this Python},
# LD_LIBRARY_PATH with nvidia_pytriton.libs (the stub's relative RPATH no longer applies) and the folder holding
# libpython3.X.so (pyenv/python.org builds ship it; else Debian's libpython3.X package), and the venv's bin first
# on PATH so the stub finds the venv's packages. The server runs in its own process group, so stopping it also
# stops every backend stub it started.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
HOST=127.0.0.1 HTTP_PORT=8000 GRPC_PORT=8001 METRICS_PORT=8002 PID_FILE="" LOG_FILE="" BACKGROUND=0 TIMEOUT=120
REPO="" STOP=0
die() { echo "error: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    stop) STOP=1 ;;
    --host) HOST="$2"; shift ;;
    --http-port) HTTP_PORT="$2"; shift ;;
    --grpc-port) GRPC_PORT="$2"; shift ;;
    --metrics-port) METRICS_PORT="$2"; shift ;;
    --pid-file) PID_FILE="$2"; shift ;;
    --log-file) LOG_FILE="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    --background) BACKGROUND=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) die "unknown option $1 — see: bash serve/run_triton.sh --help" ;;
    *) [ -z "$REPO" ] || die "one model repository only (got $REPO and $1)"; REPO="$1" ;;
  esac
  shift
done

stop_group() {  # SIGTERM to the server's process group, wait, then SIGKILL whatever is left (stubs included)
  local pgid="$1" i
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  for i in $(seq 1 60); do kill -0 -- "-$pgid" 2>/dev/null || return 0; sleep 0.5; done
  echo "server did not stop in 30 s — killing process group $pgid" >&2
  kill -KILL -- "-$pgid" 2>/dev/null || true
}

if [ "$STOP" = 1 ]; then
  [ -n "$PID_FILE" ] || die "stop needs --pid-file FILE (written by --background)"
  [ -f "$PID_FILE" ] || die "no pid file $PID_FILE — is the server running?"
  stop_group "$(cat "$PID_FILE")"
  rm -f "$PID_FILE"
  echo "triton stopped"
  exit 0
fi

[ -n "$REPO" ] || die "give the model repository — run: make serve-repo, then bash serve/run_triton.sh artifacts/tiny/serve/<variant>/model_repository"
[ -d "$REPO" ] || die "model repository $REPO does not exist — run: make serve-repo"
REPO="$(cd "$REPO" && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)" || die "no Python found — run: make setup"
PYBIN="$(dirname "$PYTHON")"
export PATH="$PYBIN:$PATH"
# the Python models import lmopt from this checkout, whichever checkout the venv's editable install points at
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

TRITON="${TRITONSERVER:-$(command -v tritonserver || true)}"
BACKEND_ARGS=()
if [ -z "$TRITON" ]; then
  read -r PYVER SITE LIBDIR < <("$PYTHON" - <<'PY'
import sys, sysconfig, importlib.util
spec = importlib.util.find_spec("pytriton")
site = spec.submodule_search_locations[0].rsplit("/", 1)[0] if spec else "-"
print(f"{sys.version_info[0]}.{sys.version_info[1]}", site, sysconfig.get_config_var("LIBDIR") or "-")
PY
)
  [ "$SITE" != "-" ] || die "tritonserver not on PATH and nvidia-pytriton not installed — run: make setup"
  TS="$SITE/pytriton/tritonserver"
  TRITON="$TS/bin/tritonserver"
  STUB="$TS/python_backend_stubs/$PYVER/triton_python_backend_stub"
  [ -f "$STUB" ] || die "nvidia-pytriton has no backend stub for Python $PYVER (3.8-3.13 are bundled)"
  chmod +x "$TRITON" "$STUB" 2>/dev/null || true
  BDIR="${TMPDIR:-/tmp}/lmopt-triton-backends-$(id -u)-py$PYVER-$(echo "$TS" | cksum | cut -d' ' -f1)"
  mkdir -p "$BDIR/python"
  ln -sf "$TS/backends/python/libtriton_python.so" "$TS/backends/python/triton_python_backend_utils.py" \
         "$STUB" "$BDIR/python/"
  LIBS="$SITE/nvidia_pytriton.libs"
  if [ "$LIBDIR" != "-" ] && [ -e "$LIBDIR/libpython$PYVER.so.1.0" ]; then LIBS="$LIBS:$LIBDIR"; fi
  export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ldd "$STUB" | grep -q "libpython$PYVER.*not found"; then
    die "the Python backend stub needs libpython$PYVER.so — run: apt-get install -y libpython$PYVER (or use a Python built with --enable-shared)"
  fi
  BACKEND_ARGS=(--backend-directory "$BDIR")
fi

ARGS=(--model-repository "$REPO" "${BACKEND_ARGS[@]}"
      --http-address "$HOST" --http-port "$HTTP_PORT" --grpc-address "$HOST" --grpc-port "$GRPC_PORT"
      --metrics-address "$HOST" --metrics-port "$METRICS_PORT" --allow-gpu-metrics false
      --exit-timeout-secs 20 --log-verbose 0)

# A port held by another process would leave this server half-started while the readiness check talks to the
# other one: refuse up front.
"$PYTHON" - "$HOST" "$HTTP_PORT" "$GRPC_PORT" "$METRICS_PORT" <<'PY' || exit 1
import socket, sys
host, ports = sys.argv[1], sys.argv[2:]
for name, port in zip(("--http-port", "--grpc-port", "--metrics-port"), ports):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not block a server
    try:
        s.bind((host, int(port)))
    except OSError as e:
        sys.exit(f"error: {name} {port} on {host} is in use ({e.strerror}) — pick a free port with {name}")
    finally:
        s.close()
PY

wait_ready() {  # poll the readiness endpoint while the server lives
  local pid="$1" t=0
  until "$PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('http://$HOST:$HTTP_PORT/v2/health/ready', timeout=2)" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.5; t=$((t + 1))
    [ "$t" -lt $((TIMEOUT * 2)) ] || return 2
  done
}
endpoints() {
  echo "triton ready: HTTP http://$HOST:$HTTP_PORT  gRPC $HOST:$GRPC_PORT  metrics http://$HOST:$METRICS_PORT/metrics"
  echo "models: $(ls "$REPO" | tr '\n' ' ')(repository $REPO)"
}

if [ "$BACKGROUND" = 1 ]; then
  [ -n "$PID_FILE" ] || die "--background needs --pid-file FILE (used by: bash serve/run_triton.sh stop --pid-file FILE)"
  LOG_FILE="${LOG_FILE:-$PID_FILE.log}"
  setsid "$TRITON" "${ARGS[@]}" >"$LOG_FILE" 2>&1 < /dev/null &
  PID=$!
  echo "$PID" > "$PID_FILE"
  if ! wait_ready "$PID"; then
    stop_group "$PID"; rm -f "$PID_FILE"
    tail -n 30 "$LOG_FILE" >&2
    die "tritonserver did not become ready (log: $LOG_FILE)"
  fi
  endpoints
  echo "log: $LOG_FILE; stop: bash serve/run_triton.sh stop --pid-file $PID_FILE"
  exit 0
fi

# Foreground: the server in its own process group; Ctrl-C / SIGTERM stop the whole group (no orphan stubs).
setsid "$TRITON" "${ARGS[@]}" < /dev/null &
PID=$!
[ -z "$PID_FILE" ] || echo "$PID" > "$PID_FILE"
trap 'echo "stopping triton..." >&2; stop_group "$PID"; [ -z "$PID_FILE" ] || rm -f "$PID_FILE"; exit 0' INT TERM
if wait_ready "$PID"; then endpoints; else stop_group "$PID"; die "tritonserver did not become ready"; fi
wait "$PID" || true
stop_group "$PID"
