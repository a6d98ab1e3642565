"""Calibration data, pseudo-anomalies and the TensorRT calibration cache."""

import logging

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from amoe_sdk.calibration.data import gate_set, normal_image_paths
from amoe_sdk.calibration.pseudo_anomalies import perlin_noise, region_swap, synthesise
from amoe_sdk.calibration.tensorrt_cache import read_tensorrt_cache, tensorrt_version_code, write_tensorrt_cache
from amoe_sdk.errors import DataError


def test_empty_calibration_folder_is_an_error_and_few_images_a_warning(tmp_path, sample_root, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no calibration images.*never random"):
        normal_image_paths(empty)
    with caplog.at_level(logging.WARNING, logger="amoe_sdk.calibration"):
        assert len(normal_image_paths(sample_root / "weave")) == 16  # an MVTec category means its train/good
    warned = [r for r in caplog.records if r.name == "amoe_sdk.calibration" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "only 16 calibration images" in warned[0].getMessage()


def test_the_commands_show_the_sdk_log_on_stderr_once(capsys):
    from amoe_sdk.process import run_command

    log = logging.getLogger("amoe_sdk.converters")
    for _ in range(2):  # a second command in the same process must not add a second handler
        assert run_command("amoe test", lambda: (log.info("calibrating on 8 images"), log.warning("few images"), 0)[-1]) == 0
    err = capsys.readouterr().err
    assert err.count("calibrating on 8 images") == 2 and err.count("warning: few images") == 2


def test_pseudo_anomalies_change_the_image_inside_their_masks_only():
    rng = np.random.default_rng(0)
    normals = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    images, masks = synthesise(normals, 6, seed=1)
    assert images.shape == (6, 64, 64, 3) and masks.shape == (6, 64, 64)
    for image, mask, base in zip(images, masks, np.concatenate([normals, normals])[:6]):
        assert 0 < mask.mean() < 0.3
        changed = np.abs(image.astype(int) - base.astype(int)).max(axis=2) > 0
        assert changed[mask].mean() > 0.5 and not changed[~mask].any()
    again, _ = synthesise(normals, 6, seed=1)
    assert np.array_equal(images, again)


def test_region_swap_moves_normal_pixels_without_adding_any():
    rng = np.random.default_rng(0)
    normals = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    images, masks = synthesise(normals, 3, seed=2, kinds=("region_swap",))
    for image, mask, base in zip(images, masks, normals):
        assert 0.05 < mask.mean() < 0.4
        assert np.array_equal(np.any(image != base, axis=2), mask)
        # A permutation of the same pixels: the layout is wrong, no colour is new.
        assert np.array_equal(np.sort(image.reshape(-1, 3), axis=0), np.sort(base.reshape(-1, 3), axis=0))
    # Two alike regions trade places without a change: the mask stays empty rather than claiming a defect.
    flat = np.full((64, 64, 3), 7, np.uint8)
    assert not region_swap(flat, np.random.default_rng(0))[1].any()
    with pytest.raises(ValueError, match="pseudo-anomaly kinds"):
        synthesise(normals, 2, kinds=("scratch",))


def test_perlin_noise_is_smooth_and_bounded():
    noise = perlin_noise((64, 64), 4, np.random.default_rng(0))
    assert np.abs(noise).max() <= 1.5 and noise.std() > 0.1
    assert np.abs(np.diff(noise, axis=1)).max() < 0.3  # smooth: neighbours differ little


def test_gate_set_labels_normals_and_anomalies(sample_root):
    rng = np.random.default_rng(0)
    normals = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    gate = gate_set(normals, 32)
    assert gate.labels.tolist() == [0] * 5 + [1] * 10
    assert not gate.masks[:5].any() and gate.masks[5:].any(axis=(1, 2)).all()
    assert gate.groups.tolist() == ["normal"] * 5 + ["blatant"] * 5 + ["subtle"] * 5
    assert {name: len(i) for name, i in gate.group_indices().items()} == {"blatant": 10, "subtle": 10}
    real = gate_set(normals, 32, val_data=sample_root / "washer")
    assert real.labels.sum() == 6 and "anomalous images" in real.source and set(real.group_indices()) == {"real"}


def test_subtle_pseudo_anomalies_change_their_region_by_the_normal_variation(sample_root):
    from amoe_sdk.calibration.data import load_frames
    from amoe_sdk.calibration.pseudo_anomalies import MIN_SUBTLE_AMPLITUDE, normal_variation, synthesise_subtle

    for category in ("weave", "leather", "washer"):
        normals = load_frames(sorted((sample_root / category / "train" / "good").glob("*.png")), 128)
        images, masks, amplitude = synthesise_subtle(normals, 8, seed=0)
        assert amplitude == max(normal_variation(normals), MIN_SUBTLE_AMPLITUDE)
        blatant, blatant_masks = synthesise(normals, 8, seed=0)
        for i, (image, mask) in enumerate(zip(images, masks)):
            changed = np.any(image != normals[i % len(normals)], axis=-1)
            assert mask.any() and np.array_equal(mask, changed)  # the mask is exactly what changed
            change = np.abs(image.astype(float) - normals[i % len(normals)].astype(float)).max(axis=-1)[mask].mean()
            assert 0.2 * amplitude <= change <= 2.0 * amplitude, (category, i, change, amplitude)
        subtle_change = np.mean([np.abs(a.astype(float) - normals[i % 8].astype(float))[m].mean() for i, (a, m) in enumerate(zip(images, masks))])
        blatant_change = np.mean([np.abs(a.astype(float) - normals[i % 8].astype(float))[m].mean() for i, (a, m) in enumerate(zip(blatant, blatant_masks))])
        assert subtle_change < 0.6 * blatant_change, category


def test_tensorrt_cache_has_the_header_and_one_scale_per_activation(tmp_path):
    scale = np.array(0.05, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.array(0, np.int8), "z")],
    )
    path = tmp_path / "calibration.cache"
    assert write_tensorrt_cache(helper.make_model(graph), path, "8.6.1") == 1
    header, scales = read_tensorrt_cache(path)
    assert header == "TRT-8601-EntropyCalibration2" and tensorrt_version_code("10.3.0") == 10300
    assert scales == {"x": pytest.approx(0.05)}
    assert path.read_text().splitlines()[1] == "x: 3d4ccccd"  # 0.05 as big-endian float32
