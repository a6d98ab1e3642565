"""Conversion: parity with PyTorch, folding, the TensorRT host checks, and the artifacts' contracts."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from amoe_sdk.checkpoint import load_detector
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.converters.folding import fold_routing
from amoe_sdk.converters.tensorrt_checks import tensorrt_problems
from amoe_sdk.converters.verify import verify
from amoe_sdk.errors import ConversionError
from amoe_sdk.training.data import load_images


def test_onnx_bundle_matches_pytorch(onnx_bundle, sample_root):
    report = verify(onnx_bundle, sample_root / "washer", show_progress=False)
    assert report["passed"] and report["label_flips"] == 0
    assert report["map_rel_diff_max"] < 1e-4 and report["map_correlation_min"] > 0.9999
    assert json.loads((onnx_bundle / "parity_report.json").read_text())["passed"]


def test_openvino_bundle_matches_pytorch(intel_bundle, sample_root):
    bundle = intel_bundle
    assert (bundle / "model.xml").is_file() and not (bundle / "model.onnx").exists()
    report = verify(bundle, sample_root / "washer", show_progress=False)
    assert report["passed"] and report["map_rel_diff_max"] < 1e-4


def test_every_artifact_carries_the_manifest_of_manifest_json(intel_bundle, onnx_bundle):
    import openvino as ov

    from amoe_sdk.converters.openvino_export import read_manifest

    for bundle in (intel_bundle, onnx_bundle):
        manifest = json.loads((bundle / "manifest.json").read_text())
        if (bundle / "model.xml").exists():
            model = ov.Core().read_model(str(bundle / "model.xml"))
            carried = read_manifest(model)
            # No Model API claim: its anomaly wrapper takes one or four outputs and float input, this IR neither.
            assert not model.has_rt_info(["model_info", "model_type"])
        else:
            carried = {p.key: json.loads(p.value) for p in onnx.load(str(bundle / "model.onnx")).metadata_props}["amoe_manifest"]
        # The same manifest, threshold and artifacts included; only the hashes of the artifacts themselves are not in them.
        assert carried == {k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256")}, bundle
        assert carried["threshold"]["image"] == pytest.approx(manifest["threshold"]["image"])


def test_onnx_is_static_checked_and_carries_the_manifest(onnx_bundle):
    model = onnx.load(str(onnx_bundle / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    for value in list(model.graph.input) + list(model.graph.output):
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    metadata = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert metadata["amoe_manifest"]["input"]["size"] == 128


def test_exported_graph_stays_finite_when_component_slots_are_empty(onnx_bundle, tiny_run):
    import onnxruntime as ort

    model, _ = load_detector(tiny_run)
    black = np.zeros((1, 128, 128, 3), np.uint8)
    with torch.no_grad():
        features = model.encode(torch.zeros(1, 3, 128, 128))
        assert (model.assigner(model.standardise(features.taps), features.components).areas == 0).any()  # the case an exporter's dropped epsilon turns into NaN
    session = ort.InferenceSession(str(onnx_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    for value in session.run(None, {"images": black}):
        assert np.isfinite(value).all()


def _calibration(tiny_run):
    model, payload = load_detector(tiny_run)
    images = load_images([Path(p) for p in payload["val_images"]], 128)
    return model, images


def _fix_router(model, bias):
    """Make the router ignore the image: zero weights, the given logits as bias; and every level count equally (the
    run's measured shares may give a level none, and folding then drops its experts)."""
    last = model.router.mlp.fc2
    model.level_weights.fill_(1.0 / 3)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(bias))


def test_folding_refuses_disagreeing_routers_and_shows_the_histogram(tiny_run, sample_root):
    model, _ = _calibration(tiny_run)
    # Three different products and a router with large random weights: the images pick different expert sets.
    paths = [p for category in ("weave", "washer", "kit") for p in sorted((sample_root / category / "train" / "good").glob("*.png"))[:4]]
    images = load_images(paths, 128)
    torch.manual_seed(0)
    with torch.no_grad():
        model.router.mlp.fc2.weight.normal_(0.0, 100.0)
    with pytest.raises(ConversionError) as info:
        fold_routing(model, images, min_agreement=1.0)
    assert "--force" in str(info.value) and "%" in str(info.value)
    folded, report = fold_routing(model, images, min_agreement=1.0, force=True)
    assert report.forced and report.notes


def test_folded_equals_dense_where_the_router_agrees_and_saves_compute(tiny_run):
    model, images = _calibration(tiny_run)
    _fix_router(model, [5.0, 0.0, 5.0, 0.0, 5.0, 0.0])  # always patch0 + component0 + global0
    folded, report = fold_routing(model, images, min_agreement=0.95)
    assert report.agreement == 1.0 and report.kept == ["patch0", "component0", "global0"]
    assert report.params_after < report.params_before and report.gflops_after < report.gflops_before
    with torch.no_grad():
        dense, small = model(images.float()), folded(images.float())
    assert torch.allclose(dense.anomaly_map, small.anomaly_map, atol=1e-5)
    assert torch.allclose(dense.score, small.score, atol=1e-5)


