"""The one place that knows TensorRT's Python API: which names we use, which 11.x removed, how to import it.

`USED` lists every `tensorrt` attribute the builder (optimize/build_trt_engine.py) and the runtime
(lmopt/engines/trt_engine.py) touch: module-level names as `Name`, enum members as `Enum.MEMBER`, and methods or
properties of TensorRT objects as `Class.member`. tests/test_trt_api.py checks that every one exists in TensorRT 11's
compiled bindings (the `tensorrt-cu13-bindings` wheel, whose `tensorrt.so` imports only with libnvinfer but whose
symbol strings list every bound name), that none is in `REMOVED_IN_11`, and that the two source files use no
TensorRT name that is missing here. Sources: TensorRT 11.4 "Migrating Python Code from TensorRT 10.x to 11.x" and
"Removed Python APIs and Replacements"; the 11.1 OSS Python bindings (python/src/infer/pyCore.cpp).

Differences 10 -> 11 that matter here (the code handles both):
  - networks are always strongly typed in 11; on 10 the builder must ask for it with
    `1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)` (the flag still exists in 11, deprecated, a no-op);
  - the engine inspector's JSON: 10 writes one "Format/Datatype" string per tensor, 11 splits "Format" and
    "DataType" and replaces "Bindings" by "I/O Tensors" (see `layer_precision_summary` in build_trt_engine.py).
"""
from __future__ import annotations

import os

from .errors import UserError

# name -> why we use it. Keep in step with the code: the conformance test fails on any name used but not listed.
USED: dict[str, str] = {
    "__version__": "engine folder name trt<major>.<minor>-<precision>, manifest",
    # logging
    "ILogger": "subclassed to capture the build log",
    "ILogger.Severity": "log levels",
    "ILogger.Severity.INTERNAL_ERROR": "log level", "ILogger.Severity.ERROR": "log level",
    "ILogger.Severity.WARNING": "log level", "ILogger.Severity.INFO": "log level",
    "ILogger.Severity.VERBOSE": "log level",
    "ILogger.log": "overridden by the capturing logger",
    "Logger": "runtime logger of TrtEngine.from_artifacts", "Logger.WARNING": "runtime log level",
    # builder
    "Builder": "engine build",
    "Builder.create_network": "network definition (flags: 0 on 11, STRONGLY_TYPED on 10)",
    "Builder.create_builder_config": "build config",
    "Builder.create_optimization_profile": "prefill and decode profiles",
    "Builder.build_serialized_network": "the build itself",
    "NetworkDefinitionCreationFlag": "strong typing on TensorRT 10",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": "strong typing on TensorRT 10",
    "INetworkDefinition.num_inputs": "check the network's inputs against the profiles",
    "INetworkDefinition.get_input": "check the network's inputs against the profiles",
    "ITensor.name": "input names",
    "OnnxParser": "ONNX -> network",
    "OnnxParser.parse_from_file": "reads external data next to the model",
    "OnnxParser.num_errors": "parser errors",
    "OnnxParser.get_error": "parser errors",
    "IBuilderConfig.set_memory_pool_limit": "workspace limit",
    "IBuilderConfig.builder_optimization_level": "optimization level 0-5",
    "IBuilderConfig.profiling_verbosity": "DETAILED layer information for the precision proof",
    "IBuilderConfig.create_timing_cache": "persistent timing cache",
    "IBuilderConfig.set_timing_cache": "persistent timing cache",
    "IBuilderConfig.get_timing_cache": "persistent timing cache",
    "IBuilderConfig.add_optimization_profile": "prefill and decode profiles",
    "ITimingCache.serialize": "persistent timing cache",
    "MemoryPoolType": "workspace limit", "MemoryPoolType.WORKSPACE": "workspace limit",
    "ProfilingVerbosity": "layer information", "ProfilingVerbosity.DETAILED": "layer information",
    "IOptimizationProfile.set_shape": "min/opt/max per input",
    # runtime
    "Runtime": "deserialize the plan",
    "Runtime.deserialize_cuda_engine": "deserialize the plan",
    "ICudaEngine.create_execution_context": "one context per profile",
    "ICudaEngine.create_engine_inspector": "layer information",
    "ICudaEngine.num_io_tensors": "I/O tensors", "ICudaEngine.get_tensor_name": "I/O tensors",
    "ICudaEngine.get_tensor_mode": "I/O tensors", "ICudaEngine.get_tensor_dtype": "buffer dtypes",
    "ICudaEngine.get_tensor_profile_shape": "limits of each profile",
    "ICudaEngine.num_optimization_profiles": "prefill + decode profiles present",
    "ICudaEngine.num_layers": "layer count in the manifest",
    "ICudaEngine.device_memory_size_v2": "context memory in the manifest (11 removed device_memory_size)",
    "IExecutionContext.set_optimization_profile_async": "bind a context to its profile",
    "IExecutionContext.set_input_shape": "shapes of each call",
    "IExecutionContext.get_tensor_shape": "output shapes after the input shapes are set",
    "IExecutionContext.set_tensor_address": "device buffers",
    "IExecutionContext.execute_async_v3": "run on a CUDA stream",
    "EngineInspector.get_engine_information": "layer information JSON",
    "EngineInspector.execution_context": "resolve dynamic shapes/formats in the layer information",
    "LayerInformationFormat": "layer information JSON", "LayerInformationFormat.JSON": "layer information JSON",
    "TensorIOMode": "I/O tensors", "TensorIOMode.INPUT": "I/O tensors", "TensorIOMode.OUTPUT": "I/O tensors",
    "DataType": "buffer dtypes", "DataType.FLOAT": "buffer dtypes", "DataType.HALF": "buffer dtypes",
    "DataType.BF16": "buffer dtypes", "DataType.INT8": "buffer dtypes", "DataType.INT32": "buffer dtypes",
    "DataType.INT64": "buffer dtypes", "DataType.BOOL": "buffer dtypes",
}

