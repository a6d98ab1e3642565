"""Reliability and security: no wrong answer under load, no lost file, no code run from a file, no trusted
manifest, and clear errors instead of tracebacks. Each test here failed on the code before these checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from amoe_sdk import EdgeDetector
from amoe_sdk.cli.main import main
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.data.images import read_image
from amoe_sdk.errors import BackendError, BundleError, CheckpointError, ConfigError, InputError, UsageError
from amoe_sdk.runtimes.bundle import read_bundle
from amoe_sdk.runtimes.manifest import manifest_digest
from amoe_sdk.training.trainer import train

from conftest import tiny_config


def _frames(sample_root, category="washer"):
    return [read_image(p) for p in sorted((sample_root / category / "test").rglob("*.png"))]


def _edit_manifest(bundle: Path, edit, reseal: bool = True) -> None:
    """Change a bundle's manifest; ``reseal`` recomputes its digest, as a buggy or hostile writer would."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    if reseal:
        data["manifest_sha256"] = manifest_digest(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def onnx_copy(onnx_bundle, tmp_path):
    return Path(shutil.copytree(onnx_bundle, tmp_path / "bundle"))


@pytest.fixture
def intel_copy(intel_bundle, tmp_path):
    return Path(shutil.copytree(intel_bundle, tmp_path / "bundle-ov"))


# -- 1. results never cross between threads -------------------------------------------------------------------------


@pytest.mark.parametrize("bundle_fixture", ["onnx_bundle", "intel_bundle"])
def test_one_detector_called_from_many_threads_gives_every_image_its_own_result(bundle_fixture, request, sample_root):
    detector = EdgeDetector(request.getfixturevalue(bundle_fixture), threads=1)
    frames = _frames(sample_root)
    single = [detector.predict(f) for f in frames]
    mismatches, errors = [], []

    def worker(k: int) -> None:
        try:
            for r in range(12):
                i = (k * 5 + r) % len(frames)
                result = detector.predict(frames[i])
                if abs(result.score - single[i].score) > 1e-5 * max(1.0, abs(single[i].score)) or not np.allclose(
                    result.anomaly_map, single[i].anomaly_map, atol=1e-5
                ):
                    mismatches.append((k, i, result.score, single[i].score))
        except Exception as exc:  # noqa: BLE001 - any error in a worker fails the test below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    detector.close()
    assert not errors and not mismatches, (errors[:3], mismatches[:3])


def test_concurrent_streams_on_one_detector_keep_their_frames_apart(intel_bundle, sample_root):
    detector = EdgeDetector(intel_bundle, threads=1)
    folders = [sample_root / "washer" / "test" / name for name in ("good", "crack")]
    expected = {folder: [detector.predict(read_image(p)).score for p in sorted(folder.glob("*.png"))] for folder in folders}
    got: dict[Path, list[float]] = {}

    def run(folder: Path) -> None:
        with detector.stream(str(folder), policy="every", depth=2) as stream:
            got[folder] = [item.score for item in stream]

    threads = [threading.Thread(target=run, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    detector.close()
    for folder in folders:
        assert got[folder] == pytest.approx(expected[folder], rel=1e-5)


# -- 2. amoe convert --out never deletes what is not a bundle --------------------------------------------------------


def _fail_if_work_starts(monkeypatch):
    import amoe_sdk.converters.convert as convert_module

    def no_work(*args, **kwargs):
        raise AssertionError("the conversion started before the --out check")

    monkeypatch.setattr(convert_module, "load_detector", no_work)


def test_convert_refuses_a_run_folder_and_keeps_its_checkpoints(tiny_run, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    before = sorted(p.name for p in run.iterdir())
    _fail_if_work_starts(monkeypatch)
    assert main(["convert", "--checkpoint", str(tiny_run), "--target", "onnx", "--out", str(run)]) == 2
    assert "not an amoe-sdk bundle" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


def test_convert_refuses_a_users_folder_and_a_file(tiny_run, tmp_path, monkeypatch, capsys):
    _fail_if_work_starts(monkeypatch)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["convert", "--checkpoint", str(tiny_run), "--target", "onnx", "--out", str(mine)]) == 2
    assert (mine / "notes.txt").read_text() == "keep me"
    target = tmp_path / "report.pdf"
    target.write_text("a file")
    assert main(["convert", "--checkpoint", str(tiny_run), "--target", "onnx", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "report.pdf"]  # nothing moved aside


def test_convert_replaces_a_bundle_but_not_one_holding_files_of_yours(tiny_run, onnx_copy, tmp_path):
    convert(tiny_run, onnx_copy, ConvertOptions(target="onnx"))  # a bundle (with its parity report) is replaced
    read_bundle(onnx_copy)
    (onnx_copy / "my-notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="my-notes.txt"):
        convert(tiny_run, onnx_copy, ConvertOptions(target="onnx"))
    assert (onnx_copy / "my-notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    read_bundle(convert(tiny_run, empty, ConvertOptions(target="onnx")))


def test_a_dead_conversions_partial_folder_is_removed_and_a_foreign_one_kept(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".bundle.partial-{dead.pid}"
    stale.mkdir()
    (stale / ".amoe-writer.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    (stale / "model.onnx").write_bytes(b"0" * 1000)
    unmarked = tmp_path / ".bundle.partial-1"
    unmarked.mkdir()
    convert(tiny_run, out, ConvertOptions(target="onnx"))
    assert not stale.exists() and unmarked.is_dir()


# -- 3. a checkpoint never runs code ---------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_not_executed(tiny_run, onnx_copy, sample_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = torch.load(tiny_run / "model.pt", weights_only=True)
    payload["history"] = _RunsCode(marker)
    evil = tmp_path / "evil" / "model.pt"
    evil.parent.mkdir()
    torch.save(payload, evil)
    assert main(["info", str(evil)]) == 6
    assert "other than tensors and plain containers" in capsys.readouterr().err
    # Through a bundle whose manifest names that checkpoint as its source.
    _edit_manifest(onnx_copy, lambda m: m["source"].update(checkpoint=str(evil), sha256=None))
    assert main(["verify", str(onnx_copy), "--data", str(sample_root / "washer")]) == 6
    assert not marker.exists()


# -- 4. the manifest is checked, never trusted -----------------------------------------------------------------------


def test_an_edited_threshold_is_refused(onnx_copy):
    _edit_manifest(onnx_copy, lambda m: m["threshold"].update(image=1e9), reseal=False)
    with pytest.raises(BundleError, match="changed after conversion.*threshold="):
        EdgeDetector(onnx_copy)


def _outside(m):
    m["files"]["../elsewhere/model.onnx"] = m["files"]["model.onnx"]
    m["artifacts"]["onnx"] = "../elsewhere/model.onnx"


@pytest.mark.parametrize(
    "edit, words",
    [
        (_outside, "plain relative path inside the bundle"),
        (lambda m: m["artifacts"].update(onnx="/etc/passwd"), "artifacts.onnx"),
        (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "plain relative path"),
        (lambda m: m.update(files={}), "files is empty"),
        (lambda m: m["artifacts"].update(tensorrt_calibration_cache="calibration.cache"), "files does not list"),
        (lambda m: m["threshold"].pop("image"), "threshold.image is missing"),
        (lambda m: m.update(target="foo"), "target is 'foo'"),
        (lambda m: m["input"].update(size="abc"), "input.size: expected an integer"),
        (lambda m: m["threshold"].update(image=0.0), "threshold.image is 0.0"),
        (lambda m: m.update(device="GPU"), "device is 'GPU', not a device for target onnx"),
        (lambda m: m.update(colour_space="RGB"), "unknown key"),
    ],
)
def test_manifest_values_are_checked_against_the_schema(onnx_copy, edit, words, capsys):
    _edit_manifest(onnx_copy, edit)
    with pytest.raises(BundleError, match=words):
        read_bundle(onnx_copy)
    assert main(["info", str(onnx_copy)]) == 7


def test_a_manifest_that_is_a_list_is_a_bundle_error(onnx_copy):
    (onnx_copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="list"):
        read_bundle(onnx_copy)


def test_a_file_linked_from_outside_the_bundle_is_refused(onnx_copy, onnx_bundle):
    (onnx_copy / "model.onnx").unlink()
    (onnx_copy / "model.onnx").symlink_to(onnx_bundle / "model.onnx")  # same bytes, same checksum
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(onnx_copy)


@pytest.mark.parametrize("bundle_copy", ["onnx_copy", "intel_copy"])
def test_an_input_size_or_batch_the_artifact_does_not_take_is_a_bundle_error(bundle_copy, request):
    bundle = request.getfixturevalue(bundle_copy)

    def bigger(m):
        m["input"]["size"] = m["input"]["batch"] = 2 * m["input"]["size"]
        m["input"]["batch"] = 2
        m["outputs"]["anomaly_map"] = [2, 1, m["input"]["size"], m["input"]["size"]]
        m["outputs"]["score"] = [2]

    _edit_manifest(bundle, bigger)
    with pytest.raises(BundleError, match="input.size 256 and input.batch 2"):
        EdgeDetector(bundle)


# -- 5, 6. the recorded device and the calibrated precision are honoured -------------------------------------------


def test_the_device_recorded_at_conversion_is_used_and_its_absence_is_an_error(intel_copy):
    _edit_manifest(intel_copy, lambda m: m.update(device="GPU"))
    with pytest.raises(BackendError, match=r"GPU.*converted for.*device="):
        EdgeDetector(intel_copy)
    assert EdgeDetector(intel_copy, device="CPU").backend.device == "CPU"


def test_openvino_pins_the_calibrated_precision_on_every_device(intel_bundle, sample_root, monkeypatch):
    import openvino as ov

    import amoe_sdk.runtimes.backends.openvino_backend as openvino_backend

    frame = _frames(sample_root)[0]
    cpu = EdgeDetector(intel_bundle, device="CPU").predict(frame).score
    seen = []

    class SpyCore(ov.Core):
        def compile_model(self, model, device, config=None):
            seen.append((device, dict(config or {})))
            return super().compile_model(model, device, config or {})

    monkeypatch.setattr(openvino_backend.ov, "Core", SpyCore)
    auto = EdgeDetector(intel_bundle, device="AUTO").predict(frame).score
    assert seen and seen[-1][0] == "AUTO" and seen[-1][1]["INFERENCE_PRECISION_HINT"] == "f32"
    # On a CPU with bf16 (AVX-512 BF16, AMX) an unpinned AUTO moved this score by a quarter.
    assert auto == pytest.approx(cpu, rel=1e-5)


# -- 7. a finished run is not silently re-trained on other data -----------------------------------------------------


def test_a_finished_run_refuses_other_data_and_fewer_steps(tiny_run, sample_root, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    weights = (run / "model.pt").read_bytes()
    config = tiny_config(**{"train.steps": 6, "train.checkpoint_every": 3})
    with pytest.raises(CheckpointError, match="other images.*--no-resume"):
        train(sample_root / "weave", run, config, show_progress=False)
    with pytest.raises(CheckpointError, match="lower than the 6 steps"):
        train(sample_root / "washer", run, tiny_config(**{"train.steps": 3, "train.checkpoint_every": 3}), show_progress=False)
    assert (run / "model.pt").read_bytes() == weights


def test_a_truncated_last_checkpoint_says_how_to_start_over(tiny_run, sample_root, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="--no-resume"):
        train(sample_root / "washer", run, tiny_config(**{"train.steps": 6, "train.checkpoint_every": 3}), show_progress=False)


# -- clear errors instead of tracebacks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("model.patch.num_experts", -1, r"model.patch.num_experts=-1 is out of range: allowed >= 0"),
        ("train.checkpoint_every", 0, r"train.checkpoint_every=0 .*>= 1"),
        ("train.lr", -1.0, r"train.lr=-1.0 .*\(0, 1\]"),
        ("train.batch_size", 0, r"train.batch_size=0"),
        ("model.postprocess.level_weights", [1.0, -1.0, 1.0], r"model.postprocess.level_weights=\[1.0, -1.0, 1.0\] .*>= 0 for each element"),
    ],
)
def test_numeric_config_values_out_of_range_name_the_file_key_and_range(tmp_path, key, value, words):
    import yaml

    from amoe_sdk.config import load_config

    section, *rest = key.split(".")
    path = tmp_path / "bad.yaml"
    nested: dict = {rest[-1]: value}
    for part in reversed(rest[:-1]):
        nested = {part: nested}
    path.write_text(yaml.safe_dump({section: nested}))
    with pytest.raises(ConfigError, match=f"{path.name}: {words}"):
        load_config(path)


def test_every_numeric_config_field_has_a_range():
    from amoe_sdk.config import RANGES, AmoeConfig, DistillConfig, numeric_fields

    keys = {key for config in (AmoeConfig(), DistillConfig()) for key, _ in numeric_fields(config)}
    assert keys <= set(RANGES), sorted(keys - set(RANGES))


def test_negative_steps_on_the_command_line_name_the_option(sample_root, tmp_path, capsys):
    assert main(["train", "--data", str(sample_root / "washer"), "--out", str(tmp_path / "r"), "--steps", "-5"]) == 4
    assert "--steps on the command line: train.steps=-5" in capsys.readouterr().err


def test_batch_size_beyond_the_data_is_a_config_error(sample_root, tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        train(sample_root / "washer", tmp_path / "r", tiny_config(**{"train.batch_size": 500, "train.steps": 2}), show_progress=False)


def test_outputs_are_checked_before_any_work(sample_root, tiny_run, onnx_bundle, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    assert main(["train", "--data", str(sample_root / "washer"), "--out", str(a_file)]) == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own")
    assert main(["train", "--data", str(sample_root / "washer"), "--out", str(mine)]) == 2
    assert main(["distill", "--teacher", str(tiny_run), "--data", str(sample_root / "washer"), "--out", str(a_file)]) == 2
    assert main(["eval", "--model", str(tiny_run), "--data", str(sample_root / "washer"), "--out", str(tmp_path)]) == 2
    assert main(["bench", str(onnx_bundle), "--json-out", str(tmp_path), "--runs", "1"]) == 2
    assert main(["data", "sample", str(a_file)]) == 2
    assert a_file.read_text() == "mine" and (mine / "config.yaml").read_text() == "my own"
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan"), float("inf")])
def test_thresholds_must_be_positive_and_finite(onnx_bundle, threshold):
    with pytest.raises(ConfigError, match="threshold must be a positive finite number"):
        EdgeDetector(onnx_bundle, threshold=threshold)


def test_sensitivity_nan_is_refused(onnx_bundle):
    with pytest.raises(ConfigError, match="sensitivity"):
        EdgeDetector(onnx_bundle, sensitivity=float("nan"))


def _convert_in_a_subprocess(tiny_run, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "amoe_sdk.converters.cli", "--checkpoint", str(tiny_run), "--target", "onnx", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_amoe_convert_interrupted_or_terminated_exits_cleanly_and_leaves_nothing(tiny_run, tmp_path, sent, code):
    out = tmp_path / "bundle"
    process = _convert_in_a_subprocess(tiny_run, out)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".bundle.partial-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the conversion ended before it could be signalled"
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_swallowed_interrupt_still_ends_the_command_with_its_code_and_commits_nothing(tmp_path, sent, code):
    """A library that catches the signal's exception must not turn an interrupted conversion into a bundle."""
    from amoe_sdk.converters.bundle_writer import BundleWriter
    from amoe_sdk.process import run_command

    def command() -> int:
        with BundleWriter(tmp_path / "bundle") as writer:
            writer.path("model.onnx").write_bytes(b"onnx")
            try:
                os.kill(os.getpid(), sent)
                time.sleep(5)  # the handler runs here
            except BaseException:  # what such a library does
                pass
            writer.commit({})
        return 0

    assert run_command("amoe-convert", command) == code
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_verify_finds_the_source_from_another_directory_and_names_a_wrong_reference(tiny_run, line_run, sample_root, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_run, tmp_path / "runs" / "tiny")
    monkeypatch.chdir(tmp_path)
    bundle = convert(Path("runs/tiny"), Path("bundles/tiny"), ConvertOptions(target="onnx"))
    monkeypatch.chdir(sample_root)
    assert main(["verify", str(tmp_path / bundle), "--data", str(sample_root / "washer")]) == 0
    # line_run has the same model config but is another checkpoint: a wrong reference, not a parity failure.
    assert main(["verify", str(tmp_path / bundle), "--data", str(sample_root / "washer"), "--reference", str(line_run)]) == 6
    assert "is not the checkpoint" in capsys.readouterr().err


def test_a_reference_with_another_model_config_is_a_wrong_reference(onnx_bundle, sample_root, tmp_path, capsys):
    other = tmp_path / "other"
    train(sample_root / "washer", other, tiny_config(**{"train.steps": 1, "model.component.num_slots": 4}), show_progress=False)
    assert main(["verify", str(onnx_bundle), "--data", str(sample_root / "washer"), "--reference", str(other)]) == 6
    assert "another model config" in capsys.readouterr().err


def test_a_jetson_bundle_without_tensorrt_says_what_would_run_it(tiny_run, sample_root, tmp_path):
    bundle = convert(tiny_run, tmp_path / "trt", ConvertOptions(target="jetson"))
    pytest.importorskip("onnxruntime")
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendError, match=r"TensorRT.*JetPack.*backend='onnxruntime'"):
            EdgeDetector(bundle)
    frame = _frames(sample_root)[0]
    assert np.isfinite(EdgeDetector(bundle, backend="onnxruntime").predict(frame).score)


# -- the runner life cycle ------------------------------------------------------------------------------------------


def test_a_closed_backend_and_a_wrong_batch_are_clear_errors(onnx_bundle):
    detector = EdgeDetector(onnx_bundle)
    with pytest.raises(InputError, match="takes uint8"):
        detector.backend.infer(np.zeros((3, 64, 64, 3), np.uint8))
    detector.close()
    detector.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        detector.predict(np.zeros((64, 64, 3), np.uint8))


def test_an_option_a_backend_does_not_take_is_named(onnx_bundle):
    with pytest.raises(BackendError, match="takes no option hint; its options: threads"):
        EdgeDetector(onnx_bundle, hint="THROUGHPUT")


def test_a_backend_loads_on_activate_and_refuses_to_run_inactive(onnx_bundle):
    from amoe_sdk.runtimes.backends.onnxruntime_backend import OnnxRuntimeBackend
    from amoe_sdk.runtimes.backends.options import OnnxRuntimeOptions

    bundle = read_bundle(onnx_bundle)
    batch = np.zeros(bundle.manifest.input.shape, np.uint8)
    runner = OnnxRuntimeBackend(bundle, "CPU", OnnxRuntimeOptions(threads=1))
    assert not runner.is_active
    with pytest.raises(BackendError, match="not active; call activate"):
        runner.infer(batch)
    with runner:
        assert runner.is_active
        first = runner.infer(batch)
        runner.activate()  # activating an active runner does nothing
    assert not runner.is_active
    with pytest.raises(BackendError, match="not active"):
        runner.infer(batch)
    runner.activate()  # loads again after a deactivate, with the same outputs
    again = runner.infer(batch)
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    runner.close()
    runner.close()
    assert runner.is_closed and not runner.is_active
    with pytest.raises(BackendError, match="closed"):
        runner.activate()


@pytest.mark.parametrize(
    "backend, options, words",
    [
        ("openvino", {"dla_core": 0}, "the openvino backend takes no option dla_core; its options: threads, cache_dir, hint, inference_precision"),
        ("onnxruntime", {"threads": 0}, "threads must be a positive whole number"),
        ("openvino", {"hint": "FASTEST"}, "hint must be one of LATENCY, THROUGHPUT, CUMULATIVE_THROUGHPUT"),
        ("tensorrt", {"dla_core": -1}, "dla_core must be a DLA core index"),
        ("tensorrt", {"threads": 2}, "the tensorrt backend takes no option threads; its options: cache_dir, dla_core"),
    ],
)
def test_backend_options_are_checked_against_the_backends_dataclass(backend, options, words):
    from amoe_sdk.runtimes.backends.options import make_options

    with pytest.raises(BackendError, match=words):
        make_options(backend, **options)


def test_threads_for_tensorrt_is_a_backend_error_not_a_type_error(onnx_bundle, monkeypatch):
    """``amoe bench --threads 2`` on a TensorRT bundle: the options are checked before TensorRT is loaded."""
    import amoe_sdk.runtimes.backends as backends

    monkeypatch.setattr(backends, "installed", lambda name: True)
    with pytest.raises(BackendError, match="tensorrt backend takes no option threads"):
        backends.create_backend(read_bundle(onnx_bundle), "tensorrt", None, threads=2)