class _OnePiece(torch.nn.Module):
    """The detector exported as one graph, as the converters did before the encoder had a graph of its own."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images):
        out = self.detector(images.permute(0, 3, 1, 2).to(torch.float32))
        return out.anomaly_map, out.score, out.routing_weights


@pytest.mark.parametrize("routing", ["dense", "folded"])
def test_the_encoder_and_head_export_joined_equals_a_one_piece_export_bit_for_bit(tiny_run, tmp_path, routing):
    from amoe_sdk.converters.graph import INPUT_NAME, OUTPUT_NAMES
    from amoe_sdk.converters.onnx_export import OPSET, export_onnx, fold_static_shapes, onnx_infer

    model, images = _calibration(tiny_run)
    detector = model
    if routing == "folded":
        # Without the component level: the joined graph must drop the component taps the head does not read.
        _fix_router(model, [5.0, 0.0, -5.0, -5.0, 5.0, 0.0])
        for shares in (model.level_weights, model.map_level_weights):
            shares.copy_(torch.tensor([0.5, 0.0, 0.5]))
        detector, report = fold_routing(model, images)
        assert not any(name.startswith("component") for name in report.kept) and model.encoder.component_taps
    joined = export_onnx(detector, tmp_path / "joined.onnx", 128, 2)
    with torch.no_grad():
        torch.onnx.export(_OnePiece(detector).eval(), (torch.zeros(2, 128, 128, 3, dtype=torch.uint8),), str(tmp_path / "one.onnx"),
                          dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), do_constant_folding=True)
    one = fold_static_shapes(tmp_path / "one.onnx")
    onnx.save(one, str(tmp_path / "one.onnx"))
    # The same operations under the same module paths (the INT8 layer groups match on them), and no tensor left over.
    assert sorted(n.op_type for n in joined.graph.node) == sorted(n.op_type for n in one.graph.node)
    paths = lambda m: sorted(n.name.rpartition("/")[0] for n in m.graph.node)  # noqa: E731
    assert paths(joined) == paths(one)
    assert [o.name for o in joined.graph.output] == list(OUTPUT_NAMES)
    assert [(o.domain, o.version) for o in joined.opset_import] == [(o.domain, o.version) for o in one.opset_import]
    frames = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    frames[1] = images[0].permute(1, 2, 0).numpy()
    got, want = onnx_infer(tmp_path / "joined.onnx")(frames), onnx_infer(tmp_path / "one.onnx")(frames)
    for name in OUTPUT_NAMES:
        assert np.array_equal(got[name], want[name]), name


def test_an_encoder_export_is_reused_only_where_weights_input_and_batch_match(tiny_run, tmp_path):
    from amoe_sdk.converters.onnx_export import EncoderExports

    model, images = _calibration(tiny_run)
    encoders = EncoderExports()
    first = encoders.get(model, tmp_path / "a.onnx", 128, 1)
    assert encoders.get(model, tmp_path / "b.onnx", 128, 1) is first and encoders.exports == 1
    _fix_router(model, [5.0, 0.0, 5.0, 0.0, 5.0, 0.0])
    folded, _ = fold_routing(model, images)
    encoders.get(folded, tmp_path / "c.onnx", 128, 1)  # no router: the encoder stops after its last tap
    encoders.get(model, tmp_path / "d.onnx", 128, 2)
    with torch.no_grad():
        next(model.encoder.parameters()).add_(1.0)
    encoders.get(model, tmp_path / "e.onnx", 128, 1)
    assert encoders.exports == 4
    assert list(tmp_path.iterdir()) == []  # the exports' files are removed once read


def test_folded_bundle_passes_verify(tiny_run, sample_root, tmp_path):
    bundle = convert(tiny_run, tmp_path / "folded", ConvertOptions(target="onnx", routing="folded", force=True))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["routing"]["mode"] == "folded" and manifest["routing"]["folding"]["histogram"]
    assert verify(bundle, sample_root / "washer", show_progress=False)["passed"]


def test_jetson_bundle_passes_the_tensorrt_host_checks(tiny_run, tmp_path):
    bundle = convert(tiny_run, tmp_path / "trt", ConvertOptions(target="jetson"))
    model = onnx.load(str(bundle / "model.onnx"))
    assert tensorrt_problems(model) == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["artifacts"]["tensorrt_onnx"] == "model.onnx"


def test_tensorrt_checks_name_unsupported_ops_and_dynamic_shapes():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("StringNormalizer", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"], domain="com.acme")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])],
    )
    problems = tensorrt_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    text = "\n".join(problems)
    assert "StringNormalizer" in text and "com.acme" in text and "dynamic shape" in text


def _cuda_device_count() -> int:
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        return count if int(err) == 0 else 0
    except Exception:
        return 0


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or _cuda_device_count() == 0,
    reason="TensorRT engines need the tensorrt package and an NVIDIA GPU; this host has no CUDA device or no TensorRT",
)
def test_tensorrt_engine_builds_and_matches_pytorch(tiny_run, sample_root, tmp_path):
    bundle = convert(tiny_run, tmp_path / "trt", ConvertOptions(target="jetson"))
    report = verify(bundle, sample_root / "washer", backend="tensorrt", show_progress=False)
    assert report["passed"]


@pytest.mark.parametrize("target", ["onnx", "intel"])
def test_whitened_patch_maps_export_with_parity(measured_run, sample_root, tmp_path, target):
    payload = torch.load(measured_run / "model.pt", weights_only=True)
    gains = [k for k in payload["state_dict"] if k.endswith((".residual_gain", ".residual_subspace_gain"))]
    assert len(gains) == 2 * len([k for k in gains if k.endswith(".residual_gain")])  # the default config whitens
    for key in gains:
        # Both forms on, whatever was chosen; never lowered, which would push normal maps below their calibration.
        payload["state_dict"][key] = payload["state_dict"][key].clamp_min(1.0)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(payload, run / "model.pt")
    report = verify(convert(run, tmp_path / "bundle", ConvertOptions(target=target)), sample_root / "washer", show_progress=False)
    assert report["passed"] and report["label_flips"] == 0 and report["map_rel_diff_max"] < 1e-4


def test_an_export_leaves_out_the_whitened_form_that_was_not_chosen(measured_run, sample_root, tmp_path):
    """Only the chosen form is in the graph: the same maps, and the other form's statistics are not in the file."""
    payload = torch.load(measured_run / "model.pt", weights_only=True)
    sizes = {}
    for form in ("diagonal", "subspace"):
        state = dict(payload["state_dict"])
        for key in [k for k in state if k.endswith((".residual_gain", ".residual_subspace_gain"))]:
            chosen = key.endswith(".residual_gain") == (form == "diagonal")
            state[key] = torch.ones_like(state[key]) if chosen else torch.zeros_like(state[key])
        # A form switched off can lower a map below its calibration: lift every map well above its normal range.
        state["map_low"] = state["map_low"] - 10 * (state["map_high"] - state["map_low"])
        run = tmp_path / form
        run.mkdir()
        torch.save({**payload, "state_dict": state}, run / "model.pt")
        bundle = convert(run, tmp_path / f"{form}-bundle", ConvertOptions(target="onnx"))
        report = verify(bundle, sample_root / "washer", show_progress=False)
        assert report["passed"] and report["label_flips"] == 0 and report["map_rel_diff_max"] < 1e-4
        graph = onnx.load(str(next(bundle.glob("*.onnx"))))
        initializer_sizes = [int(np.prod(t.dims)) for t in graph.graph.initializer]
        basis_size = int(np.prod(state["patch_experts.0.residual_basis"].shape))
        assert (basis_size in initializer_sizes) == (form == "subspace"), form
        sizes[form] = sum(initializer_sizes)
    assert sizes["diagonal"] < sizes["subspace"]


