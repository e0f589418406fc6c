# The pipeline, stage by stage. Targets are the stages' manifests, so `make` reruns only what is stale.
#   make demo    - create .venv, install pinned requirements, run every stage on the built-in model, print a summary
#   make test    - same setup, then the test suite
#   make help    - one line per target
# Variables: MODEL (default tiny; a preset, a local Hugging Face folder or a hub id), ART (artifacts root),
#            PYTHON (interpreter that creates .venv), NSYS=0 to decline the Nsight Systems install

MODEL   ?= tiny
ART     ?= artifacts
PYTHON  ?= python3
NSYS    ?= 1
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# MODEL's artifacts folder (lmopt.models.model_key, standard library only: works before .venv exists): a preset or
# hub id as given, a local folder its name plus a hash of its resolved path, so two folders never share artifacts
KEY     := $(shell $(PYTHON) -c 'import sys; from lmopt.models import model_key; print(model_key(sys.argv[1]))' '$(MODEL)')
A       := $(ART)/$(or $(KEY),$(MODEL))
# a local model's own files: when they change, the export (and all that follows) is stale
MODEL_FILES := $(if $(wildcard $(MODEL)/config.json),$(wildcard $(MODEL)/*))

export PYTHONUNBUFFERED := 1

.PHONY: setup demo test export export-fp16 export-gqa quantize fp16 engine serve-repo serve-demo benchmark benchmark-gpu profile notebook diagram \
        readme-tables publish-results summary clean help setup-nsys setup-haproxy

help:  ## this list
	@sed -n '2,4p' Makefile
	@awk -F':.*## ' '/^[a-z0-9-]+:.*## /{printf "  make %-20s %s\n", $$1, $$2}' Makefile

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)  ## create .venv and install the pinned requirements

# ---- stage 1: HF -> ONNX (FP32, KV cache) --------------------------------------------------------------------------
$(A)/export/fp32/manifest.json: $(STAMP) $(MODEL_FILES)
	$(PY) convert/export_onnx.py --model $(MODEL) --artifacts $(ART)
export: $(A)/export/fp32/manifest.json  ## stage 1: MODEL -> FP32 ONNX with KV cache, checked against PyTorch

# FP16 graph for ONNX Runtime's CUDA EP (fused and converted by ONNX Runtime's tools; DEVICE=cuda validates on the GPU)
DEVICE ?= cpu
$(A)/export/fp16/manifest.json: $(STAMP) $(MODEL_FILES)
	$(PY) convert/export_onnx.py --model $(MODEL) --artifacts $(ART) --dtype fp16 --device $(DEVICE)
export-fp16: $(A)/export/fp16/manifest.json  ## FP16 ONNX for ONNX Runtime CUDA (DEVICE=cuda validates on the GPU)
# the fused GroupQueryAttention graph with a fixed-size KV buffer (engine ort-gqa; MAX_LEN positions, 0 = context)
MAX_LEN ?= 0
$(A)/export/fp16-gqa/manifest.json: $(STAMP) $(MODEL_FILES)
	$(PY) convert/export_onnx.py --model $(MODEL) --artifacts $(ART) --dtype fp16 --attention gqa --device $(DEVICE) \
		--max-len $(MAX_LEN)
export-gqa: $(A)/export/fp16-gqa/manifest.json  ## fused GroupQueryAttention FP16 graph (engine ort-gqa)

# ---- stage 2: INT8 Q/DQ (per target) and FP16 --------------------------------------------------------------------
# one run writes both INT8 graphs: S8S8 Q/DQ for TensorRT, U8S8 for ONNX Runtime CPU (docs/quantization.md)
$(A)/quantize/int8-qdq-trt-minmax/manifest.json $(A)/quantize/int8-cpu-u8s8-minmax/manifest.json &: \
		$(A)/export/fp32/manifest.json
	$(PY) convert/quantize_model.py --model $(MODEL) --artifacts $(ART)
quantize: $(A)/quantize/int8-qdq-trt-minmax/manifest.json $(A)/quantize/int8-cpu-u8s8-minmax/manifest.json  ## stage 2: INT8 graphs (TensorRT Q/DQ, ORT CPU)

# weight-only INT4 (MatMulNBits) for ONNX Runtime CPU: of optimum's graph (engine ort) and of the fused GQA graph
# (engine ort-gqa), same accuracy budget
$(A)/export/fp32-gqa/manifest.json: $(STAMP) $(MODEL_FILES)
	$(PY) convert/export_onnx.py --model $(MODEL) --artifacts $(ART) --dtype fp32 --attention gqa --max-len $(MAX_LEN)
$(A)/quantize/int4-cpu-nbits/manifest.json: $(A)/export/fp32/manifest.json
	$(PY) convert/quantize_model.py --model $(MODEL) --artifacts $(ART) --target onnxruntime-int4
$(A)/quantize/int4-cpu-nbits-gqa/manifest.json: $(A)/export/fp32-gqa/manifest.json
	$(PY) convert/quantize_model.py --model $(MODEL) --artifacts $(ART) --target onnxruntime-int4 --attention gqa
.PHONY: quantize-int4
quantize-int4: $(A)/quantize/int4-cpu-nbits/manifest.json $(A)/quantize/int4-cpu-nbits-gqa/manifest.json  ## weight-only INT4 for ORT CPU

$(A)/quantize/fp16/manifest.json: $(A)/export/fp32/manifest.json
	$(PY) convert/convert_fp16.py --model $(MODEL) --artifacts $(ART)
fp16: $(A)/quantize/fp16/manifest.json  ## stage 2: FP16 graph for TensorRT

# ---- stage 3: TensorRT engines (needs TensorRT 11 and an NVIDIA GPU; skipped with a note otherwise) --------------
engine: quantize fp16  ## stage 3: TensorRT engines (skipped with a note without TensorRT and a GPU)
	$(PY) optimize/build_trt_engine.py --model $(MODEL) --artifacts $(ART) --precision fp16 --skip-if-unavailable
	$(PY) optimize/build_trt_engine.py --model $(MODEL) --artifacts $(ART) --precision int8 --skip-if-unavailable

# ---- stage 4: Triton Inference Server -----------------------------------------------------------------------------
# (the repository's variant is chosen at run time, so its target is a stamp next to the variants)
$(A)/serve/.made: $(A)/quantize/int8-qdq-trt-minmax/manifest.json $(A)/quantize/int8-cpu-u8s8-minmax/manifest.json
	$(PY) serve/make_model_repository.py --model $(MODEL) --artifacts $(ART)
	touch $@
serve-repo: $(A)/serve/.made  ## stage 4: Triton model repository (ORT on CPU, the faster of FP32 and INT8)
serve-demo: serve-repo  ## start Triton, send checked requests (PASS/FAIL), stop it
	bash serve/demo.sh $(MODEL) $(ART)
# OpenAI-compatible endpoint (serve/openai_server.py) in front of Triton, both in the background; OPENAI_PORT (8080)
.PHONY: serve-openai serve-stop
serve-openai: serve-repo  ## Triton + the OpenAI-compatible gateway on 127.0.0.1:OPENAI_PORT (8080), in the background
	PYTHON=$(PY) bash serve/serve_openai.sh start $(MODEL) $(ART)
serve-stop:  ## stop every server serve-openai / serve-replicas started under ART, whatever MODEL was
	@PYTHON=$(PY) bash serve/serve_openai.sh stop-all "" $(ART)
# N Triton replicas behind HAProxy on 127.0.0.1 (HTTP, gRPC streaming) + one OpenAI gateway in front of it, in the
# background; REPLICAS (2), GPUS=0,1 (one server per GPU), ports: see serve/run_replicas.sh
.PHONY: setup-haproxy serve-replicas serve-replicas-stop
setup-haproxy:  ## install HAProxy (Debian package) for serve-replicas
	@bash serve/setup_haproxy.sh
serve-replicas: serve-repo setup-haproxy  ## REPLICAS Triton servers behind HAProxy + one gateway
	PYTHON=$(PY) REPLICAS=$(or $(REPLICAS),2) bash serve/run_replicas.sh start $(MODEL) $(ART)
serve-replicas-stop:  ## stop what serve-replicas started for MODEL
	PYTHON=$(PY) bash serve/run_replicas.sh stop $(MODEL) $(ART)
# NVIDIA's aiperf (OpenAI-API LLM benchmark) in its own venv: it needs a newer transformers than the pinned set
AIPERF_VENV := .venv-aiperf
.PHONY: aiperf-venv
aiperf-venv: $(AIPERF_VENV)/.installed  ## NVIDIA aiperf in its own venv
$(AIPERF_VENV)/.installed:
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install -q --upgrade pip
	$(AIPERF_VENV)/bin/pip install -q aiperf==0.13.0
	touch $@

# llama.cpp as a benchmark engine (`--engines ...,llamacpp`): llama-cpp-python built from source for this CPU into
# $(LLAMACPP)/site (not in `make test`'s path; ~15 min on 2 cores), plus the converter and gguf-py its sdist vendors
LLAMACPP     := .llamacpp
LLAMACPP_VER := 0.3.36
.PHONY: llamacpp
llamacpp: $(LLAMACPP)/.installed  ## build llama-cpp-python for this CPU (~15 min)
$(LLAMACPP)/.installed: $(STAMP)
	rm -rf $(LLAMACPP)/src $(LLAMACPP)/site && mkdir -p $(LLAMACPP)/src
	$(VENV)/bin/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VER) -d $(LLAMACPP)/src
	tar xzf $(LLAMACPP)/src/llama_cpp_python-$(LLAMACPP_VER).tar.gz -C $(LLAMACPP)/src
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(VENV)/bin/pip install -q --no-deps --target $(LLAMACPP)/site $(LLAMACPP)/src/llama_cpp_python-$(LLAMACPP_VER)
	$(VENV)/bin/pip install -q --no-deps --target $(LLAMACPP)/site diskcache==5.6.3 sentencepiece==0.2.1
	touch $@
# llama.cpp's files of MODEL (F32 by the vendored converter, Q8_0 and Q4_0 by llama.cpp's quantizer), for the engine
.PHONY: gguf
$(A)/gguf/f32/manifest.json $(A)/gguf/q8_0/manifest.json $(A)/gguf/q4_0/manifest.json &: $(LLAMACPP)/.installed
	$(PY) convert/export_gguf.py --model $(MODEL) --artifacts $(ART)
gguf: $(A)/gguf/f32/manifest.json $(A)/gguf/q8_0/manifest.json $(A)/gguf/q4_0/manifest.json  ## llama.cpp files of MODEL

# ---- stage 5-6: measure ---------------------------------------------------------------------------------------------
# BENCH_ARGS e.g. "--engines torch,ort --precisions fp32,int8 --batch-sizes 1" (see profile/benchmark.py --help)
benchmark: quantize  ## stage 5: every engine x precision available here (BENCH_ARGS)
	$(PY) profile/benchmark.py --model $(MODEL) --artifacts $(ART) $(BENCH_ARGS)
# on a GPU machine: every GPU engine side by side (profile/benchmark.py --preset gpu), ORT on the FP16 graph
benchmark-gpu: DEVICE = cuda
benchmark-gpu: export-fp16 export-gqa  ## every GPU engine side by side
	$(PY) profile/benchmark.py --preset gpu --model $(MODEL) --artifacts $(ART) $(BENCH_ARGS)
publish-results: $(STAMP)  ## copy this machine's result JSON into results/<machine>/
	$(PY) report/publish_results.py --artifacts $(ART) $(if $(filter command line,$(origin MODEL)),--model $(MODEL))
# Nsight Systems from Debian 12 non-free (needs root); idempotent, never fails the build, NSYS=0 declines
setup-nsys:  ## install Nsight Systems (Debian non-free; NSYS=0 declines)
	@NSYS=$(NSYS) bash profile/setup_nsys.sh
profile: export setup-nsys  ## stage 6: Nsight Systems (or PyTorch profiler) timeline with NVTX ranges
	$(PY) profile/run_nsys_profile.py --model $(MODEL) --artifacts $(ART)
	$(PY) profile/nsys_nvtx_overhead.py --model $(MODEL) --artifacts $(ART)

# ---- stage 4-5: benchmark the served model (two Triton servers: dynamic batching on / off) -----------------------
.PHONY: serve-bench serve-bench-publish
# SERVE_BENCH_ARGS="--compare scheduler": in-flight vs static batching instead of dynamic batching on vs off
serve-bench: serve-repo  ## benchmark the served model (dynamic batching on vs off)
	$(PY) profile/serve_bench.py --model $(MODEL) --artifacts $(ART) $(SERVE_BENCH_ARGS)
serve-bench-publish: $(STAMP)  ## copy the serving results into results/
	$(PY) report/publish_results.py --kind serving --model $(MODEL) --artifacts $(ART)

# ---- report ------------------------------------------------------------------------------------------------------
diagram: diagrams/pipeline_architecture.png  ## draw the architecture map
diagrams/pipeline_architecture.png: diagrams/pipeline_architecture.py diagrams/pipeline_architecture.txt $(STAMP)
	$(PY) diagrams/pipeline_architecture.py
# MACHINE=<tag>: plot the committed results/<tag>/<model>/ instead of this machine's artifacts
notebook: $(STAMP)  ## run the latency notebook -> artifacts/<model>/report/ (HTML + PNG)
	$(PY) notebooks/run_notebook.py --model $(MODEL) --artifacts $(ART) $(if $(MACHINE),--machine $(MACHINE))
readme-tables: $(STAMP)  ## regenerate the README's headline and results/README.md from the committed result JSON
	$(PY) report/update_readme.py --readme README.md --results results
	$(PY) report/update_readme.py --readme results/README.md --results results

summary: $(STAMP)  ## what was built for MODEL and where (one line per stage output)
	$(PY) report/summarize_artifacts.py --model $(MODEL) --artifacts $(ART)

demo: setup export quantize fp16 engine serve-demo benchmark profile notebook diagram summary  ## every stage on MODEL, then a summary

test: setup setup-nsys setup-haproxy  ## the test suite (CPU, under 30 min)
	$(PY) -m pytest -q tests

clean:  ## delete ART (every model's artifacts)
	rm -rf $(ART)
