"""Converters from a trained checkpoint to edge artifacts (ONNX, OpenVINO IR, TensorRT). Arrives with the export issue."""
