#!/usr/bin/env bash
# Prepare the wheels the GPU machine lacks for the Triton parts of profile/gpu_all.sh (its image has torch,
# transformers, numpy and tokenizers, but no Triton, gRPC client, gateway or aiohttp), as cp312 manylinux wheels:
#
#   bash profile/gpu_wheels.sh [DIR]        # default DIR: .whl in this checkout (git-ignored)
#
# Writes DIR/triton/  nvidia-pytriton, slimmed (tritonserver + Python backend + the Python 3.12 stub only: the
#                     full wheel is 55 MB, the slim one about a third of that, so one device call can carry it
#                     beside everything else; the bundled stubs for 3.8-3.11 and 3.13 and the pytriton Python
#                     package's model-proxy code are not used by serve/run_triton.sh)
#        DIR/client/  tritonclient (gRPC; its perf_analyzer binary stripped), grpcio, protobuf, aiohttp and its
#                     dependencies, starlette/uvicorn/uvloop/httptools (the OpenAI gateway), llguidance (structured
#                     output: one abi3 wheel, ~3 MB, no dependencies)
#        DIR/site.tar.xz  all of them installed for CPython 3.12 (pip --target, no console scripts) and packed with
#                     xz -9: about 36 MiB against 55 MiB of wheels (xz packs the Triton server's libraries far
#                     tighter than a wheel's deflate), so the tracked tree (about 18 MiB) and every wheel fit one
#                     device call's 64 MiB. profile/gpu_all.sh unpacks it into /tmp/site by itself
#                     (docs/gpu_runbook.md); carry only .whl/site.tar.xz
# By hand on the GPU machine, from the wheel folders instead (docs/serving_benchmark.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*/*.whl
#   export PYTHONPATH=/tmp/site
# Versions: requirements.txt's pins where it pins them; their dependencies at versions that install together.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR/triton" "$DIR/client" "$DIR/.dl"
PLAT=(--platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform manylinux_2_5_x86_64)
pin() { grep -E "^$1[=\[]" "$ROOT/requirements.txt" | sed -E 's/\[[^]]*\]//; s/[[:space:]]+#.*//; s/[[:space:]]+$//'; }
dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
         -d "$DIR/.dl" "$@"; }
dl "$(pin nvidia-pytriton)" "$(pin tritonclient)" grpcio==1.76.0 protobuf==6.33.1 python-rapidjson==1.22 \
   "$(pin starlette)" "$(pin uvicorn)" "$(pin uvloop)" "$(pin httptools)" h11==0.16.0 click==8.3.1 anyio==4.12.0 \
   sniffio==1.3.1 "$(pin aiohttp)" aiohappyeyeballs==2.6.1 aiosignal==1.4.0 attrs==25.4.0 frozenlist==1.8.0 \
   multidict==6.7.0 propcache==0.4.1 yarl==1.22.0 idna==3.11 typing_extensions==4.15.0 "$(pin llguidance)"
slim() {  # slim <wheel> <out dir> <zip paths to drop (regex)>: the same wheel without those files (RECORD fixed)
  "$PY" - "$@" <<'PY'
import re, sys, zipfile
src, out, drop = sys.argv[1], sys.argv[2], re.compile(sys.argv[3])
name = src.rsplit("/", 1)[-1]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(f"{out}/{name}", "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if drop.search(info.filename):
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.splitlines() if not drop.search(l.split(b",")[0].decode())) + b"\n"
        zout.writestr(info, data)
PY
}
rm -f "$DIR"/triton/*.whl "$DIR"/client/*.whl
for w in "$DIR"/.dl/*.whl; do
  case "$(basename "$w")" in
    nvidia_pytriton-*) slim "$w" "$DIR/triton" 'python_backend_stubs/3\.(8|9|10|11|13)/|pytriton/(proxy|models|client)/|nvidia_pytriton\.libs/libpython3-' ;;
    tritonclient-*) slim "$w" "$DIR/client" '/bin/perf_analyzer|/bin/perf_client|tritonclient/perf_analyzer|/genai_perf' ;;
    *) cp "$w" "$DIR/client/" ;;
  esac
done
# one file for the device call: the wheels installed for 3.12 (pip checks the tags against PLAT), packed with xz
rm -rf "$DIR/.site"
"$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" --target "$DIR/.site" "$DIR"/triton/*.whl "$DIR"/client/*.whl
rm -rf "$DIR/.site/bin"        # console scripts with this machine's interpreter in their first line: not used
if command -v xz >/dev/null; then
  tar -C "$DIR/.site" -cf - . | xz -9 -T0 > "$DIR/site.tar.xz.tmp"
else
  "$PY" -c "import sys, tarfile; t = tarfile.open(sys.argv[2], 'w:xz', preset=9); t.add(sys.argv[1], '.'); t.close()" \
    "$DIR/.site" "$DIR/site.tar.xz.tmp"
fi
mv "$DIR/site.tar.xz.tmp" "$DIR/site.tar.xz"
rm -rf "$DIR/.site"
du -sh "$DIR/triton" "$DIR/client" "$DIR/site.tar.xz"
