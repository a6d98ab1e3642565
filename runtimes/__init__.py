"""The torch-free edge runtime: ``EdgeDetector`` runs a bundle on OpenVINO, ONNX Runtime or TensorRT.

Imports only numpy, OpenCV and the chosen backend, so a Jetson or an industrial PC needs no torch.
"""

from amoe_sdk.runtimes.detector import DetectionResult, EdgeDetector

__all__ = ["DetectionResult", "EdgeDetector"]
