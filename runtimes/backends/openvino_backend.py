"""OpenVINO: CPU, GPU (Intel iGPU / dGPU), NPU or AUTO, with a model cache so later loads skip compilation.

Precision is pinned: every device compiles at the inference precision the bundle's threshold was measured at
(``threshold.inference_precision``, f32), because OpenVINO would otherwise pick one per device (bf16 on CPUs with
AMX or AVX-512 BF16, f16 on GPUs) and move every score. Each thread borrows an infer request of its own from a
pool; the outputs are copied out before the request goes back.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import openvino as ov

from amoe_sdk.errors import BackendError
from amoe_sdk.runtimes.backends.base import Backend, InferPipeline, LanePool
from amoe_sdk.runtimes.backends.options import OpenVINOOptions

LOG = logging.getLogger("amoe_sdk.runtimes")
# Infer requests one backend keeps at most; a thread beyond that waits for a free one.
MAX_REQUESTS = 16
_PRECISIONS = {"f32": ov.Type.f32, "f16": ov.Type.f16, "bf16": ov.Type.bf16}


class AsyncQueuePipeline(InferPipeline):
    """OpenVINO's ``AsyncInferQueue``: ``depth`` infer requests run concurrently on the compiled model (with the
    THROUGHPUT hint the CPU plugin gives each its own stream)."""

    def __init__(self, backend: "OpenVINOBackend", depth: int):
        self.depth = depth
        self._backend = backend
        self._names = backend.output_names
        self._queue = ov.AsyncInferQueue(backend.compiled, depth)
        self._queue.set_callback(self._done)

    def _done(self, request: ov.InferRequest, future: Future) -> None:
        try:
            future.set_result({name: np.array(request.get_output_tensor(i).data) for i, name in enumerate(self._names)})
        except Exception as exc:  # handed to the waiting caller, not lost in OpenVINO's callback thread
            future.set_exception(exc)

    def submit(self, batch: np.ndarray) -> Future:
        self._backend.check_batch(batch)
        future: Future = Future()
        self._queue.start_async({0: batch}, future)  # blocks while every request is busy
        return future

    def close(self) -> None:
        self._queue.wait_all()


class OpenVINOBackend(Backend):
    name = "openvino"

    options: OpenVINOOptions

    def activate_impl(self) -> None:
        core = ov.Core()
        device = self.requested_device.upper()
        available = core.available_devices
        for wanted in _physical_devices(device):
            if not any(d == wanted or d.startswith(wanted + ".") for d in available):
                raise BackendError(
                    f"OpenVINO device '{wanted}' is not present on this machine (it has {', '.join(available)}); "
                    "install the device's driver or pass one of those"
                )
        options = self.options
        calibrated = self.bundle.manifest.threshold.inference_precision
        precision = options.inference_precision or calibrated
        if precision not in _PRECISIONS:
            raise BackendError(f"inference_precision '{precision}' is unknown; choose one of {', '.join(_PRECISIONS)}")
        if precision != calibrated:
            LOG.warning(
                "%s runs at %s, but its threshold was measured at %s: scores will differ from the calibration; "
                "measure the threshold again on this device (amoe verify shows the shift)", self.bundle.root, precision, calibrated,
            )
        if options.cache_dir is not None:
            Path(options.cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(options.cache_dir)})
        config: dict[str, str] = {"PERFORMANCE_HINT": options.hint, "INFERENCE_PRECISION_HINT": precision}
        if options.threads and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = str(options.threads)
        xml = self.bundle.artifact("openvino_xml")
        try:
            model = core.read_model(str(xml))
            self.compiled = core.compile_model(model, device, config)
        except RuntimeError as exc:
            raise BackendError(
                f"OpenVINO cannot compile {xml} for {device} at {precision} (the precision its threshold was measured "
                f"at): {exc}. If this device cannot run {precision}, pass inference_precision= with one it runs and "
                "measure the threshold on it, or run on another device"
            ) from exc
        self._check_precision(device, precision)
        port = self.compiled.inputs[0]
        self.check_artifact_input(tuple(port.get_shape()), "uint8" if port.get_element_type() == ov.Type.u8 else str(port.get_element_type()), str(xml))
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]
        self._requests: LanePool[ov.InferRequest] = LanePool(self.compiled.create_infer_request, MAX_REQUESTS)
        self.precision = precision
        self.device = device

    def _check_precision(self, device: str, precision: str) -> None:
        """Read back the precision the plugin chose; a plugin that cannot report it (AUTO) got the hint passed on."""
        try:
            actual = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        except RuntimeError:
            return
        if actual != _PRECISIONS[precision]:
            raise BackendError(
                f"OpenVINO on {device} compiled at {actual} although {precision} was asked for; its scores would not "
                "match the bundle's threshold. Run on another device or update OpenVINO"
            )

    def pipeline(self, depth: int) -> InferPipeline:
        self.check_usable()
        return AsyncQueuePipeline(self, depth)

    def infer_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self._requests.borrow() as request:
            results = request.infer({0: batch}, share_outputs=False)  # copies: the request goes back to the pool
            return {name: np.asarray(results[output]) for name, output in zip(self.output_names, self.compiled.outputs)}

    def deactivate_impl(self) -> None:
        self._requests.close()
        self.compiled = None


def _physical_devices(device: str) -> list[str]:
    """The devices a name asks for: ``AUTO:GPU,CPU`` -> [GPU, CPU]; plain ``AUTO`` -> [] (it picks what is there)."""
    if ":" in device:
        return [d for d in device.split(":", 1)[1].split(",") if d]
    return [] if device in ("AUTO", "MULTI", "HETERO") else [device]
