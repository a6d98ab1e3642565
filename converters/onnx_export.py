"""ONNX export with static shapes, checked, with the manifest in ``metadata_props``.

The legacy TorchScript exporter is used on purpose: the dynamo exporter's default optimiser can drop additive
constants of 1e-8 and smaller (turning x / (area + 1e-8) into NaN on an empty component slot) and cannot emit
opset 17. Our graph guards divisions with clamp_min anyway, and ``check_finite`` runs the exported graph on
frames that empty most component slots to prove it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from amoe_sdk.converters.graph import INPUT_NAME, OUTPUT_NAMES
from amoe_sdk.errors import ConversionError

OPSET = 17


def export_onnx(graph: torch.nn.Module, path: Path, input_size: int, batch_size: int) -> onnx.ModelProto:
    """Export ``graph`` (an ``EdgeGraph``) for uint8 [batch, S, S, 3] input and check the result."""
    dummy = torch.zeros(batch_size, input_size, input_size, 3, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python scalars: the shapes are static by design
        torch.onnx.export(
            graph, (dummy,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), do_constant_folding=True,
        )
    model = fold_static_shapes(path)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ConversionError(f"the exported {path} fails onnx.checker: {exc}") from exc
    onnx.save(model, str(path))
    return model


def fold_static_shapes(path: Path) -> onnx.ModelProto:
    """Fold the tracer's Shape / Gather / Concat chains into constants, so every tensor has a static shape.

    ONNX Runtime's basic optimisation level does exactly this with standard ONNX operators only (constant
    folding and redundant-node elimination, no ORT-specific fusions); TensorRT and OpenVINO then see a graph whose
    shapes are all known at build time.
    """
    import onnxruntime as ort

    folded_path = path.with_name(path.stem + ".folded.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded_path)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(folded_path))
    folded_path.unlink()
    used = {node.domain for node in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    # Write the now-known shapes onto the outputs (the tracer left them symbolic).
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for output, known in zip(model.graph.output, inferred.graph.output):
        output.type.CopyFrom(known.type)
    return model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and activations, uint8 input and FP32 outputs kept, so the runtime contract is unchanged."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def save_with_metadata(model: onnx.ModelProto, path: Path, metadata: dict[str, object]) -> None:
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))


def onnx_infer(path: Path):
    """An ``infer(batch) -> {output name: array}`` over the ONNX file on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    return lambda batch: dict(zip(names, session.run(names, {input_name: batch})))


def check_finite(path: Path, input_size: int, batch_size: int) -> None:
    """Run the ONNX file on black, white and noise frames; any NaN or inf is a conversion error.

    A uniform frame assigns every token to one component prototype, leaving the other slots empty: the case a
    dropped epsilon turns into 0 / 0.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shape = (batch_size, input_size, input_size, 3)
    frames = {
        "black": np.zeros(shape, np.uint8),
        "white": np.full(shape, 255, np.uint8),
        "noise": rng.integers(0, 256, shape, dtype=np.uint8),
    }
    for name, frame in frames.items():
        for output, value in zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: frame})):
            if not np.isfinite(value).all():
                raise ConversionError(
                    f"{path} gives non-finite {output} on a {name} frame: an epsilon was lost in export; "
                    "report this with the checkpoint"
                )
