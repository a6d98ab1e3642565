"""Distillation: its losses, a short run that beats the untrained student, resumption, QAT, and the refusals."""

import shutil

import numpy as np
import pytest
import torch
import yaml

from amoe_sdk.checkpoint import load_detector, read_checkpoint
from amoe_sdk.errors import CheckpointError, ConfigError
from amoe_sdk.outputs import sha256_of
from amoe_sdk.training.distill import LearnedNormalisation, distill
from amoe_sdk.training.distill_losses import map_matching_loss, normal_reconstruction_loss, score_matching_loss
from amoe_sdk.training.qat import FakeQuantization, float_state_dict

# The tiny student of the tiny teacher: the teacher's 128 px input and 8 x 8 grid, narrower experts.
TINY_STUDENT = {"model": {"patch": {"embed_dim": 32, "bottleneck_hidden": 64}, "global": {"image_size": 32, "width": 16}},
                "train": {"batch_size": 8, "warmup_steps": 2, "lr": 0.005}}


def write_student_yaml(path, extra=None):
    data = dict(TINY_STUDENT)
    data.update(extra or {})
    path.write_text(yaml.safe_dump(data))
    return path


# --- losses -------------------------------------------------------------------------------------------------

def test_map_matching_is_zero_on_equal_maps_and_grows_with_the_difference():
    torch.manual_seed(0)
    teacher = torch.rand(2, 3, 8, 8) * 5
    weights = torch.tensor([1.0, 1.0, 1.0])
    assert map_matching_loss(teacher.clone(), teacher, weights) == 0
    small = map_matching_loss(teacher + 0.1, teacher, weights)
    large = map_matching_loss(teacher + 1.0, teacher, weights)
    assert 0 < small < large


def test_map_matching_ignores_a_level_without_weight_and_resamples_the_teacher_grid():
    teacher = torch.zeros(1, 3, 16, 16)
    student = torch.zeros(1, 3, 8, 8)
    student[:, 2] = 10.0  # the global level is wrong, but the student has no global expert
    assert map_matching_loss(student, teacher, torch.tensor([1.0, 1.0, 0.0])) == 0
    assert map_matching_loss(student, teacher, torch.tensor([1.0, 1.0, 1.0])) > 0


def test_map_matching_compresses_strong_anomalies_without_losing_them():
    weights = torch.ones(3)
    teacher = torch.full((1, 3, 4, 4), 40.0)
    # Being off by 10 on a 40-span anomaly costs less than being off by 1 on the normal range ...
    assert map_matching_loss(teacher - 10, teacher, weights) < map_matching_loss(torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), weights)
    # ... but missing the anomaly altogether costs far more than either.
    assert map_matching_loss(torch.zeros_like(teacher), teacher, weights) > 10 * map_matching_loss(teacher - 10, teacher, weights)


def test_score_matching_loss():
    scores = torch.tensor([0.2, 3.0, 12.0])
    assert score_matching_loss(scores, scores) == 0
    assert score_matching_loss(scores * 2, scores) > 0


def test_reconstruction_loss_counts_only_normal_images():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]])
    is_normal = torch.tensor([True, True, False])
    scales = torch.tensor([1.0, 0.5])
    expected = ((1.0 + 1.0) / 2 + (3.0 + 2.0) / 2) / 2
    assert normal_reconstruction_loss(losses, is_normal, scales).item() == pytest.approx(expected)
    losses[2] = -7.0  # whatever a pseudo-anomaly's reconstruction does, it must not count
    assert normal_reconstruction_loss(losses, is_normal, scales).item() == pytest.approx(expected)


def test_learned_normalisation_matches_the_detector_buffers_and_learns():
    norm = LearnedNormalisation(torch.tensor([0.1, 2.0]), torch.tensor([0.3, 6.0]))
    raw = torch.tensor([0.3, 6.0]).view(1, 2, 1, 1)
    assert torch.allclose(norm(raw), torch.ones(1, 2, 1, 1))
    low, high = norm.bounds()
    assert torch.allclose(low, torch.tensor([0.1, 2.0])) and torch.allclose(high, torch.tensor([0.3, 6.0]))
    norm(raw).sum().backward()
    assert norm.low.grad is not None and norm.log_span.grad is not None


# --- QAT ----------------------------------------------------------------------------------------------------

def test_fake_quantization_rounds_weights_and_leaves_float_parameters():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    before = layer.weight
    original = layer.weight.detach().clone()
    qat = FakeQuantization([layer])
    qat.enable()
    rounded = layer.weight.detach()
    for row, amax in zip(rounded, original.abs().amax(dim=1)):
        steps = row / (amax / 127)
        assert torch.allclose(steps, steps.round(), atol=1e-4)  # on the INT8 grid of its channel
    assert not torch.equal(rounded, original)
    assert set(float_state_dict(layer)) == {"weight", "bias"}
    out = layer(torch.randn(3, 16))
    out.sum().backward()  # straight through the rounding
    assert before.grad is not None
    qat.disable()
    assert layer.weight is before and torch.equal(layer.weight.detach(), original)


