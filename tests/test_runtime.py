"""The torch-free runtime: EdgeDetector, its input errors, thresholds, and the bundle checks."""

import json
import shutil
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from amoe_sdk import EdgeDetector
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.data.images import read_image
from amoe_sdk.errors import BackendError, BundleError, DataError, InputError
from amoe_sdk.runtimes.bundle import read_bundle


@pytest.fixture
def bundle_copy(onnx_bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, target)
    return target


def _first_test_image(sample_root, defect="crack"):
    return read_image(sorted((sample_root / "washer" / "test" / defect).glob("*.png"))[0])


def test_predict_gives_a_map_at_the_frame_size_and_a_verdict(onnx_bundle, sample_root):
    detector = EdgeDetector(onnx_bundle, threads=2)
    frame = cv2.resize(_first_test_image(sample_root), (200, 150))  # non-square, not the model size
    result = detector.predict(frame)
    assert result.anomaly_map.shape == (150, 200) and result.mask.shape == (150, 200)
    assert result.is_anomaly == (result.score > detector.threshold)
    assert 0.0 <= result.normalized_score <= 1.0
    assert result.overlay().shape == (150, 200, 3)
    assert set(result.timings_ms) == {"pre", "infer", "post"}


def test_runtime_scores_match_the_pytorch_model(onnx_bundle, tiny_run, sample_root):
    import torch

    from amoe_sdk.checkpoint import load_detector
    from amoe_sdk.runtimes.preprocess import resize_to_input

    model, _ = load_detector(tiny_run)
    frame = _first_test_image(sample_root)
    with torch.no_grad():
        reference = model(torch.from_numpy(resize_to_input(frame, 128)).permute(2, 0, 1)[None].float()).score.item()
    assert EdgeDetector(onnx_bundle).predict(frame).score == pytest.approx(reference, rel=1e-4)


def test_predict_batch_runs_any_number_of_frames(onnx_bundle, sample_root):
    detector = EdgeDetector(onnx_bundle)
    frame = _first_test_image(sample_root)
    single = detector.predict(frame).score
    batch = detector.predict_batch([frame, frame, frame])
    assert len(batch) == 3 and all(r.score == pytest.approx(single, rel=1e-5) for r in batch)


@pytest.mark.parametrize(
    "frame, words",
    [
        (np.zeros((64, 64, 3), np.float32), "dtype float32"),
        (np.zeros((64, 64), np.uint8), "1 channel"),
        (np.zeros((64, 64, 4), np.uint8), "4 channel"),
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (None, "not a numpy array"),
    ],
)
def test_bad_frames_are_clear_errors(onnx_bundle, frame, words):
    with pytest.raises(InputError, match=words):
        EdgeDetector(onnx_bundle).predict(frame)


def test_threshold_and_sensitivity(onnx_bundle):
    calibrated = read_bundle(onnx_bundle).manifest.threshold.image
    assert EdgeDetector(onnx_bundle).threshold == pytest.approx(calibrated)
    assert EdgeDetector(onnx_bundle, sensitivity=1.0).threshold == pytest.approx(calibrated / 2)
    assert EdgeDetector(onnx_bundle, threshold=0.25).threshold == 0.25


def test_a_missing_device_is_an_error_not_a_cpu_fallback(onnx_bundle):
    with pytest.raises(BackendError, match="CUDA"):
        EdgeDetector(onnx_bundle, device="CUDA")


def test_truncated_artifact_is_named(bundle_copy):
    onnx_file = bundle_copy / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(BundleError, match="model.onnx.*truncated"):
        EdgeDetector(bundle_copy)


def test_missing_artifact_and_manifest_are_named(bundle_copy):
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing model.onnx"):
        read_bundle(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        read_bundle(bundle_copy)


def test_bundle_from_a_newer_schema_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema 99.*upgrade"):
        read_bundle(bundle_copy)


def test_an_older_schema_is_upgraded_by_pure_steps_after_its_own_digest_is_checked(bundle_copy, monkeypatch):
    from amoe_sdk.runtimes import manifest as manifest_module
    from amoe_sdk.runtimes.manifest import manifest_digest, upgrade_to_latest

    written = json.loads((bundle_copy / "manifest.json").read_text())
    # Pretend the current schema is 4, reached from 2 in two steps (a key renamed and back): a schema-2 manifest
    # must come through both.
    def rename_device(data):
        data = {**data, "target_device": data["device"]}
        del data["device"]
        return data

    def back_to_device(data):
        data = {**data, "device": data["target_device"]}
        del data["target_device"]
        return data

    monkeypatch.setattr(manifest_module, "SCHEMA_VERSION", 4)
    monkeypatch.setattr(manifest_module, "MIGRATIONS", {2: rename_device, 3: back_to_device})
    before = json.dumps(written, sort_keys=True)
    upgraded = upgrade_to_latest(written, "test")
    assert upgraded["schema_version"] == 4 and upgraded["device"] == written["device"] and "target_device" not in upgraded
    assert json.dumps(written, sort_keys=True) == before  # pure: the manifest as read is untouched
    monkeypatch.setattr(manifest_module, "SCHEMA_VERSION", 3)
    monkeypatch.setattr(manifest_module, "MIGRATIONS", {2: back_to_device})
    with pytest.raises(KeyError):
        upgrade_to_latest(written, "test")  # a step's own failure is not hidden
    monkeypatch.setattr(manifest_module, "MIGRATIONS", {})
    with pytest.raises(BundleError, match="schema 2.*no upgrade path"):
        read_bundle(bundle_copy)
    monkeypatch.undo()
    # Schema 1 carried no manifest digest: refused with the reason, even with a digest made up for it.
    old = {**written, "schema_version": 1}
    old["manifest_sha256"] = manifest_digest(old)
    (bundle_copy / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(BundleError, match="schema 1 .*no digest of its own manifest.*convert it again"):
        read_bundle(bundle_copy)


def test_failed_conversion_leaves_the_old_bundle_whole(tiny_run, bundle_copy, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no calibration images"):
        convert(tiny_run, bundle_copy, ConvertOptions(target="onnx", calib_data=empty))
    read_bundle(bundle_copy)  # checksums still hold
    assert not list(bundle_copy.parent.glob(".bundle.partial-*"))


@pytest.mark.parametrize("bundle_fixture", ["onnx_bundle", "intel_bundle"])
def test_runtime_works_where_torch_cannot_be_imported(bundle_fixture, request, sample_root):
    bundle = request.getfixturevalue(bundle_fixture)
    image = sorted((sample_root / "washer" / "test" / "good").glob("*.png"))[0]
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        import cv2
        from amoe_sdk import EdgeDetector
        detector = EdgeDetector(r"{bundle}")
        result = detector.predict(cv2.imread(r"{image}"))
        print(detector, "score", result.score)
        assert sys.modules["torch"] is None
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "score" in done.stdout


def test_amoe_info_reads_a_bundle_where_torch_cannot_be_imported(onnx_bundle):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        from amoe_sdk.cli.main import main
        code = main(["info", r"{onnx_bundle}", "--json"])
        assert sys.modules["torch"] is None
        sys.exit(code)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["target"] == "onnx"
