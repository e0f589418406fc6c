#!/usr/bin/env bash
# Every GPU measurement in one go, on a machine with an NVIDIA GPU and torch (CUDA):
#   1. suite   - per model in $MODELS (default: tiny gpt2-124m llama-1b): the FP16 ONNX Runtime graph
#                (convert/export_onnx.py --dtype fp16 --device cuda, and --attention gqa), then profile/benchmark.py
#                --preset gpu: PyTorch eager vs static-KV CUDA graph vs compiled engine vs ONNX Runtime CUDA EP
#                (optimum graph; fused GQA graph replayed as a CUDA graph), against the floor
#   2. profile - profile/run_nsys_profile.py --profiler torch: kernels, memcpy, launch gaps, pinned vs pageable
#   3. triton  - Triton (KIND_GPU, DLPack) on the Llama-1B shape: streaming load generator + perf_analyzer, batching
#                on vs off (profile/serve_bench.py)
#   4. quant   - weight-only INT8/INT4 for the compiled engine (profile/compiled_engine_gpu.py --weights): Llama-1B
#                shape speed (FP16 and BF16 baselines in the same run) and accuracy on the built-in model
#   5. inflight - Triton serving the compiled engine through the in-flight scheduler vs static batching, streaming
#                sweep at 1/4/16/64 streams, serving overhead vs the engine in-process, lm_empty floor
#                (profile/serve_bench.py --compare scheduler)
#   6. openai  - the OpenAI endpoint in front of that server: its own overhead vs Triton's gRPC stream
#                (profile/openai_overhead.py); aiperf vs our load generator when AIPERF names an aiperf executable
#                (or AIPERF_SITE a folder its wheels were installed into with pip --target). The gateway wants
#                uvloop and httptools (requirements.txt; cp312 manylinux wheels, e.g. installed into the PYTHONPATH
#                folder with pip --target); without them it runs on asyncio + h11, slower, and its log says so
#   6b. gilab  - the in-flight server's 1-stream overhead with Python's default thread switch interval (A/B for
#                the repository's --gil-switch-us default)
#   7. scaleout - 2 GPUs (nvidia-h200-x2), Llama-1B shape, compiled engine in-flight: one GPU at SCALE_C streams (and
#                at 2x), then both GPUs at 2x SCALE_C streams as one server with an instance on each GPU
#                (make_model_repository.py --gpus 0,1) and as two servers behind HAProxy (serve/run_replicas.sh,
#                GPUS=0,1); streaming load generator, one configuration after the other (they need the same GPUs).
#                The replicas run needs haproxy there (PATH or HAPROXY=binary); without it that mode is skipped.
#                SCALE_MODES picks modes (default "1gpu instances replicas")
#
#   8. load    - the serving benchmark (profile/serve_bench.py --compare load, docs/serving_benchmark.md): Llama-1B
#                shape, FP16, compiled engine, in-flight scheduler; random workload (input 256, output 128, +-25%,
#                fixed output lengths) at LOAD_SWEEP streams (default 1,4,16,64,128,256) and LOAD_RATES open-loop
#                Poisson rates; the engine's ceiling and the in-process scheduler at 64; the OpenAI endpoint vs gRPC
#                at 64; lm_empty at 64 and 256; the 1-stream overhead; the per-step timeline at 64. The gateway and
#                the clients need the wheels of profile/gpu_wheels.sh on PYTHONPATH
#
#   9. decode  - the fused decode kernels against today's step (profile/decode_kernels_gpu.py --baseline-long,
#                docs/compiled_engine.md): kernels vs their references, Llama-1B shape FP16 and INT4 at batch 1/8/64
#                and after a 2,048-token prompt, GPT-2 124M shape, INT4 accuracy on the built-in model, profiles
#  10. structured - what structured output costs the decode loop (profile/structured_gpu.py): Llama-1B shape,
#                FP16, compiled engine, in-process scheduler; ITL at 1 stream with a JSON schema vs without, tokens/s
#                at 64 streams with half the requests constrained vs none, interleaved in one run. Needs llguidance
#                (its abi3 wheel from profile/gpu_wheels.sh, in .whl/site.tar.xz)
#  11. prefix  - the paged KV cache and its prefix cache vs the contiguous-slot engine (profile/prefix_cache_gpu.py,
#                docs/paged_kv.md): Llama-1B shape FP16; TTFT with a 2,048-token prefix hit vs cache off, 64 streams
#                cache on vs off, streams served in the memory of 64 contiguous slots, no-shared-prefix ITL and tokens/s
#
#   bash profile/gpu_all.sh OUTDIR [suite] [profile] [triton]      # default: the first three
#   bash profile/gpu_all.sh OUTDIR quant,inflight,openai           # parts separated by commas or spaces
#   bash profile/gpu_all.sh --dry-run OUTDIR load,decode           # on any machine: what would run (below)
#   NUMPY1_DIR=/tmp/np1 bash profile/gpu_all.sh OUTDIR triton        # numpy 1.26 installed there (see below)
#
# One device call: the parts run in the order given while the time left allows. Before each part the script compares
# its estimate (PART_S below) with what is left of GPU_BUDGET_S (default 560 s, so that the
# result tarball is written inside a 600 s call); a part that does not fit is skipped and named in OUTDIR/skipped.txt
# for the next call, and every timeout inside a part is cut to the time left. --dry-run runs nothing heavy: it
# prints each command with the part's estimate and what the guard would skip, checks that every script exists and
# that its parser accepts the flags given (build_parser().parse_args), checks the shell scripts exist, and prints
# the size of what a device call carries (tracked tree + wheels; the limit is 64 MiB). Exit status 1 if any check
# failed. The wheels: profile/gpu_wheels.sh writes .whl/site.tar.xz (every wheel the Triton parts need, installed
# for Python 3.12 and packed with xz); when a part needs them and the Python has no tritonclient, this script
# unpacks that file (GPU_SITE_TAR) into /tmp/site and puts it on PYTHONPATH. docs/gpu_runbook.md gives the device
# calls in order.
# The Triton part sends prompts as token ids (PROMPT_INPUT=input_ids, the default here): STRING inputs crashed the
# Python-backend stub on the H200 machine with NumPy 2.5 and 1.26 alike (results/nvidia-h200/triton-gpu-attempt.log).
#
# Writes OUTDIR/gpu-results.tar.gz (every result JSON, small, laid out <model>/<file> as under results/<machine>/)
# and OUTDIR/gpu-all.log. Large files (ONNX, traces)
# stay in $WORK (default /tmp/gpuwork). Needs onnxruntime-gpu for the ONNX rows, nvidia-pytriton and
# tritonclient 2.51.0 for the Triton part; each part that cannot run says why and the others go on.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR="${1:?usage: gpu_all.sh [--dry-run] OUTDIR [parts]}"; shift
PARTS="${*:-suite profile triton}"
PARTS="${PARTS//,/ }"
SWEEP="${SWEEP:-1,4,16,64}"
PY="${PYTHON:-python3}"
MODELS="${MODELS:-tiny gpt2-124m llama-1b}"
WORK="${WORK:-/tmp/gpuwork}"
[ "$DRY" = 1 ] && WORK="$OUTDIR/work"
mkdir -p "$OUTDIR" "$WORK/results"
export PYTHONUNBUFFERED=1
# transformers imports jax when it finds it (the GPU image has a jax whose extension fails to load): torch only
export USE_TORCH=1 USE_FLAX=0 USE_TF=0
# lmopt from this checkout: a GPU machine may have the pinned packages but not `make setup`'s editable install
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUTDIR/gpu-all.log"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

