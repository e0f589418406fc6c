#!/usr/bin/env bash
# Stage 3 through trtexec: the same engine build as optimize/build_trt_engine.py (same two optimization profiles,
# workspace limit, optimization level, timing cache, layer-information export), with shapes derived by that script
# from the stage-2 manifest's model_shape, so the two builds cannot drift apart.
#
#   bash optimize/trtexec_command.sh --model tiny --precision fp16 --dry-run   # print the command only
#   bash optimize/trtexec_command.sh --model tiny --precision int8             # build (needs trtexec + a GPU)
#   ... --skip-if-unavailable: without trtexec or a GPU, print a note and exit 0 instead of an error
#
# Any other flag (--artifacts, --onnx, --max-batch, --max-seq-len, --opt-level, --workspace-mib, ...) is passed to
# build_trt_engine.py --emit-trtexec. TensorRT 11's trtexec has no --fp16/--int8/--best: the graph sets precision.
# Reads:  the stage-2 graph + manifest (artifacts/<model>/quantize/<variant>/) or --onnx PATH
# Writes: artifacts/<model>/engine/trt<ver>-<precision>-trtexec/{model.plan, layers.json, build.log, manifest.json}
#         and updates the timing cache artifacts/<model>/engine/timing-trt<ver>.cache
# The TensorRT version in the folder name comes from trtexec's banner; --dry-run without trtexec assumes
# TRT_VERSION (default 11.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

dry=0
skip=0
args=()
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    --skip-if-unavailable) skip=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) args+=("$a") ;;
  esac
done

ver=${TRT_VERSION:-}
if [ -z "$ver" ] && command -v trtexec >/dev/null 2>&1; then
  # banner: "&&&& RUNNING TensorRT.trtexec [TensorRT v110400] ..."
  num=$(trtexec --help 2>&1 | sed -n 's/.*TensorRT v\([0-9]\{5,\}\).*/\1/p' | head -1)
  [ -n "$num" ] && ver="$((num / 10000)).$(((num % 10000) / 100))"
fi
unavailable() {  # one line saying what is missing; a note and exit 0 with --skip-if-unavailable (make demo)
  if [ "$skip" = 1 ]; then echo "note: skipping the trtexec build: $1"; exit 0; fi
  echo "error: $1" >&2
  exit 1
}
if [ "$dry" = 0 ]; then
  command -v trtexec >/dev/null 2>&1 || unavailable "trtexec not found on PATH — it ships with TensorRT 11 (tar/deb packages: bin/trtexec, NGC container: /usr/src/tensorrt/bin); add it to PATH, or use --dry-run"
  nvidia-smi -L >/dev/null 2>&1 || unavailable "no NVIDIA GPU visible (nvidia-smi -L failed) — run on a machine with an NVIDIA GPU and its driver, or use --dry-run"
fi
ver=${ver:-11.4}

line=$("$PY" optimize/build_trt_engine.py "${args[@]}" --emit-trtexec --trt-version "$ver" -q)
if [ "$dry" = 1 ]; then
  echo "$line"
  exit 0
fi

eval "cmd=($line)"   # the line is shlex-quoted by build_trt_engine.py
final=""
for c in "${cmd[@]}"; do
  case "$c" in --saveEngine=*) final=$(dirname "${c#--saveEngine=}") ;; esac
done
tmp="$(dirname "$final")/.$(basename "$final").tmp-$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
run=()
for c in "${cmd[@]}"; do run+=("${c//$final\//$tmp/}"); done
echo "${run[*]}"
start=$EPOCHREALTIME
if ! "${run[@]}" >"$tmp/build.log" 2>&1; then
  tail -n 20 "$tmp/build.log" >&2
  echo "error: trtexec failed (log above) — fix the cause and rerun" >&2
  exit 1
fi
secs=$("$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))" "$start" "$EPOCHREALTIME")
"$PY" -m lmopt.trt_build record --folder "$tmp" --seconds "$secs" "${args[@]}"
rm -rf "$final"
mv "$tmp" "$final"
trap - EXIT
echo "engine: $final/model.plan"
