"""OpenVINO: CPU, GPU (Intel iGPU / dGPU) or NPU, with a model cache so later loads skip compilation."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import numpy as np
import openvino as ov

from amoe_sdk.errors import BackendError
from amoe_sdk.runtimes.backends.base import Backend, InferPipeline
from amoe_sdk.runtimes.bundle import Bundle


class AsyncQueuePipeline(InferPipeline):
    """OpenVINO's ``AsyncInferQueue``: ``depth`` infer requests run concurrently on the compiled model (with the
    THROUGHPUT hint the CPU plugin gives each its own stream)."""

    def __init__(self, compiled: ov.CompiledModel, depth: int):
        self.depth = depth
        self._names = [output.get_any_name() for output in compiled.outputs]
        self._queue = ov.AsyncInferQueue(compiled, depth)
        self._queue.set_callback(self._done)

    def _done(self, request: ov.InferRequest, future: Future) -> None:
        try:
            future.set_result({name: np.array(request.get_output_tensor(i).data) for i, name in enumerate(self._names)})
        except Exception as exc:  # handed to the waiting caller, not lost in OpenVINO's callback thread
            future.set_exception(exc)

    def submit(self, batch: np.ndarray) -> Future:
        future: Future = Future()
        self._queue.start_async({0: batch}, future)  # blocks while every request is busy
        return future

    def close(self) -> None:
        self._queue.wait_all()


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(
        self,
        bundle: Bundle,
        device: str = "CPU",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        hint: str = "LATENCY",
    ):
        core = ov.Core()
        device = device.upper()
        available = core.available_devices
        if device != "AUTO" and not any(d == device or d.startswith(device + ".") for d in available):
            raise BackendError(
                f"OpenVINO device '{device}' is not present on this machine (it has {', '.join(available)}); "
                "install the device's driver or pass one of those"
            )
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        config: dict[str, str] = {"PERFORMANCE_HINT": hint}
        if threads and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = str(threads)
        if device == "CPU" and bundle.manifest.get("precision") in ("fp32", "int8"):
            # Recent CPUs would otherwise run an FP32 model in bf16 and break parity with the reference.
            config["INFERENCE_PRECISION_HINT"] = "f32"
        xml = bundle.artifact("openvino_xml")
        try:
            self.compiled = core.compile_model(core.read_model(str(xml)), device, config)
        except RuntimeError as exc:
            raise BackendError(f"OpenVINO cannot compile {xml} for {device}: {exc}") from exc
        self.request = self.compiled.create_infer_request()
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]
        self.device = device

    def pipeline(self, depth: int) -> InferPipeline:
        return AsyncQueuePipeline(self.compiled, depth)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({0: batch})
        return {name: np.asarray(results[output]) for name, output in zip(self.output_names, self.compiled.outputs)}
