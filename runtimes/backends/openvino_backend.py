"""OpenVINO: CPU, GPU (Intel iGPU / dGPU) or NPU, with a model cache so later loads skip compilation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov

from amoe_sdk.errors import BackendError
from amoe_sdk.runtimes.backends.base import Backend
from amoe_sdk.runtimes.bundle import Bundle


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

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({0: batch})
        return {name: np.asarray(results[output]) for name, output in zip(self.output_names, self.compiled.outputs)}