@pytest.mark.parametrize("target", ["onnx", "intel"])
@pytest.mark.parametrize("term", ["memory", "colour"])
def test_the_patch_memory_and_the_colour_term_export_with_parity_and_are_left_out_where_unused(
    measured_run, sample_root, tmp_path, target, term
):
    payload = torch.load(measured_run / "model.pt", weights_only=True)
    fitted = payload["state_dict"]["patch_memory.bank" if term == "memory" else "colour.whitener"]
    assert not torch.equal(fitted, torch.zeros_like(fitted) if term == "memory" else torch.eye(3))  # fitted after training
    for gain, name in ((1.0, "on"), (0.0, "off")):
        state = dict(payload["state_dict"])
        for key in [k for k in state if k.endswith((".memory_gain", ".colour_gain"))]:
            state[key] = torch.full_like(state[key], gain if key.endswith(f".{term}_gain") else 0.0)
        # Lift every map above its normal range, so that the term cannot push one below its calibration.
        state["map_low"] = state["map_low"] - 10 * (state["map_high"] - state["map_low"])
        run = tmp_path / name
        run.mkdir()
        torch.save({**payload, "state_dict": state}, run / "model.pt")
        bundle = convert(run, tmp_path / f"{name}-bundle", ConvertOptions(target=target))
        report = verify(bundle, sample_root / "washer", show_progress=False)
        assert report["passed"] and report["label_flips"] == 0 and report["map_rel_diff_max"] < 1e-4, name
        if target == "onnx":
            graph = onnx.load(str(next(bundle.glob("*.onnx"))))
            if term == "memory":
                sizes = [int(np.prod(t.dims)) for t in graph.graph.initializer]
                assert (fitted.numel() in sizes) == (gain > 0), name
            else:
                assert any(node.op_type == "Log" for node in graph.graph.node) == (gain > 0), name
