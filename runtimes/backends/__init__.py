"""One runner per inference runtime, each behind the same small interface (in the manner of Polygraphy's runners).

A backend is made from a checked ``Bundle``, a device name and its options dataclass (``options.py``), loads the
artifact when activated, takes a uint8 NHWC BGR batch of the bundle's fixed shape and returns the graph's outputs
by name. Each imports its runtime only when it is chosen.
"""

from __future__ import annotations

import importlib.util

from amoe_sdk.errors import BackendError
from amoe_sdk.runtimes.backends.base import Backend
from amoe_sdk.runtimes.backends.options import make_options
from amoe_sdk.runtimes.bundle import Bundle

BACKENDS = ("openvino", "onnxruntime", "tensorrt")
_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}
# A Jetson bundle prefers TensorRT; an Intel bundle OpenVINO; an ONNX bundle ONNX Runtime.
_PREFERENCE = {"jetson": ("tensorrt",), "intel": ("openvino",), "onnx": ("onnxruntime", "openvino")}
# The backend whose device names a bundle's recorded ``device`` is written in (``amoe convert --device``).
_DEVICE_BACKEND = {"jetson": "tensorrt", "intel": "openvino", "onnx": "onnxruntime"}
_DEFAULT_DEVICE = {"onnxruntime": "CPU", "openvino": "CPU", "tensorrt": "cuda:0"}


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
    if bundle.target == "jetson":
        raise BackendError(
            f"bundle {bundle.root} is for TensorRT, which is not installed here: run it on the Jetson or NVIDIA GPU "
            "host with TensorRT from JetPack (and pip install cuda-python), or run its TensorRT-ready ONNX with ONNX "
            "Runtime: EdgeDetector(bundle, backend='onnxruntime') or --backend onnxruntime (pip install 'amoe-sdk[onnx]')"
        )
    wanted = " or ".join(_PREFERENCE[bundle.target])
    raise BackendError(
        f"bundle {bundle.root} (target {bundle.target}) needs {wanted}, and none is installed; "
        f"pip install 'amoe-sdk[{'intel' if bundle.target == 'intel' else 'onnx'}]'"
    )


def _backend_class(name: str) -> type[Backend]:
    if name == "onnxruntime":
        from amoe_sdk.runtimes.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "openvino":
        from amoe_sdk.runtimes.backends.openvino_backend import OpenVINOBackend

        return OpenVINOBackend
    from amoe_sdk.runtimes.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend


def create_backend(bundle: Bundle, backend: str, device: str | None, **options) -> Backend:
    """The backend for ``bundle``, activated. ``device`` None means the device the bundle was converted for (``amoe
    convert --device``), else the backend's default; a recorded device that is absent is an error saying how to
    override. ``options`` are the chosen backend's (``amoe_sdk.runtimes.backends.options``)."""
    name = resolve_backend(bundle, backend)
    if not installed(name):
        hint = ("TensorRT comes with JetPack on a Jetson, or from NVIDIA's index on a GPU host" if name == "tensorrt"
                else f"pip install '{_MODULES[name]}'")
        raise BackendError(f"backend '{name}' is not installed on this machine; {hint}")
    chosen = make_options(name, **options)
    cls = _backend_class(name)
    recorded = bundle.manifest.device
    if device is None and recorded is not None:
        if name != _DEVICE_BACKEND[bundle.target]:
            raise BackendError(
                f"bundle {bundle.root} was converted for {_DEVICE_BACKEND[bundle.target]} device '{recorded}', which "
                f"does not name a {name} device; pass device= (or --device) for {name}"
            )
        try:
            return cls(bundle, recorded, chosen).activate()
        except BackendError as exc:
            raise BackendError(
                f"{exc} (the device '{recorded}' is the one bundle {bundle.root} was converted for, amoe convert "
                f"--device {recorded}; to run elsewhere pass device= to EdgeDetector, or --device on the command line)"
            ) from exc
    return cls(bundle, device or _DEFAULT_DEVICE[name], chosen).activate()
