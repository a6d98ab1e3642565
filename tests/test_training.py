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
