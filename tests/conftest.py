"""Shared fixtures: a tiny sample dataset and a tiny trained run, built once per test session."""

from __future__ import annotations

import pytest
import torch

from amoe_sdk.config import load_config
from amoe_sdk.data.synth import SampleSpec, write_sample_dataset

torch.set_num_threads(2)

TINY_MODEL = {
    "model.input_size": 128,
    "model.encoder.grid_size": 8,
    "model.patch.embed_dim": 32,
    "model.patch.bottleneck_hidden": 64,
    "model.patch.depth": 1,
    "model.patch.num_heads": 2,
    "model.component.num_slots": 3,
    "model.component.hidden_dim": 32,
    "model.component.code_dim": 16,
    "model.component.kmeans_iters": 5,
    "model.global.image_size": 32,
    "model.global.width": 16,
    "model.global.code_dim": 16,
    "model.router.hidden_dim": 32,
    "train.batch_size": 4,
    "train.min_val_images": 4,
    "train.warmup_steps": 2,
    # The tiny runs' tests were written for fixed, equal level shares and cosine patch maps; the measured run
    # below has both as the default config does (tests/test_training.py, test_export.py).
    "model.postprocess.level_weighting": "fixed",
    "model.patch.residual_whitening": "off",
    "model.patch.memory_size": 256,
}


def tiny_config(**extra):
    """The tiny model, optionally with a random encoder (``random_encoder=True``) and more overrides."""
    overrides = dict(TINY_MODEL)
    if extra.pop("random_encoder", False):
        overrides["model.encoder.random_weights"] = True
    overrides.update(extra)
    return load_config(overrides=overrides)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    write_sample_dataset(root, None, seed=0, spec=SampleSpec(train_good=16, test_good=4, test_per_defect=2))
    return root


@pytest.fixture(scope="session")
def tiny_run(sample_root, tmp_path_factory):
    """A 6-step run of the tiny model on the sample washer category."""
    from amoe_sdk.training.trainer import train

    out = tmp_path_factory.mktemp("run")
    train(sample_root / "washer", out, tiny_config(**{"train.steps": 6, "train.checkpoint_every": 3}), show_progress=False)
    return out


@pytest.fixture(scope="session")
def measured_run(sample_root, tmp_path_factory):
    """Like ``tiny_run``, with the level shares and the patch experts' whitening measured at the end of training
    (the default config's way)."""
    from amoe_sdk.training.trainer import train

    out = tmp_path_factory.mktemp("measured-run")
    config = tiny_config(**{"train.steps": 6, "model.postprocess.level_weighting": "pseudo", "model.patch.residual_whitening": "auto"})
    train(sample_root / "washer", out, config, show_progress=False)
    return out


@pytest.fixture(scope="session")
def line_run(sample_root, tmp_path_factory):
    """The tiny model trained long enough (150 steps) to rank the sample washer's defects above its normal images."""
    from amoe_sdk.training.trainer import train

    run = tmp_path_factory.mktemp("line-run")
    train(sample_root / "washer", run, tiny_config(**{"train.steps": 150, "train.checkpoint_every": 150}), show_progress=False)
    return run


@pytest.fixture(scope="session")
def line_bundle(line_run, tmp_path_factory):
    """``line_run`` as an ONNX bundle: for the streaming and line-side tests, whose verdicts must mean something."""
    from amoe_sdk.converters.convert import ConvertOptions, convert

    return convert(line_run, tmp_path_factory.mktemp("bundles") / "line-onnx", ConvertOptions(target="onnx"))


@pytest.fixture(scope="session")
def onnx_bundle(tiny_run, tmp_path_factory):
    """The tiny run converted for ONNX Runtime, dense routing."""
    from amoe_sdk.converters.convert import ConvertOptions, convert

    return convert(tiny_run, tmp_path_factory.mktemp("bundles") / "tiny-onnx", ConvertOptions(target="onnx"))


@pytest.fixture(scope="session")
def intel_bundle(tiny_run, tmp_path_factory):
    """The tiny run converted for OpenVINO, dense routing."""
    from amoe_sdk.converters.convert import ConvertOptions, convert

    return convert(tiny_run, tmp_path_factory.mktemp("bundles") / "tiny-ov", ConvertOptions(target="intel"))
