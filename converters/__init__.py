"""Converters from a trained checkpoint to edge bundles: ONNX, OpenVINO IR and TensorRT.

``convert`` (``amoe convert`` / ``amoe-convert``) writes a bundle; ``verify`` (``amoe verify``) checks it against
the PyTorch model; ``folding`` turns the data-dependent routing into static expert branches.
"""