# ---- the time guard: seconds per part (whole part: loading, compiling, measuring), from the runs so far where a part
# ran whole (load, decode, quant, inflight), else from the part's own timeouts -------------------------------------
declare -A PART_S=([suite]=450 [profile]=120 [triton]=480 [quant]=400 [inflight]=540 [openai]=300 [gilab]=200
                   [scaleout]=540 [load]=540 [decode]=300
                   [structured]=300 [prefix]=330)
BUDGET_S="${GPU_BUDGET_S:-560}"
START_S=$SECONDS
SPENT_S=0                      # --dry-run: the parts' estimates added up, in place of the clock
left() { echo $(( BUDGET_S - (DRY ? SPENT_S : SECONDS - START_S) )); }
tmo() {  # tmo N: N seconds, or what is left of the budget (less 60 s) when that is less. 60 s: a killed part's
  # Triton server takes ~25 s to unload its models (and holds the part's output pipe meanwhile), then the tarball;
  # with 15 s the H100 load run of 2026-12-08 overran its 600 s call and brought nothing back
  local l=$(( $(left) - 60 )); [ "$l" -lt 5 ] && l=5
  echo $(( $1 < l ? $1 : l ))
}

# ---- --dry-run: stand-ins that check instead of running ---------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  REAL_PY="$PY"
  FAILS="$OUTDIR/dry-run-failures.txt"
  : > "$FAILS"
  CMDS="$OUTDIR/dry-run-commands.txt"
  : > "$CMDS"
  _dry_py() {  # python SCRIPT ARGS: noted; at the end one Python checks each script's parser takes its ARGS
    local script="$1"; shift
    case "$script" in -c|-m|-) echo "   would run: python $script ${1:0:60}..."; return 0 ;; esac
    echo "   would run: python $script $*"
    if [ ! -f "$ROOT/$script" ]; then echo "   FAIL: no $script" | tee -a "$FAILS"; return 1; fi
    { printf '%s\x1f' "$script" "$@"; printf '\n'; } >> "$CMDS"
  }
  PY=_dry_py
  timeout() { local s="$1"; shift; echo "   (timeout ${s} s)"; "$@"; }
  bash() {  # bash SCRIPT ARGS: the script exists
    echo "   would run: bash $*"
    [ -f "$ROOT/$1" ] || echo "   FAIL: no $1" | tee -a "$FAILS"
  }
  tracked=$(cd "$ROOT" && git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
  say "dry run: parts '$PARTS', budget ${BUDGET_S} s; a device call carries the tracked tree ($(( tracked >> 20 )) MiB)"
fi

# ---- the wheels (Triton, its client, the gateway) for the parts that start a server -----------------------------------
SITE_TAR="${GPU_SITE_TAR:-$ROOT/.whl/site.tar.xz}"
if [[ " $PARTS " =~ \ (triton|inflight|openai|gilab|scaleout|load|structured)\  ]]; then
  if [ "$DRY" = 1 ]; then
    if [ -f "$SITE_TAR" ]; then
      w=$(stat -c %s "$SITE_TAR")
      say "dry run: wheels $SITE_TAR, $(( w >> 20 )) MiB: the call carries $(( (tracked + w) >> 20 )) MiB of 64"
      [ $(( tracked + w )) -le $(( 64 << 20 )) ] || echo "   FAIL: over 64 MiB" | tee -a "$FAILS"
    else
      say "dry run: no $SITE_TAR (bash profile/gpu_wheels.sh writes it): the parts need the wheels installed otherwise"
    fi
  elif ! "$PY" -c "import tritonclient.grpc" 2>/dev/null && [ -f "$SITE_TAR" ]; then
    say "unpacking $SITE_TAR into /tmp/site"
    "$PY" -c "import sys, tarfile; t = tarfile.open(sys.argv[1]); t.extractall('/tmp/site', **({'filter': 'tar'} if hasattr(tarfile, 'tar_filter') else {}))" "$SITE_TAR" \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
fi

: > "$OUTDIR/skipped.txt"
CALL=1 PLAN=""                 # --dry-run: which call each part would run in
for part in $PARTS; do
  need=${PART_S[$part]:-0}
  if [ "$(left)" -lt "$need" ]; then
    echo "$part" >> "$OUTDIR/skipped.txt"
    if [ "$DRY" = 0 ]; then
      say "skipped $part: about ${need} s, $(left) s left of ${BUDGET_S} s — run it in the next call"
      continue
    fi
    say "the time guard would skip $part here ($(left) s left): it would open the next call, checked as such"
    CALL=$(( CALL + 1 )) SPENT_S=0
  fi
  say "part $part: about ${need} s ($(left) s left)"
  PLAN="$PLAN${PLAN:+; }call $CALL: $part"
  case "$part" in
    suite)
      for m in $MODELS; do
        say "suite $m: FP16 ONNX for ONNX Runtime CUDA, then benchmark --preset gpu"
        timeout "$(tmo 600)" "$PY" convert/export_onnx.py --model "$m" --dtype fp16 --device cuda --artifacts "$WORK/art" 2>&1 \
          | grep -v -i warning | tail -8 | tee -a "$LOG"
        # the fused GroupQueryAttention graph for engine ort-gqa (KV buffer: the 2048-token prompt + new tokens)
        timeout "$(tmo 600)" "$PY" convert/export_onnx.py --model "$m" --dtype fp16 --attention gqa --device cuda \
          --artifacts "$WORK/art" $( [ "$m" = llama-1b ] && echo --max-len 2304 ) 2>&1 | grep -v -i warning | tail -8 \
          | tee -a "$LOG"
        mkdir -p "$WORK/results/$m"
        timeout "$(tmo 900)" "$PY" profile/benchmark.py --preset gpu --model "$m" --artifacts "$WORK/art" \
          --out "$WORK/results/$m/benchmark-cuda.json" 2>&1 | grep -v -i warning | tail -40 | tee -a "$LOG"
      done ;;
    profile)
      say "profile (torch profiler, llama-1b)"
      timeout "$(tmo 300)" "$PY" profile/run_nsys_profile.py --profiler torch --device cuda --engine torch --precision fp16 \
        --model llama-1b --out "$WORK/profile-llama-1b" 2>&1 | tail -40 | tee -a "$LOG"
      mkdir -p "$WORK/results/llama-1b"
      cp "$WORK/profile-llama-1b/summary.json" "$WORK/results/llama-1b/profile-torch-fp16-cuda.summary.json" 2>/dev/null ;;
    triton)
      say "triton (llama-1b, torch fp16, KIND_GPU)"
      if [ -n "${NUMPY1_DIR:-}" ]; then
        # Triton 2.51's Python-backend stub is built against the NumPy 1.x C API: under NumPy 2 it misreads BYTES
        # input tensors ("unpack_from requires a buffer of at least 134744076 bytes"), and the stub dies. With a
        # NumPy 1.26 first on the path, scipy/scikit-learn built for NumPy 2 no longer import, so hide them from
        # transformers (importlib.util.find_spec returns None for a None entry in sys.modules).
        cat > "$NUMPY1_DIR/sitecustomize.py" <<'PYEOF'