# --- the distillation itself --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def distilled(line_run, sample_root, tmp_path_factory):
    """The tiny washer teacher distilled for 1 step (an untrained student) and for 120 steps."""
    root = tmp_path_factory.mktemp("distill")
    student_yaml = write_student_yaml(root / "student.yaml")
    runs = {}
    for steps in (1, 120):
        runs[steps] = distill(line_run, sample_root / "washer", root / f"student-{steps}", student_yaml,
                              {"train.steps": steps, "train.checkpoint_every": 60}, show_progress=False)
    return runs


def test_short_distillation_improves_on_the_untrained_student(distilled, line_run, sample_root):
    from amoe_sdk.data.layouts import read_dataset
    from amoe_sdk.evaluation.evaluate import evaluate

    untrained, trained = distilled[1], distilled[120]
    # Closer to the teacher on held-out normals and pseudo-anomalies ...
    assert trained.fidelity["map_error"] < 0.5 * untrained.fidelity["map_error"], (trained.fidelity, untrained.fidelity)
    assert trained.fidelity["score_error"] < untrained.fidelity["score_error"]
    assert trained.fidelity["score_spearman"] > 0.5, trained.fidelity
    # ... and a detector on the real test set, like its teacher.
    dataset = read_dataset(sample_root / "washer", require_test=True)
    student, _ = load_detector(trained.checkpoint)
    teacher, _ = load_detector(line_run)
    got = evaluate(student, dataset, show_progress=False)
    want = evaluate(teacher, dataset, show_progress=False)
    assert got["image_auroc"] >= 0.7 and got["pixel_auroc"] >= 0.7, got
    assert got["image_auroc"] >= want["image_auroc"] - 0.2, (got, want)


def test_student_is_calibrated_on_its_own_maps(distilled):
    """Whitening, normalisation and level shares measured on the finished student, as for a trained detector:
    kept as learned against the teacher's maps, the vial student lost 18 points of image AUROC."""
    payload = read_checkpoint(distilled[120].checkpoint)
    calibration = payload["calibration"]
    model, _ = load_detector(distilled[120].checkpoint)
    expert = model.patch_experts[0]
    assert expert.whitened and calibration["whitening"]["form"] in ("cosine", "diagonal", "subspace")
    assert not torch.equal(expert.residual_std, torch.ones_like(expert.residual_std))  # fitted on its residuals
    assert ("fusion" in calibration) == (model.config.postprocess.level_weighting == "pseudo")
    assert calibration["map_low"] == model.map_low.tolist() and calibration["map_high"] == model.map_high.tolist()


def test_student_checkpoint_records_its_teacher_and_is_small(distilled, line_run):
    payload = read_checkpoint(distilled[120].checkpoint)
    record = payload["distillation"]
    teacher_file = line_run / "model.pt"
    assert record["teacher"]["sha256"] == sha256_of(teacher_file)
    assert record["teacher"]["path"] == str(teacher_file.resolve())
    assert record["config"]["train"]["steps"] == 120
    assert record["config"]["model"]["router"]["static"] is True
    assert record["cost"]["student_gflops"] < record["cost"]["teacher_gflops"]
    model, _ = load_detector(distilled[120].checkpoint)
    assert model.router is None and model.num_experts == 3  # one expert per used level, no router
    assert "calibration" in payload and len(payload["calibration"]["val_scores"]) == len(payload["val_images"])


def test_distilled_student_converts_like_any_checkpoint(distilled, sample_root, tmp_path):
    from amoe_sdk.converters.convert import ConvertOptions, convert
    from amoe_sdk.converters.verify import verify

    bundle = convert(distilled[120].checkpoint, tmp_path / "student-onnx", ConvertOptions(target="onnx"))
    report = verify(bundle, sample_root / "washer", show_progress=False)
    assert report["passed"], report


