"""ONNX Runtime: CPU, CUDA or TensorRT execution providers, never a silent fall back to the CPU.

One ``InferenceSession`` serves every thread: ONNX Runtime documents ``run`` as safe to call concurrently.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from amoe_sdk.errors import BackendError
from amoe_sdk.runtimes.backends.base import Backend
from amoe_sdk.runtimes.backends.options import OnnxRuntimeOptions

_PROVIDERS = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider", "TENSORRT": "TensorrtExecutionProvider"}
# ONNX Runtime's names of the element types an input may have.
_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16"}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    options: OnnxRuntimeOptions

    def activate_impl(self) -> None:
        key = self.requested_device.upper()
        if key not in _PROVIDERS:
            raise BackendError(f"onnxruntime device '{self.requested_device}' is unknown; choose CPU, CUDA or TensorRT")
        provider = _PROVIDERS[key]
        if provider not in ort.get_available_providers():
            raise BackendError(
                f"onnxruntime on this machine has no {provider} (it has {', '.join(ort.get_available_providers())}); "
                "install onnxruntime-gpu for CUDA / TensorRT, or pass device='CPU'"
            )
        session_options = ort.SessionOptions()
        if self.options.threads:
            session_options.intra_op_num_threads = self.options.threads
            session_options.inter_op_num_threads = 1
        # Requested provider first, CPU only for the ops it cannot run (ONNX Runtime requires it listed).
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        # A jetson bundle's TensorRT-ready ONNX is a plain ONNX model too: ONNX Runtime runs it off the Jetson.
        path = self.bundle.artifact("onnx" if self.bundle.has_artifact("onnx") else "tensorrt_onnx")
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"onnxruntime cannot load {path}: {exc}") from exc
        graph_input = session.get_inputs()[0]
        self.check_artifact_input(tuple(graph_input.shape), _DTYPES.get(graph_input.type, graph_input.type), str(path))
        self.session = session
        self.input_name = graph_input.name
        self.output_names = [o.name for o in session.get_outputs()]
        self.device = key

    def infer_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs))

    def deactivate_impl(self) -> None:
        self.session = None
