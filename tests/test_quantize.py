"""INT8: the accuracy gate, the sensitivity search and the thresholds measured on the quantized artifact."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from amoe_sdk.checkpoint import read_checkpoint
from amoe_sdk.calibration.data import load_frames
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.converters.quantize_common import GateMetrics, always_float, layer_group
from amoe_sdk.errors import ConversionError
from amoe_sdk.runtimes import EdgeDetector


def test_layer_groups_and_the_float_from_the_start_set():
    assert layer_group("/detector/encoder/stages.3/stages.3.1/conv_pw/Conv") == "encoder/stages.3"
    assert layer_group("/detector/patch_experts.1/blocks.0/attn/qkv/MatMul") == "patch_experts.1/blocks.0"
    assert always_float("/detector/router/mlp/fc1/Gemm") and always_float("/detector/patch_experts.0/head/MatMul")
    assert always_float("/detector/encoder/stem/stem.0/conv/Conv")
    assert not always_float("/detector/encoder/stages.1/stages.1.0/conv_pw/Conv")
    assert always_float("/detector/experts.2/head/MatMul")  # a folded detector's patch expert


def test_the_subtle_gate_fails_a_model_that_loses_subtle_pseudo_anomalies_while_blatant_ones_pass():
    # FP32 and INT8 both separate the blatant pseudo-anomalies perfectly; INT8 lets one of 20 subtle ones fall below
    # 6 of the 20 normals. Over the whole gate set the blatant ones dilute that drop below --max-drop; alone, it is not.
    rng = np.random.default_rng(0)
    normal, blatant = rng.uniform(0.2, 0.4, 20), rng.uniform(2.0, 3.0, 20)
    subtle = rng.uniform(0.5, 0.7, 20)
    lossy = subtle.copy()
    lossy[0] = np.sort(normal)[-6] - 1e-3
    labels = np.r_[np.zeros(20), np.ones(40)]

    def metrics(subtle_scores, with_groups=True):
        from amoe_sdk.evaluation.metrics import auroc

        scores = np.r_[normal, blatant, subtle_scores]
        groups = {"blatant": (auroc(labels[:40], scores[:40]), 1.0), "subtle": (auroc(np.r_[np.zeros(20), np.ones(20)], np.r_[normal, subtle_scores]), 1.0)}
        threshold = scores[:20].mean() + 3 * scores[:20].std(ddof=1)
        return GateMetrics(auroc(labels, scores), 1.0, scores, np.zeros((60, 2, 2)), np.zeros((60, 3)), threshold, groups if with_groups else {})

    fp32, int8 = metrics(subtle), metrics(lossy)
    assert int8.groups["blatant"][0] == fp32.groups["blatant"][0] == 1.0
    assert fp32.image_auroc - int8.image_auroc < 0.01 < fp32.groups["subtle"][0] - int8.groups["subtle"][0]
    assert not int8.passes(fp32, 0.01)
    assert metrics(lossy, False).passes(metrics(subtle, False), 0.01)  # one gate over everything: it would pass


def test_squeezed_scores_keep_their_auroc_but_fail_the_gate_on_verdict_flips():
    # The failure NNCF's defaults produced on kit: INT8 anomalies pinned just above the normal maximum. Ranks
    # (AUROC) survive; at the INT8 model's own threshold every anomaly is missed.
    normal = np.linspace(0.30, 0.40, 10)

    def metrics(scores):
        threshold = scores[:10].mean() + 3 * scores[:10].std(ddof=1)
        return GateMetrics(1.0, 0.98, scores, np.zeros((20, 2, 2)), np.zeros((20, 3)), threshold)

    fp32 = metrics(np.concatenate([normal, np.linspace(1.5, 3.0, 10)]))
    squeezed = metrics(np.concatenate([normal, np.linspace(0.405, 0.41, 10)]))
    assert fp32.verdicts[10:].all() and not squeezed.verdicts[10:].any()
    assert squeezed.drop_from(fp32) == 0 and squeezed.flips_from(fp32) == 10
    assert fp32.passes(fp32, 0.01) and not squeezed.passes(fp32, 0.01)


def test_a_raised_noise_floor_fails_the_gate_although_blatant_anomalies_stay_separated():
    # Washer's failure: INT8 noise lifts the normal scores (and so the threshold) far above FP32's; the gate's
    # blatant pseudo-anomalies still clear it, the subtle real defects would not.
    def metrics(normal, anomalous):
        scores = np.concatenate([normal, anomalous])
        threshold = normal.mean() + 3 * normal.std(ddof=1)
        return GateMetrics(1.0, 0.98, scores, np.zeros((20, 2, 2)), np.zeros((20, 3)), threshold)

    fp32 = metrics(np.linspace(0.30, 0.40, 10), np.linspace(3.0, 6.0, 10))
    noisy = metrics(np.linspace(0.40, 1.40, 10), np.linspace(3.0, 6.0, 10))
    assert noisy.drop_from(fp32) == 0 and noisy.flips_from(fp32) == 0
    assert noisy.threshold_rise(fp32) > 4
    assert not noisy.passes(fp32, 0.01) and noisy.passes(fp32, 0.01, max_threshold_rise=10)


@pytest.fixture(scope="module")
def onnx_int8_bundle(tiny_run, tmp_path_factory):
    return convert(tiny_run, tmp_path_factory.mktemp("int8") / "onnx-int8", ConvertOptions(target="onnx", precision="int8", max_drop=0.05, force=True))


def test_int8_onnx_bundle_reports_the_gate_and_remeasures_the_threshold(onnx_int8_bundle, tiny_run):
    manifest = json.loads((onnx_int8_bundle / "manifest.json").read_text())
    q = manifest["quantization"]
    assert {"fp32", "int8", "drop", "passed", "float_layers", "threshold_fp32", "threshold_shift", "tries", "gate_label_flips"} <= set(q)
    assert q["tries"][0]["label"] == "all quantizable layers in INT8"
    assert any("/router/" in name for name in q["float_layers"])  # float from the start
    assert manifest["threshold"]["image"] == pytest.approx(q["threshold_fp32"] + q["threshold_shift"])
    # The threshold is the INT8 artifact's own: mean + 3 std of its scores on the run's held-out normal images.
    detector = EdgeDetector(onnx_int8_bundle)
    frames = load_frames([Path(p) for p in read_checkpoint(tiny_run)["val_images"]], detector.bundle.input_size)
    scores = np.array([detector.backend.infer(f[None])["score"][0] for f in frames], np.float64)
    assert manifest["threshold"]["image"] == pytest.approx(scores.mean() + 3 * scores.std(ddof=1), rel=1e-5)
    model = onnx.load(str(onnx_int8_bundle / "model.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 10
    result = EdgeDetector(onnx_int8_bundle).predict(np.zeros((90, 120, 3), np.uint8))
    assert np.isfinite(result.score) and result.anomaly_map.shape == (90, 120)


def test_a_gate_that_cannot_hold_refuses_without_force(tiny_run, tmp_path):
    # A negative allowed drop can never be met: the search ends with nothing left and the conversion refuses.
    with pytest.raises(ConversionError, match="misses the accuracy gate"):
        convert(tiny_run, tmp_path / "never", ConvertOptions(target="onnx", precision="int8", max_drop=-1.0))
    assert not (tmp_path / "never").exists()


def test_int8_jetson_bundle_is_symmetric_qdq_with_a_tensorrt_cache(tiny_run, tmp_path):
    from amoe_sdk.calibration.tensorrt_cache import read_tensorrt_cache
    from amoe_sdk.converters.tensorrt_checks import tensorrt_problems

    bundle = convert(tiny_run, tmp_path / "trt-int8", ConvertOptions(target="jetson", precision="int8", max_drop=0.05, force=True))
    model = onnx.load(str(bundle / "model.onnx"))
    assert tensorrt_problems(model) == []
    zero_points = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert zero_points and all(not initializers[z].any() and initializers[z].dtype == np.int8 for z in zero_points)
    header, scales = read_tensorrt_cache(bundle / "calibration.cache")
    assert header == "TRT-8601-EntropyCalibration2" and len(scales) > 10
    # Every cached scale is the QDQ model's own activation scale for that tensor, read back bit for bit.
    qdq_scales = {n.input[0]: float(initializers[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in scales}
    assert qdq_scales.keys() == scales.keys()
    assert all(scales[name] == np.float32(qdq_scales[name]) for name in scales)


def test_int8_openvino_bundle(tiny_run, tmp_path):
    # Plain NNCF post-training quantization: accuracy control searches for minutes even on the tiny model.
    options = ConvertOptions(target="intel", precision="int8", max_drop=0.05, force=True, accuracy_control=False)
    bundle = convert(tiny_run, tmp_path / "ov-int8", options)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "nncf"
    assert (bundle / "model.bin").stat().st_size > 0
    assert np.isfinite(EdgeDetector(bundle).predict(np.zeros((64, 64, 3), np.uint8)).score)


def test_a_gate_that_holds_at_once_keeps_everything_quantizable_in_int8(tiny_run, tmp_path, monkeypatch):
    import amoe_sdk.converters.quantize_common as quantize_common

    # Loose on every count: the tiny model's verdicts on 12 gate images flip with INT8 stage-1 features.
    monkeypatch.setattr(quantize_common, "MAX_FLIPPED_SHARE", 1.0)
    bundle = convert(tiny_run, tmp_path / "loose", ConvertOptions(target="onnx", precision="int8", max_drop=1.0))
    q = json.loads((bundle / "manifest.json").read_text())["quantization"]
    assert q["passed"] and len(q["tries"]) == 1 and q["float_groups"] == []


def test_mixed_precision_fallback_changes_which_nodes_are_quantized(tiny_run, tmp_path):
    from amoe_sdk.converters.onnx_export import export_onnx
    from amoe_sdk.checkpoint import load_detector
    from amoe_sdk.converters.quantize_common import quantizable_groups
    from amoe_sdk.converters.quantize_onnx import quantize_qdq

    model, payload = load_detector(tiny_run)
    fp32_path = tmp_path / "fp32.onnx"
    export_onnx(model, fp32_path, model.config.input_size, 1)
    frames = load_frames([Path(p) for p in payload["train_images"]][:8], model.config.input_size)
    groups = quantizable_groups(onnx.load(str(fp32_path)))
    stage = groups["encoder/stages.1"]

    def quantized_nodes(exclude):
        out = tmp_path / f"q{len(exclude)}.onnx"
        quantize_qdq(fp32_path, out, frames, 1, "minmax", exclude, for_tensorrt=False)
        graph = onnx.load(str(out)).graph
        dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        # A quantized layer takes its weights (input 1) from a DequantizeLinear; its activation may reach it through
        # a Pad or Reshape that the QDQ pair was moved in front of.
        return {n.name for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in dequantized}

    everything, without_stage = quantized_nodes([]), quantized_nodes(stage)
    assert set(stage) <= everything and not set(stage) & without_stage
    assert everything - set(stage) == without_stage


def test_nncf_leaves_the_anomaly_signal_path_in_float(tiny_run, tmp_path):
    import openvino as ov

    from amoe_sdk.converters.quantize_openvino import check_signal_path_float

    options = ConvertOptions(target="intel", precision="int8", max_drop=0.05, force=True, accuracy_control=False)
    bundle = convert(tiny_run, tmp_path / "ov-int8", options)
    check_signal_path_float(ov.Core().read_model(str(bundle / "model.xml")))
    fp32 = convert(tiny_run, tmp_path / "ov-fp32", ConvertOptions(target="intel"))
    # A frame far outside anything the calibration saw: with the signal path quantized, its score was clipped
    # to the normal maximum, at the threshold; in float it stays far above it, as in the FP32 model.
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    int8_result, fp32_result = EdgeDetector(bundle).predict(noise), EdgeDetector(fp32).predict(noise)
    assert fp32_result.score > 2 * fp32_result.threshold
    assert int8_result.score > 2 * int8_result.threshold


def test_a_fake_quantize_on_the_signal_path_is_refused():
    import openvino as ov
    import openvino.opset13 as opset

    from amoe_sdk.converters.quantize_openvino import check_signal_path_float

    x = opset.parameter([1, 4], ov.Type.f32, name="x")
    low, high = opset.constant(np.float32(0)), opset.constant(np.float32(1))
    clipped = opset.fake_quantize(x, low, high, low, high, 256)
    fused = opset.multiply(clipped, opset.constant(np.float32(2)))
    fused.set_friendly_name("/detector/Mul_3")
    with pytest.raises(ConversionError, match="anomaly signal"):
        check_signal_path_float(ov.Model([fused], [x]))


def test_the_openvino_float_groups_are_what_the_ir_holds_not_what_was_asked(intel_bundle, monkeypatch):
    import nncf
    import openvino as ov

    import amoe_sdk.converters.quantize_openvino as quantize_openvino

    class Verdicts:  # the gate's verdict on each try in turn, without measuring
        def __init__(self, passes):
            self.answers = iter(passes)

        def __call__(self, *args):
            outcome = next(self.answers)
            return type("Gate", (), {"passes": lambda self, *a: outcome, "threshold_rise": lambda self, r: 1.0})()

    model = ov.Core().read_model(str(intel_bundle / "model.xml"))
    frames = np.random.default_rng(0).integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    group = "encoder/stages.3"
    # FP32, the first try (misses), then the try with the stage in float (holds): the stage is reported float.
    monkeypatch.setattr(quantize_openvino, "gate_metrics", Verdicts([True, False, True]))
    *_, groups = quantize_openvino.quantize_openvino(model, frames, None, 1, accuracy_control=False, ranking=[group])
    assert group in groups
    # Both tries miss: NNCF's accuracy control starts from the first float groups (none) and here quantizes
    # every layer again; the report said the stage stayed in float.
    def accuracy_control(model_, calibration, validation, validate, *, ignored_scope, subset_size, **_):
        return nncf.quantize(model_, calibration, subset_size=subset_size, ignored_scope=ignored_scope)

    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", accuracy_control)
    monkeypatch.setattr(quantize_openvino, "gate_metrics", Verdicts([True, False, False, False]))
    gate = type("Gate", (), {"frames": frames})  # what the accuracy control's validation would run on
    *_, groups = quantize_openvino.quantize_openvino(model, frames, gate, 1, accuracy_control=True, ranking=[group])
    assert group not in groups