import sys
for _name in ("sklearn", "scipy"):
    sys.modules.setdefault(_name, None)
PYEOF
        export PYTHONPATH="$NUMPY1_DIR${PYTHONPATH:+:$PYTHONPATH}"
      fi
      "$PY" serve/make_model_repository.py --model llama-1b --engine torch --precision fp16 --device cuda \
        --artifacts "$WORK/art" 2>&1 | tail -5 | tee -a "$LOG"
      PYTHON="$PY" timeout "$(tmo 480)" "$PY" profile/serve_bench.py --model llama-1b --artifacts "$WORK/art" \
        --concurrency 1,4,16 --requests 48 --duration-s 20 --prompt-input "${PROMPT_INPUT:-input_ids}" 2>&1 \
        | tail -60 | tee -a "$LOG"
      mkdir -p "$WORK/results/llama-1b"
      cp "$WORK"/art/llama-1b/profile/serving-*.json "$WORK/results/llama-1b/" 2>/dev/null ;;
    quant)
      mkdir -p "$WORK/results/llama-1b" "$WORK/results/tiny"
      # speed: the Llama-1B shape, baselines first; INT4's kernel takes BF16 activations
      for cell in fp16: bf16: fp16:int8 fp16:int8mm bf16:int4; do
        p="${cell%%:*}" w="${cell#*:}"
        say "quant llama-1b $p ${w:-unquantized}"
        timeout "$(tmo 300)" "$PY" profile/compiled_engine_gpu.py --model llama-1b --precision "$p" ${w:+--weights "$w"} \
          --batch-sizes 1,8 --long-prompt 0 --repeats 3 \
          --out "$WORK/results/llama-1b/compiled-engine-$p${w:+-$w}.json" 2>&1 | grep -v -i warning | tail -12 \
          | tee -a "$LOG"
      done
      # accuracy on the built-in model (real weights); eager (no compile) is enough for the numbers
      for cell in fp16: fp16:int8 bf16: bf16:int4; do
        p="${cell%%:*}" w="${cell#*:}"
        say "quant tiny $p ${w:-unquantized} (accuracy)"
        timeout "$(tmo 200)" "$PY" profile/compiled_engine_gpu.py --model tiny --precision "$p" ${w:+--weights "$w"} \
          --group-size 32 --batch-sizes 1 --long-prompt 0 --compile off --cuda-graphs off --eval-windows 32 \
          --eval-len 256 --num-slots 32 --out "$WORK/results/tiny/compiled-engine-$p${w:+-$w}.json" 2>&1 \
          | grep -v -i warning | tail -6 | tee -a "$LOG"
      done ;;
    inflight|openai)
      if [ -n "${NUMPY1_DIR:-}" ] && [ ! -f "$NUMPY1_DIR/sitecustomize.py" ]; then
        printf 'import sys\nfor _n in ("sklearn", "scipy"):\n    sys.modules.setdefault(_n, None)\n' \
          > "$NUMPY1_DIR/sitecustomize.py"
        export PYTHONPATH="$NUMPY1_DIR:$PYTHONPATH"
      fi
      if [ ! -f "$WORK/art/llama-1b/serve/compiled-fp16-gpu/manifest.json" ]; then
        say "model repository: compiled fp16, in-flight, 64 slots, every decode bucket captured at load"
        "$PY" serve/make_model_repository.py --model llama-1b --engine compiled --precision fp16 --device cuda \
          --slots 64 --max-queue 256 --max-batch-size 64 --capture-kv 256 --max-len 512 --cancel-poll-ms 10 \
          --artifacts "$WORK/art" 2>&1 | tail -3 | tee -a "$LOG"
      fi
      mkdir -p "$WORK/results/llama-1b"
      if [ "$part" = inflight ]; then
        say "inflight: in-flight vs static, streaming $SWEEP"
        PYTHON="$PY" timeout "$(tmo 560)" "$PY" profile/serve_bench.py --model llama-1b --artifacts "$WORK/art" \
          --compare scheduler --skip-perf-analyzer --concurrency "$SWEEP" --requests 128 --duration-s 15 \
          --prompt-input input_ids --startup-timeout-s 400 --overhead-requests 48 2>&1 | grep -v -i warning | tail -40 | tee -a "$LOG"
        cp "$WORK"/art/llama-1b/profile/serving-*.json "$WORK/results/llama-1b/" 2>/dev/null
        # where the in-flight server's time to first token goes (the model logs medians every 100 streams)
        grep -h "ttft parts" "$WORK"/art/llama-1b/profile/.triton-*.log 2>/dev/null | tail -12 | tee -a "$LOG"
      else
        say "openai: endpoint overhead (and aiperf when AIPERF is set)"
        export PYTHON="$PY" READY_TIMEOUT_S=400 OPENAI_PORT=18080 HTTP_PORT=18000 GRPC_PORT=18001 METRICS_PORT=18002
        bash serve/serve_openai.sh start llama-1b "$WORK/art" 2>&1 | tail -3 | tee -a "$LOG"
        # which event loop and HTTP parser the gateway runs on (uvloop + httptools when their wheels are on the path)
        grep -m2 -E "event loop|not installed" "$WORK/art/llama-1b/serve/run/openai.log" 2>/dev/null | tee -a "$LOG"
        [ "${SKIP_OVERHEAD:-0}" = 1 ] || timeout "$(tmo 240)" "$PY" profile/openai_overhead.py --model llama-1b --artifacts "$WORK/art" \
          --openai-url http://127.0.0.1:18080 --triton-grpc 127.0.0.1:18001 --requests 80 --max-new-tokens 32 \
          2>&1 | grep -v -i warning | tail -12 | tee -a "$LOG"
        if [ -n "${AIPERF_SITE:-}" ] && [ -z "${AIPERF:-}" ]; then
          # aiperf's wheels installed with --target AIPERF_SITE: run it on its own path (its newer packages stay out
          # of the pinned set the server uses)
          AIPERF="$WORK/aiperf"
          printf '#!/bin/sh\nPYTHONPATH=%s exec %s -m aiperf "$@"\n' "$AIPERF_SITE" "$(command -v "$PY")" > "$AIPERF"
          chmod +x "$AIPERF"
        fi
        if [ -n "${AIPERF:-}" ]; then
          timeout "$(tmo 400)" "$PY" profile/aiperf_compare.py --model llama-1b --artifacts "$WORK/art" --aiperf "$AIPERF" \
            --openai-url http://127.0.0.1:18080 --triton-grpc 127.0.0.1:18001 --concurrency "$SWEEP" 2>&1 \
            | grep -v -i warning | tail -20 | tee -a "$LOG"
        fi
        bash serve/serve_openai.sh stop llama-1b "$WORK/art" 2>&1 | tail -2 | tee -a "$LOG"
        cp "$WORK"/art/llama-1b/profile/openai-overhead.json "$WORK"/art/llama-1b/profile/aiperf-compare.json \
          "$WORK/results/llama-1b/" 2>/dev/null
      fi ;;
    gilab)
      # the in-flight server's 1-stream overhead with Python's default thread switch interval (5 ms) instead of the
      # repository default (--gil-switch-us 200): the same load_generator overhead run as `inflight`'s, second server
      ART_G="$WORK/art-gil"
      "$PY" serve/make_model_repository.py --model llama-1b --engine compiled --precision fp16 --device cuda \
        --slots 64 --max-queue 256 --max-batch-size 64 --capture-kv 256 --max-len 512 --cancel-poll-ms 10 \
        --gil-switch-us 0 --artifacts "$ART_G" -q 2>&1 | tail -2 | tee -a "$LOG"
      bash serve/run_triton.sh "$ART_G/llama-1b/serve/compiled-fp16-gpu/model_repository" --background \
        --pid-file "$WORK/gil.pid" --http-port 18100 --grpc-port 18101 --metrics-port 18102 --timeout "$(tmo 400)" \
        2>&1 | tail -2 | tee -a "$LOG"
      say "gilab: overhead at 1 stream, Python's default switch interval"
      timeout "$(tmo 300)" "$PY" profile/load_generator.py --model llama-1b --artifacts "$ART_G" --url 127.0.0.1:18101 \
        --concurrency 1 --requests 48 --in-process --engine compiled --precision fp16 --device cuda \
        --prompt-input input_ids --label overhead-inflight-gil-default 2>&1 | grep -v -i warning | tail -6 | tee -a "$LOG"
      grep -h "ttft parts" "$WORK/gil.pid.log" 2>/dev/null | tail -3 | tee -a "$LOG"
      bash serve/run_triton.sh stop --pid-file "$WORK/gil.pid" 2>&1 | tail -1 | tee -a "$LOG"
      mkdir -p "$WORK/results/llama-1b"
      cp "$ART_G"/llama-1b/profile/serving-stream-overhead-inflight-gil-default.json "$WORK/results/llama-1b/" \
        2>/dev/null ;;
    scaleout)
      C="${SCALE_C:-32}" C2=$(( ${SCALE_C:-32} * 2 ))
      REPO_ARGS=(--model llama-1b --engine compiled --precision fp16 --device cuda --slots 64 --max-queue 256
                 --max-batch-size 64 --capture-kv 256 --max-len 512 --cancel-poll-ms 10 -q)
      LOAD_ARGS=(--model llama-1b --prompt-input input_ids --requests 256 --duration-s 30 --max-new-tokens 64)
      export PYTHON="$PY" READY_TIMEOUT_S=400
      mkdir -p "$WORK/results/llama-1b"
      for mode in ${SCALE_MODES:-1gpu instances replicas}; do   # one mode per call keeps each under 10 minutes
        ART_M="$WORK/art-scale-$mode"
        if [ "$mode" = replicas ] && [ -z "${HAPROXY:-$(command -v haproxy || true)}" ]; then
          say "scaleout replicas: skipped, no haproxy here (install it, or set HAPROXY to a haproxy binary)"; continue
        fi
        gpus=0; [ "$mode" = instances ] && gpus=0,1
        "$PY" serve/make_model_repository.py "${REPO_ARGS[@]}" --gpus "$gpus" --artifacts "$ART_M" 2>&1 | tail -2 \
          | tee -a "$LOG"
        if [ "$mode" = replicas ]; then
          GPUS=0,1 REPLICAS=2 OPENAI_PORT=0 HTTP_PORT=18000 GRPC_PORT=18001 STATS_PORT=18404 \
            bash serve/run_replicas.sh start llama-1b "$ART_M" 2>&1 | tail -4 | tee -a "$LOG"
        else
          bash serve/run_triton.sh "$ART_M/llama-1b/serve/compiled-fp16-gpu/model_repository" --background \
            --pid-file "$WORK/scale.pid" --http-port 18000 --grpc-port 18001 --metrics-port 18002 --timeout "$(tmo 400)" \
            2>&1 | tail -2 | tee -a "$LOG"
        fi
        levels="$C2"; [ "$mode" = 1gpu ] && levels="$C,$C2"
        say "scaleout $mode: streaming at $levels"
        timeout "$(tmo 400)" "$PY" profile/load_generator.py "${LOAD_ARGS[@]}" --artifacts "$ART_M" --url 127.0.0.1:18001 \
          --concurrency "$levels" --label "scaleout-$mode" 2>&1 | grep -v -i warning | tail -12 | tee -a "$LOG"
        if [ "$mode" = replicas ]; then
          bash serve/run_replicas.sh stop llama-1b "$ART_M" 2>&1 | tail -3 | tee -a "$LOG"
        else
          bash serve/run_triton.sh stop --pid-file "$WORK/scale.pid" 2>&1 | tail -1 | tee -a "$LOG"
        fi
        cp "$ART_M/llama-1b/profile/serving-stream-scaleout-$mode.json" "$WORK/results/llama-1b/" 2>/dev/null
      done ;;
    load)
      ART_L="$WORK/art-load" LM="${LOAD_MODEL:-llama-1b}"   # LOAD_MODEL=tiny: a quick check of the whole part
      # 64 slots; max length 512 holds the longest request (320 + 160); every decode batch bucket captured at load
      # at KV 512, where every level from 16 streams up runs (compile + capture costs 15-25 s per shape); the load
      # generator's warm-up (shortest prompts at 1, 2, 4 streams) compiles the few KV-256 shapes short prompts need
      "$PY" serve/make_model_repository.py --model "$LM" --engine compiled --precision fp16 --device cuda \
        --slots 64 --max-queue 256 --max-batch-size 64 --capture-kv 512 --max-len 512 --cancel-poll-ms 10 \
        --artifacts "$ART_L" -q 2>&1 | tail -2 | tee -a "$LOG"
      say "load: sweep ${LOAD_SWEEP:-1,4,16,64,128,256}, rates ${LOAD_RATES:-25,50,100,150,inf}"
      PYTHON="$PY" timeout "$(tmo "${LOAD_TIMEOUT:-520}")" "$PY" profile/serve_bench.py --model "$LM" --artifacts "$ART_L" \
        --compare load --workload random --prompt-tokens 256 --max-new-tokens 128 \
        --concurrency "${LOAD_SWEEP:-1,4,16,64,128,256}" --open-loop-rates "${LOAD_RATES:-25,50,100,150,inf}" \
        --requests 100000 --rate-requests "${LOAD_RATE_REQUESTS:-600}" --duration-s "${LOAD_DURATION:-8}" \
        --overhead-requests "${LOAD_OVERHEAD:-24}" --in-process-levels 64 --endpoint-levels "${LOAD_ENDPOINT:-64}" \
        --floor-levels 64,256 --timeline-level 64 --prompt-input input_ids --startup-timeout-s 400 2>&1 \
        | grep -v -i -E "warning|indices sequence" | tail -60 | tee -a "$LOG"
      grep -h -E "captured decode|step trace|Traceback|Error" "$ART_L/$LM/profile"/.triton-load.pid.log 2>/dev/null \
        | tail -8 | tee -a "$LOG"
      mkdir -p "$WORK/results/$LM"
      for f in serving-load.json serving-timeline.json serving-stream-load-floor.json serving-stream-load-timeline.json; do
        cp "$ART_L/$LM/profile/$f" "$WORK/results/$LM/" 2>/dev/null
      done
      # the sweep's own file holds every request (compact): large, so gzip it beside the others
      gzip -c "$ART_L/$LM/profile/serving-stream-load.json" > "$WORK/results/$LM/serving-stream-load.json.gz" \
        2>/dev/null ;;
    decode)
      mkdir -p "$WORK/results/llama-1b"
      say "decode: fused decode kernels vs today's step (Llama-1B and GPT-2 124M shapes, INT4, profiles)"
      timeout "$(tmo 480)" "$PY" profile/decode_kernels_gpu.py --out "$WORK/results/llama-1b/decode-kernels.json" \
        ${DECODE_ARGS:---baseline-long} 2>&1 | grep -v -i warning | tail -60 | tee -a "$LOG" ;;
    prefix)
      say "prefix: paged KV + prefix cache vs contiguous slots (llama-1b, fp16)"
      mkdir -p "$WORK/results/llama-1b"
      timeout "$(tmo "${PREFIX_TIMEOUT:-540}")" "$PY" profile/prefix_cache_gpu.py --model llama-1b \
        --out "$WORK/results/llama-1b/prefix-cache.json" 2>&1 | grep -v -i warning | tail -30 | tee -a "$LOG" ;;
    structured)
      say "structured: JSON schema vs none, 1 and 64 streams (llama-1b, compiled fp16)"
      mkdir -p "$WORK/results/llama-1b"
      timeout "$(tmo 540)" "$PY" profile/structured_gpu.py --out "$WORK/results/llama-1b/structured-overhead.json" 2>&1 \
        | grep -v -i warning | tail -24 | tee -a "$LOG" ;;
    *) echo "unknown part $part" | tee -a "$LOG" >&2
       [ "$DRY" = 1 ] && echo "   FAIL: unknown part $part" >> "$FAILS" ;;
  esac
  SPENT_S=$(( SPENT_S + need ))
