"""INT8: the accuracy gate, the sensitivity search and the thresholds measured on the quantized artifact."""

import json

import numpy as np
import onnx
import pytest

from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.converters.quantize_common import always_float, layer_group
from amoe_sdk.errors import ConversionError
from amoe_sdk.runtimes import EdgeDetector


def test_layer_groups_and_the_float_from_the_start_set():
    assert layer_group("/detector/encoder/stages.3/stages.3.1/conv_pw/Conv") == "encoder/stages.3"
    assert layer_group("/detector/patch_experts.1/blocks.0/attn/qkv/MatMul") == "patch_experts.1/blocks.0"
    assert always_float("/detector/router/mlp/fc1/Gemm") and always_float("/detector/patch_experts.0/head/MatMul")
    assert not always_float("/detector/encoder/stem/stem.0/conv/Conv")


@pytest.fixture(scope="module")
def onnx_int8_bundle(tiny_run, tmp_path_factory):
    return convert(tiny_run, tmp_path_factory.mktemp("int8") / "onnx-int8", ConvertOptions(target="onnx", precision="int8", max_drop=0.05, force=True))


def test_int8_onnx_bundle_reports_the_gate_and_remeasures_the_threshold(onnx_int8_bundle):
    manifest = json.loads((onnx_int8_bundle / "manifest.json").read_text())
    q = manifest["quantization"]
    assert {"fp32", "int8", "drop", "passed", "float_layers", "threshold_fp32", "threshold_shift", "tries", "gate_label_flips"} <= set(q)
    assert q["tries"][0]["label"] == "all quantizable layers in INT8"
    assert any("/router/" in name for name in q["float_layers"])  # float from the start
    assert manifest["threshold"]["image"] == pytest.approx(q["threshold_fp32"] + q["threshold_shift"])
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
    assert header == "TRT-8601-EntropyCalibration2" and len(scales) > 10 and all(s > 0 for s in scales.values())


def test_int8_openvino_bundle(tiny_run, tmp_path):
    # Plain NNCF post-training quantization: accuracy control searches for minutes even on the tiny model.
    options = ConvertOptions(target="intel", precision="int8", max_drop=0.05, force=True, accuracy_control=False)
    bundle = convert(tiny_run, tmp_path / "ov-int8", options)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "nncf"
    assert (bundle / "model.bin").stat().st_size > 0
    assert np.isfinite(EdgeDetector(bundle).predict(np.zeros((64, 64, 3), np.uint8)).score)