def test_resumed_distillation_continues_where_it_stopped(line_run, sample_root, tmp_path, monkeypatch):
    import amoe_sdk.training.distill as distill_module

    student_yaml = write_student_yaml(tmp_path / "student.yaml")
    overrides = {"train.steps": 6, "train.checkpoint_every": 2}
    distill(line_run, sample_root / "washer", tmp_path / "a", student_yaml, overrides, show_progress=False)
    # Interrupt the same run in its fifth step (after the step-4 checkpoint), then start it again.
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return score_matching_loss(*args)

    monkeypatch.setattr(distill_module, "score_matching_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(line_run, sample_root / "washer", tmp_path / "b", student_yaml, overrides, show_progress=False)
    assert read_checkpoint(tmp_path / "b" / "last.pt")["step"] == 4 and not (tmp_path / "b" / "model.pt").exists()
    monkeypatch.undo()
    distill(line_run, sample_root / "washer", tmp_path / "b", student_yaml, overrides, show_progress=False)
    a, b = read_checkpoint(tmp_path / "a"), read_checkpoint(tmp_path / "b")
    assert [h["step"] for h in b["history"]] == list(range(1, 7))
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-5), key
    # Another config in the same folder is refused, not mixed in.
    other = write_student_yaml(tmp_path / "other.yaml", {"loss": {"map_weight": 2.0}})
    with pytest.raises(CheckpointError, match="another config"):
        distill(line_run, sample_root / "washer", tmp_path / "b", other, {"train.steps": 8}, show_progress=False)


def test_qat_distillation_writes_a_float_checkpoint(line_run, sample_root, tmp_path):
    student_yaml = write_student_yaml(tmp_path / "student.yaml")
    result = distill(line_run, sample_root / "washer", tmp_path / "qat", student_yaml,
                     {"train.steps": 4, "qat.enabled": True, "qat.fraction": 0.5}, show_progress=False)
    payload = read_checkpoint(result.checkpoint)
    assert [h["qat"] for h in payload["history"]] == [0.0, 0.0, 1.0, 1.0]
    assert not any("parametrizations" in key for key in payload["state_dict"])
    load_detector(result.checkpoint)  # strict load: plain float weights under their usual names


# --- refusals -----------------------------------------------------------------------------------------------

def test_teacher_from_another_sdk_version_is_refused(line_run, sample_root, tmp_path):
    teacher = tmp_path / "old-teacher"
    shutil.copytree(line_run, teacher)
    payload = torch.load(teacher / "model.pt", weights_only=True)
    payload["sdk_version"] = "0.9.0"
    torch.save(payload, teacher / "model.pt")
    with pytest.raises(CheckpointError, match=r"amoe-sdk 0\.9\.0.*Retrain the teacher"):
        distill(teacher, sample_root / "washer", tmp_path / "student", overrides={"train.steps": 1}, show_progress=False)
    assert not (tmp_path / "student").exists()  # nothing written


def test_unfinished_teacher_is_refused(tiny_run, sample_root, tmp_path):
    payload = torch.load(tiny_run / "model.pt", weights_only=True)
    payload.pop("calibration")  # what a run interrupted before its end holds
    torch.save(payload, tmp_path / "unfinished.pt")
    with pytest.raises(CheckpointError, match="unfinished"):
        distill(tmp_path / "unfinished.pt", sample_root / "washer", tmp_path / "student", show_progress=False)


@pytest.mark.parametrize("bad, key", [
    ({"model": {"patch": {"embed_dims": 32}}}, "embed_dims"),
    ({"distil": {"steps": 3}}, "distil"),
    ({"loss": {"kd_weight": 1.0}}, "kd_weight"),
])
def test_unknown_student_config_keys_are_refused(line_run, sample_root, tmp_path, bad, key):
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=key):
        distill(line_run, sample_root / "washer", tmp_path / "student", path, show_progress=False)


@pytest.mark.parametrize("bad, message", [
    ({"data": {"pseudo_kinds": ["cut_paste", "scratch"]}}, "pseudo_kinds"),
    ({"data": {"pseudo_kinds": []}}, "pseudo_kinds"),
    ({"model": {"global": {"activation": "gelu"}}}, "global.activation"),
])
def test_invalid_student_config_values_are_refused(line_run, sample_root, tmp_path, bad, message):
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=message):
        distill(line_run, sample_root / "washer", tmp_path / "student", path, show_progress=False)


def test_student_postprocess_must_match_the_teacher(line_run, sample_root, tmp_path):
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump({"model": {"postprocess": {"top_percent": 5.0}}}))
    with pytest.raises(ConfigError, match="postprocess"):
        distill(line_run, sample_root / "washer", tmp_path / "student", path, show_progress=False)


def test_cli_distill_reports_cost_and_fidelity(line_run, sample_root, tmp_path, capsys):
    from amoe_sdk.cli.main import main

    student_yaml = write_student_yaml(tmp_path / "student.yaml")
    code = main(["distill", "--teacher", str(line_run), "--data", str(sample_root / "washer"), "--out", str(tmp_path / "s"),
                 "--student", str(student_yaml), "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "GFLOPs" in out and "of the teacher" in out and "score rank correlation" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {patch: {widht: 3}}\n")
    assert main(["distill", "--teacher", str(line_run), "--data", str(sample_root / "washer"), "--out", str(tmp_path / "t"),
                 "--student", str(bad)]) == ConfigError.exit_code
    assert np.isfinite(read_checkpoint(tmp_path / "s")["distillation"]["fidelity"]["map_error"])
