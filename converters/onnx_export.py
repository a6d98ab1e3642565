"""ONNX export with static shapes, checked, with the manifest in ``metadata_props``.

The legacy TorchScript exporter is used on purpose: the dynamo exporter's default optimiser can drop additive
constants of 1e-8 and smaller (turning x / (area + 1e-8) into NaN on an empty component slot) and cannot emit
opset 17. Our graph guards divisions with clamp_min anyway, and ``check_finite`` runs the exported graph on
frames that empty most component slots to prove it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from amoe_sdk.converters.graph import INPUT_NAME, OUTPUT_NAMES, EncoderGraph, HeadGraph
from amoe_sdk.errors import ConversionError

OPSET = 17
# Where the head graph's tensor names could clash with the encoder graph's, they get this prefix.
HEAD_PREFIX = "head."


def export_onnx(detector: torch.nn.Module, path: Path, input_size: int, batch_size: int, encoders: "EncoderExports | None" = None) -> onnx.ModelProto:
    """Export ``detector`` (an ``AnomalyMoE`` or a ``FoldedDetector``) for uint8 [batch, S, S, 3] input, in two
    parts joined into one graph at ``path``, and check the result. ``encoders``: the encoder graphs exported so
    far, whose matching one is reused (a range's products share one encoder export); by default a fresh one."""
    encoder = (encoders or EncoderExports()).get(detector, path, input_size, batch_size)
    head_path = path.with_name(path.stem + ".head.onnx")
    # The encoder graph's outputs by their static shapes: the trace records operations, not values.
    names = [o.name for o in encoder.graph.output]
    features = [torch.zeros([d.dim_value for d in o.type.tensor_type.shape.dim]) for o in encoder.graph.output]
    _trace(HeadGraph(detector, tuple(names[1:])), features, head_path, names, list(OUTPUT_NAMES))
    head = fold_static_shapes(head_path)
    head_path.unlink()
    model = join_graphs(encoder, head)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ConversionError(f"the exported {path} fails onnx.checker: {exc}") from exc
    onnx.save(model, str(path))
    return model


class EncoderExports:
    """The encoder graphs exported so far, each under what it depends on: the encoder's weights (by digest),
    whether the descriptor is asked for, the input size and the batch. ``amoe convert --all-products`` keeps one
    for the whole range, so its products share one encoder export; ``exports`` counts the exports made."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, onnx.ModelProto] = {}
        self.exports = 0

    def get(self, detector: torch.nn.Module, path: Path, input_size: int, batch_size: int) -> onnx.ModelProto:
        """The encoder graph of ``detector`` for uint8 [batch, S, S, 3] input (``EncoderGraph``), exported beside
        ``path`` where none matches yet. Never modify the graph returned: it is shared."""
        key = (weights_digest(detector.encoder), detector.needs_descriptor, input_size, batch_size)
        if key not in self._graphs:
            graph = EncoderGraph(detector.encoder, detector.needs_descriptor, input_size).eval()
            encoder_path = path.with_name(path.stem + ".encoder.onnx")
            dummy = torch.zeros(batch_size, input_size, input_size, 3, dtype=torch.uint8)
            _trace(graph, (dummy,), encoder_path, [INPUT_NAME], list(graph.output_names))
            self._graphs[key] = fold_static_shapes(encoder_path)
            encoder_path.unlink()
            self.exports += 1
        return self._graphs[key]


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, shapes and values): the same digest, the same graph."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _trace(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python scalars: the shapes are static by design
        torch.onnx.export(
            module, tuple(args), str(path), dynamo=False, opset_version=OPSET,
            input_names=input_names, output_names=output_names, do_constant_folding=True,
        )


def join_graphs(encoder: onnx.ModelProto, head: onnx.ModelProto) -> onnx.ModelProto:
    """One graph: the encoder's outputs feed the head's inputs of the same names, what the head leaves unused is
    dropped (a folded detector without component experts needs no component taps), and the head's tensor names
    get a prefix where both graphs could use the same one. Node names stay as exported: the INT8 layer groups and
    the OpenVINO ignored scopes match them."""
    head = _copy(head)
    outputs = {o.name for o in head.graph.output}
    inputs = {i.name for i in head.graph.input}
    # An initializer that is itself an output (a folded detector's constant routing weights) keeps its name.
    name_map = {i.name: HEAD_PREFIX + i.name for i in head.graph.initializer if i.name not in outputs}
    onnx.compose.add_prefix_graph(
        head.graph, HEAD_PREFIX, rename_nodes=False, rename_inputs=False, rename_outputs=False,
        rename_initializers=False, inplace=True, name_map=name_map,
    )
    joined = onnx.compose.merge_models(encoder, head, io_map=[(name, name) for name in sorted(inputs)])
    prune_to_outputs(joined.graph, list(OUTPUT_NAMES))
    names = [node.name for node in joined.graph.node]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ConversionError(f"the encoder and head graphs share node names ({', '.join(clash[:5])}); report this with the checkpoint")
    # merge_models types the joint tensors; a one-piece export types only the outputs, the rest for the backend to infer.
    del joined.graph.value_info[:]
    # merge_models lists a domain once per graph; ONNX Runtime's quantizer wants each once.
    opsets = {(o.domain or "ai.onnx"): o for o in list(encoder.opset_import) + list(head.opset_import)}
    del joined.opset_import[:]
    joined.opset_import.extend(opsets.values())
    joined.producer_name, joined.producer_version = head.producer_name, head.producer_version
    return joined


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def prune_to_outputs(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Keep only the nodes and initializers the ``outputs`` depend on, and those outputs, in place."""
    needed, kept = set(outputs), []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    by_name = {o.name: o for o in graph.output}
    initializers = [i for i in graph.initializer if i.name in needed]
    for field, values in ((graph.node, kept[::-1]), (graph.initializer, initializers), (graph.output, [by_name[n] for n in outputs])):
        del field[:]
        field.extend(values)


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
