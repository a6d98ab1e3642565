import torch
import pytest

from amoe_sdk.checkpoint import FINAL_NAME, RESUME_NAME, load_detector, read_checkpoint
from amoe_sdk.errors import CheckpointError
from amoe_sdk.training.trainer import train

from conftest import tiny_config


def test_checkpoint_round_trip(tiny_run):
    payload = read_checkpoint(tiny_run)
    assert payload["step"] == 6 and payload["sdk_version"]
    assert {"map_low", "map_high", "val_scores"} <= set(payload["calibration"])
    model, _ = load_detector(tiny_run)
    again, _ = load_detector(tiny_run / FINAL_NAME)
    images = torch.rand(2, 3, 128, 128) * 255
    with torch.no_grad():
        a, b = model(images), again(images)
    assert torch.equal(a.anomaly_map, b.anomaly_map)
    assert torch.equal(model.assigner.prototypes, payload["state_dict"]["assigner.prototypes"])
    assert not torch.equal(model.map_high, torch.ones_like(model.map_high))  # calibrated, not the defaults


def test_truncated_checkpoint_is_a_clear_error(tiny_run, tmp_path):
    broken = tmp_path / FINAL_NAME
    data = (tiny_run / FINAL_NAME).read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(broken)


def test_newer_format_is_refused(tiny_run, tmp_path):
    payload = torch.load(tiny_run / FINAL_NAME, weights_only=True)
    payload["format"] = 999
    torch.save(payload, tmp_path / FINAL_NAME)
    with pytest.raises(CheckpointError, match="upgrade amoe-sdk"):
        read_checkpoint(tmp_path)


def test_missing_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="amoe train"):
        read_checkpoint(tmp_path)


def test_resume_reproduces_an_uninterrupted_run(sample_root, tmp_path, monkeypatch):
    import amoe_sdk.training.engine as engine  # the run engine writes every checkpoint of train and distill

    config = tiny_config(**{"train.steps": 4, "train.checkpoint_every": 2})
    train(sample_root / "weave", tmp_path / "straight", config, show_progress=False)
    real_save = engine.atomic_torch_save

    def save_then_die(payload, path):
        real_save(payload, path)
        raise KeyboardInterrupt  # the run is killed right after its step-2 checkpoint

    monkeypatch.setattr(engine, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(sample_root / "weave", tmp_path / "resumed", config, show_progress=False)
    monkeypatch.setattr(engine, "atomic_torch_save", real_save)
    assert read_checkpoint(tmp_path / "resumed" / RESUME_NAME)["step"] == 2
    train(sample_root / "weave", tmp_path / "resumed", config, show_progress=False)
    a = read_checkpoint(tmp_path / "straight")["state_dict"]
    b = read_checkpoint(tmp_path / "resumed")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_config_is_refused(sample_root, tmp_path):
    train(sample_root / "weave", tmp_path, tiny_config(**{"train.steps": 2}), show_progress=False)
    (tmp_path / FINAL_NAME).unlink()
    assert (tmp_path / RESUME_NAME).is_file()
    with pytest.raises(CheckpointError, match="another config"):
        train(sample_root / "weave", tmp_path, tiny_config(**{"train.steps": 4, "train.lr": 1e-4}), show_progress=False)