done
if [ "$DRY" = 1 ]; then
  # every Python command noted above: its script's build_parser() takes its flags (each script imported once)
  "$REAL_PY" - "$ROOT" "$CMDS" > "$OUTDIR/dry-run-parsers.txt" 2>&1 <<'DRYEOF' || echo "   FAIL: the parser check" >> "$FAILS"
import contextlib, importlib.util, io, sys
root, cmds = sys.argv[1], sys.argv[2]
mods = {}
for line in open(cmds).read().splitlines():
    script, *argv = line.split("\x1f")[:-1]
    if script not in mods:
        spec = importlib.util.spec_from_file_location(f"_gpu_all_dry_run{len(mods)}", f"{root}/{script}")
        mods[script] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mods[script]
        spec.loader.exec_module(mods[script])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            mods[script].build_parser().parse_args(argv)
        print(f"   ok: {script} takes {' '.join(a for a in argv if a.startswith('--'))}")
    except SystemExit:
        print(f"   FAIL: {script} rejects its arguments ({err.getvalue().strip().splitlines()[-1]}): {' '.join(argv)}")
DRYEOF
  tee -a "$LOG" < "$OUTDIR/dry-run-parsers.txt"
  grep "FAIL" "$OUTDIR/dry-run-parsers.txt" >> "$FAILS"
  if [ -s "$FAILS" ]; then say "dry run: $(wc -l < "$FAILS") check(s) failed"; cat "$FAILS"; exit 1; fi
  say "dry run: every script and flag checked; device calls of at most ${BUDGET_S} s: $PLAN"
  exit 0
fi
tar -czf "$OUTDIR/gpu-results.tar.gz" -C "$WORK/results" . && say "wrote $OUTDIR/gpu-results.tar.gz"
ls -la "$WORK/results" | tee -a "$LOG"
