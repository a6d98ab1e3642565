"""TensorRT 10 on an NVIDIA GPU or Jetson, with CUDA memory handled by cuda-python (no torch, no pycuda).

The engine is specific to the GPU and the TensorRT version, so a bundle may carry only the TensorRT-ready ONNX:
the first load builds the engine on the device and caches it under ``<bundle>/engine_cache`` (or ``cache_dir``),
named by GPU and TensorRT version; later loads deserialize it. An execution context and its device buffers serve
one batch at a time, so each thread borrows a lane (context, CUDA stream, buffers) of its own from a pool.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from amoe_sdk.errors import BackendError, BundleError
from amoe_sdk.runtimes.backends.base import Backend, LanePool
from amoe_sdk.runtimes.backends.options import TensorRTOptions
from amoe_sdk.runtimes.backends.tensorrt_engine import EngineOptions, build_engine
from amoe_sdk.runtimes.bundle import Bundle


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BackendError("the TensorRT backend needs cuda-python for GPU memory: pip install cuda-python") from exc
    return cudart


def _check(result):
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed with error {err}")
    return values[0] if len(values) == 1 else values


# Execution contexts one backend keeps at most (each holds its activation memory on the device).
MAX_LANES = 8


class TensorRTBackend(Backend):
    name = "tensorrt"

    options: TensorRTOptions

    def activate_impl(self) -> None:
        import tensorrt as trt

        cudart = _cudart()
        match = re.fullmatch(r"(?:cuda:)?(\d+)", self.requested_device.lower())
        if not match:
            raise BackendError(f"TensorRT device '{self.requested_device}' is not a CUDA device; pass cuda:0 (or another index)")
        index = int(match.group(1))
        count = _check(cudart.cudaGetDeviceCount()) if self._has_cuda(cudart) else 0
        if index >= count:
            raise BackendError(f"TensorRT device cuda:{index} requested but this machine has {count} CUDA device(s)")
        _check(cudart.cudaSetDevice(index))
        gpu = self.gpu_name(index)
        engine_path = self._engine_for(self.bundle, gpu, trt.__version__, self.options.cache_dir, self.options.dla_core)
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT cannot deserialize {engine_path}; delete it to rebuild on this device")
        first = _Lane(self.engine, cudart, trt, index)
        inputs = [(shape, dtype) for shape, dtype, _, is_input in first.tensors.values() if is_input]
        try:
            self.check_artifact_input(inputs[0][0], str(inputs[0][1]), str(engine_path))
        except BundleError:
            first.close()
            raise
        self.lanes: LanePool[_Lane] = LanePool(lambda: _Lane(self.engine, cudart, trt, index), MAX_LANES, _Lane.close)
        self.lanes.prime(first)
        self.device = f"cuda:{index} ({gpu})"

    @staticmethod
    def gpu_name(index: int) -> str:
        name = _check(_cudart().cudaGetDeviceProperties(index)).name
        return name.decode(errors="replace").strip("\x00") if isinstance(name, bytes) else str(name)

    @staticmethod
    def _has_cuda(cudart) -> bool:
        err, _ = cudart.cudaGetDeviceCount()
        return int(err) == 0

    @staticmethod
    def _engine_for(bundle: Bundle, gpu: str, version: str, cache_dir, dla_core) -> Path:
        engine = bundle.manifest.tensorrt_engine or {}
        if engine.get("gpu") == gpu and engine.get("tensorrt_version") == version and dla_core == engine.get("dla_core"):
            return bundle.artifact("tensorrt_engine")
        cache = Path(cache_dir) if cache_dir else bundle.root / "engine_cache"
        tag = re.sub(r"[^A-Za-z0-9]+", "-", f"{gpu}-trt{version}-dla{dla_core}").strip("-")
        path = cache / f"model-{tag}.engine"
        if not path.is_file():
            fp16 = bundle.manifest.precision in ("fp16", "int8")
            build_engine(bundle.artifact("tensorrt_onnx"), path, EngineOptions(fp16=fp16, dla_core=dla_core, timing_cache=cache / "timing.cache"))
        return path

    def infer_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # Batches in flight from several threads (a pipeline, several callers) each run in a lane of their own, so
        # copies and kernels of consecutive batches overlap on the GPU.
        with self.lanes.borrow() as lane:
            return lane.infer(batch)

    def deactivate_impl(self) -> None:
        self.lanes.close()
        self.engine = None


class _Lane:
    """One execution context, CUDA stream and set of device buffers: one batch in flight."""

    def __init__(self, engine, cudart, trt, device_index: int):
        self.cudart, self.device_index = cudart, device_index
        self.context = engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.tensors: dict[str, tuple[tuple[int, ...], np.dtype, int, bool]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            pointer = _check(cudart.cudaMalloc(int(np.prod(shape)) * dtype.itemsize))
            self.context.set_tensor_address(name, pointer)
            self.tensors[name] = (shape, dtype, pointer, is_input)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self.cudart
        _check(cudart.cudaSetDevice(self.device_index))  # the current device is per thread
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        outputs = {}
        for name, (shape, dtype, pointer, is_input) in self.tensors.items():
            if is_input:
                data = np.ascontiguousarray(batch, dtype=dtype)
                _check(cudart.cudaMemcpyAsync(pointer, data.ctypes.data, data.nbytes, to_device, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise BackendError("TensorRT execution failed; see the TensorRT log above")
        for name, (shape, dtype, pointer, is_input) in self.tensors.items():
            if not is_input:
                host = np.empty(shape, dtype)
                _check(cudart.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes, to_host, self.stream))
                outputs[name] = host
        _check(cudart.cudaStreamSynchronize(self.stream))
        return outputs

    def close(self) -> None:
        for _, _, pointer, _ in self.tensors.values():
            self.cudart.cudaFree(pointer)
        self.tensors.clear()
        self.cudart.cudaStreamDestroy(self.stream)
