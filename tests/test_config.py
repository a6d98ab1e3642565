import pytest

from amoe_sdk.config import AmoeConfig, load_config
from amoe_sdk.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    config = load_config(overrides={"train.steps": 7, "model.global.num_experts": 1})
    config.save_yaml(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == config
    assert again.train.steps == 7 and again.model.global_.num_experts == 1


def test_unknown_key_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(tmp_path / "c.yaml")


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="integer"):
        AmoeConfig.from_dict({"train": {"steps": "many"}})


def test_top_k_beyond_experts_is_an_error():
    with pytest.raises(ConfigError, match="top_k"):
        load_config(overrides={"model.router.top_k": 99})


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_an_unknown_residual_whitening_is_an_error():
    with pytest.raises(ConfigError, match="model.patch.residual_whitening='sometimes'"):
        load_config(overrides={"model.patch.residual_whitening": "sometimes"})
