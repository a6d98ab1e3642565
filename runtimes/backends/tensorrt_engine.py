"""Building a TensorRT 10 engine from the bundle's TensorRT-ready ONNX (host or device; needs only tensorrt).

Used by the converter when it runs beside a GPU, and by the runtime at first load on a Jetson when the bundle
carries only the ONNX. The timing cache makes a rebuild on the same GPU take seconds instead of minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amoe_sdk.errors import BackendError, ConversionError


@dataclass
class EngineOptions:
    """``fp16``: allow FP16 kernels; ``dla_core``: run on that DLA core, GPU fallback for what it cannot run;
    ``workspace_mib``: the builder's scratch memory; ``timing_cache``: file read before and written after the build."""

    fp16: bool = True
    dla_core: int | None = None
    workspace_mib: int = 1024
    timing_cache: Path | None = None


def build_engine(onnx_path: Path, engine_path: Path, options: EngineOptions) -> dict:
    """Parse ``onnx_path``, build a serialized engine with one fixed optimisation profile, write it atomically.

    -> {"tensorrt_version", "fp16", "dla_core"}; raises ConversionError with the parser's messages.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConversionError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise BackendError(
                f"DLA core {options.dla_core} requested but this device has {builder.num_DLA_cores} DLA core(s); "
                "omit --dla-core or pick an existing one"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    # Static shapes: one profile whose min, opt and max are the exported shape.
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, tensor.shape, tensor.shape, tensor.shape)
    config.add_optimization_profile(profile)
    cache_bytes = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConversionError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
    _atomic_write(engine_path, bytes(serialized))
    if options.timing_cache:
        _atomic_write(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"tensorrt_version": trt.__version__, "fp16": options.fp16, "dla_core": options.dla_core}


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(data)
    temporary.replace(path)
