"""One runner per inference runtime, each behind the same small interface (in the manner of Polygraphy's runners).

A backend is built from a checked ``Bundle``, takes a uint8 NHWC BGR batch of the bundle's fixed shape and
returns the graph's outputs by name. Each imports its runtime only when it is chosen.
"""

from __future__ import annotations

import importlib.util

from amoe_sdk.errors import BackendError
from amoe_sdk.runtimes.backends.base import Backend
from amoe_sdk.runtimes.bundle import Bundle

BACKENDS = ("openvino", "onnxruntime", "tensorrt")
_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}
# A Jetson bundle prefers TensorRT; an Intel bundle OpenVINO; an ONNX bundle ONNX Runtime.
_PREFERENCE = {"jetson": ("tensorrt",), "intel": ("openvino",), "onnx": ("onnxruntime", "openvino")}


def installed(backend: str) -> bool:
    return importlib.util.find_spec(_MODULES[backend]) is not None


def resolve_backend(bundle: Bundle, backend: str) -> str:
    """The backend ``auto`` means for this bundle, or ``backend`` checked against what the bundle holds."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend '{backend}'; choose one of auto, {', '.join(BACKENDS)}")
        return backend
    for candidate in _PREFERENCE[bundle.target]:
        if installed(candidate):
            return candidate
    wanted = " or ".join(_PREFERENCE[bundle.target])
    raise BackendError(
        f"bundle {bundle.root} (target {bundle.target}) needs {wanted}, and none is installed; "
        f"pip install 'amoe-sdk[{'intel' if bundle.target == 'intel' else 'onnx'}]'"
        + (" or install TensorRT from JetPack" if bundle.target == "jetson" else "")
    )


def create_backend(bundle: Bundle, backend: str, device: str | None, **options) -> Backend:
    name = resolve_backend(bundle, backend)
    if not installed(name):
        raise BackendError(f"backend '{name}' is not installed on this machine; pip install the package '{_MODULES[name]}'")
    if name == "onnxruntime":
        from amoe_sdk.runtimes.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, device or "CPU", **options)
    if name == "openvino":
        from amoe_sdk.runtimes.backends.openvino_backend import OpenVINOBackend

        return OpenVINOBackend(bundle, device or "CPU", **options)
    from amoe_sdk.runtimes.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(bundle, device or "cuda:0", **options)