# Removed in TensorRT 11 (networks are strongly typed; precision comes from the ONNX graph). None may appear in USED.
REMOVED_IN_11: tuple[str, ...] = (
    "BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8", "BuilderFlag.FP8", "BuilderFlag.INT4",
    "BuilderFlag.FP4", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "BuilderFlag.DIRECT_IO",
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
    "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile",
    "IBuilderConfig.get_calibration_profile", "IBuilderConfig.set_quantization_flag",
    "IBuilderConfig.get_quantization_flag", "IBuilderConfig.quantization_flags",
    "IBuilderConfig.clear_quantization_flag", "IBuilderConfig.algorithm_selector",
    "Builder.platform_has_fast_fp16", "Builder.platform_has_fast_int8",
    "ICudaEngine.device_memory_size",
    "IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
    "IInt8LegacyCalibrator", "CalibrationAlgoType", "QuantizationFlag", "IAlgorithmSelector",
)

# Names in REMOVED_IN_11 whose last component is distinctive enough to look for in the bindings' strings (short
# ones like "FP16" also occur inside docstrings, so only USED is checked against them).
REMOVED_DISTINCTIVE: tuple[str, ...] = (
    "EXPLICIT_BATCH", "int8_calibrator", "set_calibration_profile", "get_calibration_profile",
    "set_quantization_flag", "platform_has_fast_fp16", "platform_has_fast_int8", "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "IAlgorithmSelector",
)

INSTALL_HINT = ("pip install tensorrt-cu13==11.4.0.106 (its installer fetches the libraries from NVIDIA's package "
                "index) or run in an NGC TensorRT container")


def import_tensorrt():
    """The `tensorrt` module, or a UserError saying what is missing and how to get it."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as e:
        msg = str(e)
        if "libnvinfer" in msg or "cannot open shared object" in msg:
            raise UserError(f"TensorRT's libraries are missing ({msg.splitlines()[0][:120]}) — {INSTALL_HINT}") \
                from None
        raise UserError(f"TensorRT 11 is not installed (no 'tensorrt' Python module) — {INSTALL_HINT}") from None
    return trt


def version_tuple(trt) -> tuple[int, int]:
    parts = str(trt.__version__).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def version_tag(trt) -> str:
    """`trt11.4`: the prefix of engine folder names (an engine only loads in the TensorRT that built it)."""
    major, minor = version_tuple(trt)
    return f"trt{major}.{minor}"


def network_flags(trt) -> int:
    """11: networks are always strongly typed (0). 10: ask for strong typing, so precision comes from the graph
    there too instead of the removed weak-typing flags."""
    if version_tuple(trt)[0] >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def gpu_problem() -> str | None:
    """Why no CUDA device can be used from Python (we keep device buffers in torch tensors), or None."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "no NVIDIA GPU visible (CUDA_VISIBLE_DEVICES is empty) — unset it on a machine with an NVIDIA GPU"
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return "PyTorch is missing (it holds the engine's device buffers) — pip install -r requirements.txt"
    if not torch.cuda.is_available():
        return ("no usable NVIDIA GPU (torch.cuda.is_available() is False: no GPU, no driver, or a CPU-only torch "
                "build) — run on a machine with an NVIDIA GPU, its driver and a CUDA build of torch")
    return None


def availability() -> tuple[object | None, str | None]:
    """(tensorrt module, None) when an engine can be built and run here, else (None, one-line reason + fix)."""
    missing = []
    trt = None
    try:
        trt = import_tensorrt()
    except UserError as e:
        missing.append(str(e))
    gpu = gpu_problem()
    if gpu:
        missing.append(gpu)
    if missing:
        return None, "; ".join(missing)
    return trt, None
