"""A short real training run (embedded Lite0 encoder, default model) must clearly beat chance."""

import pytest

from amoe_sdk.checkpoint import load_detector
from amoe_sdk.config import load_config
from amoe_sdk.data.layouts import read_dataset
from amoe_sdk.data.synth import SampleSpec, write_sample_dataset
from amoe_sdk.evaluation.evaluate import evaluate
from amoe_sdk.training.trainer import train


@pytest.mark.slow
def test_short_training_beats_chance_on_washer(tmp_path):
    write_sample_dataset(tmp_path / "data", ["washer"], seed=1, spec=SampleSpec(train_good=40, test_good=10, test_per_defect=4))
    config = load_config(overrides={"train.steps": 150, "train.warmup_steps": 10})
    train(tmp_path / "data" / "washer", tmp_path / "run", config, show_progress=False)
    model, payload = load_detector(tmp_path / "run")
    result = evaluate(model, read_dataset(tmp_path / "data" / "washer", require_test=True), show_progress=False)
    assert result["image_auroc"] >= 0.7, result  # chance is 0.5; 22 test images
    assert result["pixel_auroc"] >= 0.7, result
    # The router picked k experts per image and the routing weights were recorded.
    assert len(payload["routing_usage"]["selected_share"]) == model.num_experts


def test_level_shares_are_measured_per_product_and_stored(measured_run, tiny_run):
    from amoe_sdk.checkpoint import read_checkpoint

    payload = read_checkpoint(measured_run)
    fusion = payload["calibration"]["fusion"]
    model, _ = load_detector(measured_run)
    shares = [fusion["level_weights"][level] for level in ("patch", "component", "global")]
    assert model.level_weights.tolist() == pytest.approx(shares) and sum(shares) == pytest.approx(1.0)
    assert set(fusion["pseudo_auroc"]) == {"patch", "component", "global"}
    assert payload["state_dict"]["level_weights"].tolist() == pytest.approx(shares)
    assert "fusion" not in read_checkpoint(tiny_run)["calibration"]  # level_weighting: fixed keeps the config's
    assert load_detector(tiny_run)[0].level_weights.tolist() == pytest.approx([1 / 3] * 3)


def test_a_level_at_chance_gets_no_share_and_the_base_shares_stay_when_none_separates(tiny_run, monkeypatch):
    import numpy as np
    import torch

    import amoe_sdk.training.fusion as fusion

    model, payload = load_detector(tiny_run)
    images = torch.zeros(4, 3, 128, 128, dtype=torch.uint8)
    rng = np.random.default_rng(0)

    calls = []

    def separating(model_, batch, batch_size=8):  # patch separates, component is noise, global points the wrong way
        anomalous = bool(calls)  # the first call scores the normal images, the second the pseudo-anomalies
        calls.append(len(batch))
        n = len(batch)
        patch = rng.uniform(1, 2, n) if anomalous else rng.uniform(0, 1, n)
        glob = rng.uniform(0, 1, n) if anomalous else rng.uniform(1, 2, n)
        return np.stack([patch, rng.uniform(0, 1, n), glob], axis=1)

    monkeypatch.setattr(fusion, "level_scores", separating)
    record = fusion.calibrate_level_weights(model, images, [1.0, 1.0, 1.0], seed=0)
    assert record["level_weights"]["patch"] > 0.9 and record["level_weights"]["global"] == 0.0
    monkeypatch.setattr(fusion, "level_scores", lambda m, b, batch_size=8: np.zeros((len(b), 3)))
    record = fusion.calibrate_level_weights(model, images, [1.0, 2.0, 1.0], seed=0)
    assert record["fallback_to_base"] and model.level_weights.tolist() == pytest.approx([0.25, 0.5, 0.25])


def test_a_checkpoint_from_before_measured_shares_loads_with_its_fixed_ones(tiny_run, tmp_path):
    import torch

    payload = torch.load(tiny_run / "model.pt", weights_only=True)
    del payload["state_dict"]["level_weights"]
    del payload["config"]["model"]["postprocess"]["level_weighting"]
    torch.save(payload, tmp_path / "model.pt")
    model, _ = load_detector(tmp_path)
    assert model.config.postprocess.level_weighting == "fixed"
    assert model.level_weights.tolist() == pytest.approx([1 / 3] * 3)
