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
    assert set(fusion["pseudo_auroc"]) == {"blatant", "subtle"}
    assert all(set(by_level) == {"patch", "component", "global"} for by_level in fusion["pseudo_auroc"].values())
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

    def separating(model_, batch, batch_size=8, features=None):  # patch separates, component is noise, global points the wrong way
        anomalous = bool(calls)  # the first call scores the normal images, the second the pseudo-anomalies
        calls.append(len(batch))
        n = len(batch)
        patch = rng.uniform(1, 2, n) if anomalous else rng.uniform(0, 1, n)
        glob = rng.uniform(0, 1, n) if anomalous else rng.uniform(1, 2, n)
        return np.stack([patch, rng.uniform(0, 1, n), glob], axis=1)

    monkeypatch.setattr(fusion, "level_scores", separating)
    record = fusion.calibrate_level_weights(model, images, [1.0, 1.0, 1.0], seed=0)
    assert record["level_weights"]["patch"] > 0.9 and record["level_weights"]["global"] == 0.0
    monkeypatch.setattr(fusion, "level_scores", lambda m, b, batch_size=8, features=None: np.zeros((len(b), 3)))
    record = fusion.calibrate_level_weights(model, images, [1.0, 2.0, 1.0], seed=0)
    assert record["decided_by"] == "base" and model.level_weights.tolist() == pytest.approx([0.25, 0.5, 0.25])


def test_a_level_with_a_negligible_share_is_left_out(tiny_run, monkeypatch):
    import numpy as np
    import torch

    import amoe_sdk.training.fusion as fusion

    model, _ = load_detector(tiny_run)
    images = torch.zeros(4, 3, 128, 128, dtype=torch.uint8)
    rng = np.random.default_rng(0)
    calls = []

    def scores(model_, batch, batch_size=8, features=None):
        # The component level separates every set, but its normal scores spread a thousand times the patch
        # level's: its share, (separation - 0.5)^2 / spread, is a few ten-thousandths of the map.
        anomalous = bool(calls)
        calls.append(len(batch))
        n = len(batch)
        patch = rng.uniform(1, 2, n) if anomalous else rng.uniform(0, 1, n)
        component = 4000 + rng.uniform(0, 1, n) if anomalous else 1000.0 * np.arange(n)
        return np.stack([patch, component, rng.uniform(0, 1, n)], axis=1)

    monkeypatch.setattr(fusion, "level_scores", scores)
    record = fusion.calibrate_level_weights(model, images, [1.0, 1.0, 1.0], seed=0)
    assert record["pseudo_auroc"]["blatant"]["component"] == 1.0 and record["pseudo_auroc"]["subtle"]["component"] == 1.0
    assert record["left_out_below_min_share"] == ["component"]
    assert model.level_weights.tolist() == [1.0, 0.0, 0.0]


def test_a_level_that_sees_only_blatant_pseudo_anomalies_gets_no_share(tiny_run, monkeypatch):
    import numpy as np
    import torch

    import amoe_sdk.training.fusion as fusion

    model, _ = load_detector(tiny_run)
    images = torch.zeros(6, 3, 128, 128, dtype=torch.uint8)
    calls = []

    def blatant_only_global(model_, batch, batch_size=8, features=None):  # normal images, then blatant, then subtle pseudo-anomalies
        kind = ("normal", "blatant", "subtle")[len(calls)]
        calls.append(kind)
        spread = np.linspace(0, 1, len(batch))
        patch = spread + 2 * (kind != "normal")
        glob = spread + 2 * (kind == "blatant")  # as far from the normals as the patch level, on blatant ones only
        return np.stack([patch, np.zeros(len(batch)), glob], axis=1)

    monkeypatch.setattr(fusion, "level_scores", blatant_only_global)
    record = fusion.calibrate_level_weights(model, images, [1.0, 1.0, 1.0], seed=0)
    assert calls == ["normal", "blatant", "subtle"]
    assert record["pseudo_auroc"]["blatant"]["global"] == 1.0 and record["pseudo_auroc"]["subtle"]["global"] == 0.5
    assert record["level_weights"] == {"patch": 1.0, "component": 0.0, "global": 0.0}
    assert record["decided_by"] == "beyond_chance"

    calls.clear()

    def slightly_separating(model_, batch, batch_size=8, features=None):  # the patch level above 0.5, but within chance
        shift = 0.0 if not calls else 0.15  # the first call scores the normal images
        calls.append("any")
        spread = np.linspace(0, 1, len(batch))
        return np.stack([spread + shift, np.zeros(len(batch)), spread], axis=1)

    monkeypatch.setattr(fusion, "level_scores", slightly_separating)
    record = fusion.calibrate_level_weights(model, images, [1.0, 1.0, 1.0], seed=0)
    assert 0.5 < record["pseudo_auroc"]["subtle"]["patch"] < 0.5 + fusion.chance_spread(6, 6)
    assert record["decided_by"] == "above_half" and record["level_weights"]["patch"] == 1.0


def test_a_checkpoint_from_before_measured_shares_loads_with_its_fixed_ones(tiny_run, tmp_path):
    import torch

    payload = torch.load(tiny_run / "model.pt", weights_only=True)
    del payload["state_dict"]["level_weights"]
    del payload["config"]["model"]["postprocess"]["level_weighting"]
    torch.save(payload, tmp_path / "model.pt")
    model, _ = load_detector(tmp_path)
    assert model.config.postprocess.level_weighting == "fixed"
    assert model.level_weights.tolist() == pytest.approx([1 / 3] * 3)


def test_whitening_sees_a_feature_that_grows_without_turning():
    """A residual that keeps the feature's direction is invisible to the cosine map and plain in the whitened one."""
    import torch

    from amoe_sdk.config import PatchExpertConfig
    from amoe_sdk.models.experts import PatchExpert

    expert = PatchExpert(PatchExpertConfig(embed_dim=8, bottleneck_hidden=8, depth=1, num_heads=2), [3, 5], grid_size=4).eval()
    expert.reconstruct = lambda tokens: (0.5 * tokens, tokens.mean(dim=1))  # right direction, half the size
    tokens = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    tokens[0, 5] *= 4.0  # one position's feature grows
    expert.residual_gain.copy_(torch.tensor([1.0, 1.0]))
    with torch.no_grad():
        whitened = expert(tokens).anomaly_map.flatten()
        expert.residual_gain.zero_()
        cosine = expert(tokens).anomaly_map.flatten()
    assert cosine.abs().max() < 1e-5  # the cosine map misses it
    assert int(whitened.argmax()) == 5 and whitened[5] > 4 * whitened[torch.arange(16) != 5].max()


def test_the_subspace_form_sees_a_residual_that_leaves_the_normal_directions():
    """Normal residuals vary widely along one direction of two channels; a residual across it, no larger per
    channel than the normal spread, is plain in the subspace form and lost in the diagonal one."""
    import torch

    from amoe_sdk.config import PatchExpertConfig
    from amoe_sdk.models.experts import PatchExpert

    config = PatchExpertConfig(embed_dim=8, bottleneck_hidden=8, depth=1, num_heads=2, residual_subspace_dim=1)
    expert = PatchExpert(config, [3, 5], grid_size=4).eval()
    generator = torch.Generator().manual_seed(0)
    along, across = torch.zeros(8), torch.zeros(8)
    along[:2] = torch.tensor([1.0, 1.0]) / 2**0.5
    across[:2] = torch.tensor([1.0, -1.0]) / 2**0.5
    residual = 0.01 * torch.randn(1, 16, 8, generator=generator)
    residual += 3.0 * torch.randn(1, 16, 1, generator=generator) * along  # the normal variation
    residual[0, 5] += 1.0 * across  # one position leaves it
    expert.residual_std.copy_(residual[0].std(dim=0).clamp_min(1e-3).expand(16, 8))  # the per-channel spread
    expert.residual_basis[:, :, 0] = along
    expert.residual_basis_weight.fill_(1e-3)  # floor / (variance + floor) with a variance of 9
    with torch.no_grad():
        diagonal, subspace = expert.whitened_residuals(residual, torch.zeros_like(residual))
    others = torch.arange(16) != 5
    assert int(subspace[0].argmax()) == 5 and subspace[0, 5] > 10 * subspace[0, others].max()
    assert diagonal[0][0, 5] < diagonal[0][0, others].max()  # within the channels' normal spread


def test_whitening_is_fitted_and_its_form_chosen_per_product(measured_run):
    import torch

    from amoe_sdk.checkpoint import read_checkpoint
    from amoe_sdk.training.whitening import CANDIDATES

    record = read_checkpoint(measured_run)["calibration"]["whitening"]
    assert (record["form"], record["gain"]) in CANDIDATES
    assert set(record["patch_auroc_by_candidate"]) == {f"{form} {gain}" for form, gain in CANDIDATES}
    keys = {f"{kind} {level}" for kind in ("blatant", "subtle") for level in ("image", "pixel")} | {"mean"}
    assert all(set(v) == keys for v in record["patch_auroc_by_candidate"].values())
    model, payload = load_detector(measured_run)
    grid = model.grid_size
    used = len(payload["train_images"]) - 1  # the directions the training images span
    for expert in model.patch_experts:
        assert expert.whitened and expert.residual_mean.shape == (grid * grid, sum(expert.tap_channels))
        assert bool((expert.residual_std > 0).all()) and bool(expert.residual_std.std() > 0)  # fitted, not the ones
        basis = expert.residual_basis[:, :, : min(used, expert.residual_basis.shape[-1])]
        gram = basis.transpose(1, 2) @ basis
        assert torch.allclose(gram, torch.eye(gram.shape[-1]).expand_as(gram), atol=1e-4)  # orthonormal per position
        weights = expert.residual_basis_weight
        assert bool(((weights > 0) & (weights <= 1)).all()) and bool((weights[:, :-1] <= weights[:, 1:] + 1e-6).all())
        assert bool((expert.residual_gain == 0).all()) == (record["form"] != "diagonal")
        assert bool((expert.residual_subspace_gain == 0).all()) == (record["form"] != "subspace")


def test_a_form_is_kept_only_when_it_separates_pseudo_anomalies_better(measured_run, monkeypatch):
    import numpy as np
    import torch

    import amoe_sdk.training.whitening as whitening
    from amoe_sdk.training.fusion import PseudoAnomalies

    model, _ = load_detector(measured_run)
    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    ratios = whitening.SpreadRatios([torch.ones(len(e.tap_channels)) for e in model.patch_experts], [1.0] * len(model.patch_experts))
    renormalised = []

    def outputs_by_subspace_gain(step):  # the patch level's score separates by the subspace gain, times ``step``
        def level_outputs(model_, batch, level, batch_size=8, features=None):
            gain = float(model_.patch_experts[0].residual_subspace_gain[0])
            anomalous = float(batch.float().mean() > 0)
            base = np.linspace(0, 1, len(batch))
            return np.stack([base + (0.2 + step * gain) * anomalous, base, base], axis=1), np.zeros((len(batch), 16, 16))
        return level_outputs

    pseudo = PseudoAnomalies(images + 1, np.ones((4, 16, 16), bool))
    monkeypatch.setattr(whitening, "pseudo_anomaly_sets", lambda v, seed: {"blatant": pseudo, "subtle": pseudo})
    monkeypatch.setattr(whitening, "level_outputs", outputs_by_subspace_gain(1.0))
    record = whitening.choose_whitening(model, ratios, images, lambda: renormalised.append(1), seed=0)
    # 0.5 does not yet separate every pair, 1.0 does, and the first best candidate wins.
    assert (record["form"], record["gain"]) == ("subspace", 1.0)
    assert float(model.patch_experts[0].residual_subspace_gain[0]) == 1.0
    assert float(model.patch_experts[0].residual_gain.abs().max()) == 0
    assert len(renormalised) == len(whitening.CANDIDATES) + 1  # once per candidate, once for the choice
    monkeypatch.setattr(whitening, "level_outputs", outputs_by_subspace_gain(0.0))  # no candidate does better
    record = whitening.choose_whitening(model, ratios, images, lambda: None, seed=0)
    assert record["form"] == "cosine" and all(float(e.residual_subspace_gain.abs().max()) == 0 for e in model.patch_experts)


def test_a_checkpoint_with_diagonal_whitening_only_loads_with_the_same_maps(measured_run, tmp_path):
    import torch

    from amoe_sdk.checkpoint import SUBSPACE_BUFFERS

    payload = torch.load(measured_run / "model.pt", weights_only=True)
    for key in [k for k in payload["state_dict"] if k.endswith(".residual_subspace_gain")]:
        payload["state_dict"][key] = torch.zeros_like(payload["state_dict"][key])
    torch.save(payload, tmp_path / "model.pt")
    reference, _ = load_detector(tmp_path)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if k.rsplit(".", 1)[-1] not in SUBSPACE_BUFFERS}
    older = tmp_path / "older"
    older.mkdir()
    torch.save(payload, older / "model.pt")
    model, _ = load_detector(older)
    images = torch.randint(0, 255, (2, 3, model.config.input_size, model.config.input_size)).float()
    with torch.no_grad():
        assert torch.equal(model(images).anomaly_map, reference(images).anomaly_map)


def test_a_checkpoint_from_before_whitening_loads_with_the_cosine_maps_alone(measured_run, tmp_path):
    import torch

    payload = torch.load(measured_run / "model.pt", weights_only=True)
    assert any(".residual_" in k for k in payload["state_dict"])
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if ".residual_" not in k}
    del payload["config"]["model"]["patch"]["residual_whitening"]
    torch.save(payload, tmp_path / "model.pt")
    model, _ = load_detector(tmp_path)
    assert model.config.patch.residual_whitening == "off" and not any(e.whitened for e in model.patch_experts)


def test_the_composition_distance_sees_a_missing_part_that_no_position_shows(tiny_run):
    import torch

    from amoe_sdk.models.encoders import EncoderFeatures
    from amoe_sdk.training.composition import fit_composition

    model, _ = load_detector(tiny_run)
    assigner = model.assigner
    channels, grid = assigner.prototypes.shape[1], assigner.component_grid
    # Three components by value: background (0), parts (+5), their shadows (-5); every normal image holds about
    # 12 part and 6 shadow positions at random places, the anomalous one lacks a part (8 positions fewer).
    assigner.prototypes.copy_(torch.tensor([[0.0], [5.0], [-5.0]]).expand(3, channels))
    assigner.component_mean.zero_()
    assigner.component_std.fill_(1.0)
    generator = torch.Generator().manual_seed(0)

    def images(count: int, parts: int) -> EncoderFeatures:
        components = torch.zeros(count, channels, grid, grid)
        for i in range(count):
            order = torch.randperm(grid * grid, generator=generator)
            n_parts = parts + int(torch.randint(-1, 2, (1,), generator=generator))
            components[i].view(channels, -1)[:, order[:n_parts]] = 5.0
            components[i].view(channels, -1)[:, order[n_parts : n_parts + 6]] = -5.0
        taps = torch.randn(count, len(model.feature_mean), model.grid_size, model.grid_size, generator=generator)
        return EncoderFeatures(model.feature_mean.view(1, -1, 1, 1) + taps * model.feature_std.view(1, -1, 1, 1), None, components)

    normal, anomalous = images(40, 12), images(1, 4)
    record = fit_composition(model, normal, gain=1.0)
    distance = lambda f: assigner(model.standardise(f.taps), f.components).composition.sum(dim=1)  # noqa: E731
    assert distance(anomalous).item() > 3 * record["normal_distance"]["max"]
    expert = model.component_experts[0]
    slots = assigner(model.standardise(anomalous.taps), anomalous.components)
    with_term = expert(slots).anomaly_map
    expert.composition_scale.zero_()
    without = expert(slots).anomaly_map
    assert record["composition_scale"][0] > 0
    # The part's component (slot 1) lights up by its term of the distance; nothing else changes.
    terms = slots.composition.clamp_min(0.0)
    assert terms[0, 1] > 0.5 * distance(anomalous).item()
    painted = record["composition_scale"][0] * (terms.view(1, -1, 1, 1) * slots.masks).sum(dim=1, keepdim=True)
    assert torch.allclose(with_term - without, painted, atol=1e-5)


def test_a_checkpoint_from_before_the_component_grid_loads_with_components_on_the_main_grid(tiny_run, tmp_path):
    import torch

    from amoe_sdk.checkpoint import COMPOSITION_BUFFERS

    payload = torch.load(tiny_run / "model.pt", weights_only=True)
    payload["config"]["model"]["encoder"]["component_taps"] = []
    payload["config"]["model"]["component"]["composition_gain"] = 0.0
    channels = len(payload["state_dict"]["feature_mean"])
    k = payload["state_dict"]["assigner.prototypes"].shape[0]
    payload["state_dict"]["assigner.prototypes"] = torch.randn(k, channels)
    for key in [k for k in payload["state_dict"] if k.rsplit(".", 1)[-1] in COMPOSITION_BUFFERS]:
        del payload["state_dict"][key]
    older = dict(payload, config={**payload["config"], "model": dict(payload["config"]["model"])})
    older["config"]["model"]["encoder"] = {k: v for k, v in payload["config"]["model"]["encoder"].items() if not k.startswith("component_")}
    older["config"]["model"]["component"] = {k: v for k, v in payload["config"]["model"]["component"].items() if k != "composition_gain"}
    torch.save(older, tmp_path / "model.pt")
    model, _ = load_detector(tmp_path)
    assert model.config.encoder.component_taps == [] and model.config.component.composition_gain == 0.0
    assert model.assigner.component_grid == model.grid_size
    images = torch.randint(0, 255, (1, 3, model.config.input_size, model.config.input_size)).float()
    with torch.no_grad():
        assert torch.isfinite(model(images).anomaly_map).all()


def test_the_patch_memory_finds_a_normal_looking_patch_that_no_training_image_has_there():
    import torch

    from amoe_sdk.models.memory import PatchMemory, k_centre_coreset

    generator = torch.Generator().manual_seed(0)
    points = torch.randn(500, 8, generator=generator) * 0.1
    points[123] = 5.0  # one rare normal patch
    coreset = k_centre_coreset(points, 20, generator)
    assert any(torch.equal(row, points[123]) for row in coreset)  # the farthest point is always kept
    assert torch.equal(k_centre_coreset(points[:3], 5, generator), points[[0, 1, 2, 0, 1]])  # too few: all, repeated

    memory = PatchMemory(256, 8, grid_size=4)  # room for all 160 training neighbourhoods
    normal = torch.randn(10, 16, 8, generator=generator)
    memory.fit(normal, generator)
    seen = memory(normal[:2])
    odd = normal[:2].clone()
    odd[:, 5, 0] = odd[:, 5, 0] + 60.0  # one position unlike any training one: its neighbourhood mean moves by 6.7
    found = memory(odd)
    assert found.shape == (2, 16) and float(seen.max()) < 1e-2
    assert bool((found[:, 5] > 4.0).all()) and bool((found[:, 15] < 1e-2).all())  # a corner outside its neighbourhood


def test_the_colour_deviation_finds_a_tinted_patch_whatever_the_image_s_shade_and_lighting():
    import torch

    from amoe_sdk.models.colour import ColourDeviation

    generator = torch.Generator().manual_seed(0)

    def texture(count, shade):  # a grey-brown grain, each image its own shade and lighting gain
        grain = torch.rand(count, 1, 64, 64, generator=generator) * 0.2 + 0.8
        base = torch.tensor([60.0, 90.0, 130.0]).view(1, 3, 1, 1) * shade.view(-1, 1, 1, 1)
        return (base * grain).clamp(0, 255)

    deviation = ColourDeviation(grid_size=8)
    deviation.fit(texture(20, torch.rand(20, generator=generator) * 0.6 + 0.7).to(torch.uint8))
    test = texture(2, torch.tensor([0.6, 1.4]))  # darker and brighter than any training image
    normal = deviation(test)
    tinted = test.clone()
    tinted[:, :, 16:24, 16:24] *= torch.tensor([0.8, 0.88, 0.86]).view(1, 3, 1, 1)  # darker and warmer: a stain
    found = deviation(tinted)
    assert normal.shape == (2, 64)
    cell = 2 * 8 + 2  # the stained cell
    assert bool((found[:, cell] > 3 * normal.max(dim=1).values).all())
    assert bool((found[:, cell] > 2 * found[:, cell + 2]).all())  # stays where the stain is


def test_the_memory_is_kept_at_the_largest_gain_that_costs_the_pseudo_anomalies_little(measured_run, monkeypatch):
    import numpy as np
    import torch

    import amoe_sdk.training.whitening as whitening
    from amoe_sdk.training.fusion import PseudoAnomalies
    from amoe_sdk.training.trainer import encode_all

    model, payload = load_detector(measured_run)
    val_images = torch.randint(0, 255, (4, 3, 128, 128), dtype=torch.uint8)
    train = encode_all(model, torch.randint(0, 255, (4, 3, 128, 128), dtype=torch.uint8))
    val = encode_all(model, val_images)
    pseudo = PseudoAnomalies(val_images, np.ones((4, 128, 128), bool))
    monkeypatch.setattr(whitening, "pseudo_anomaly_sets", lambda v, seed: {"blatant": pseudo, "subtle": pseudo})

    def separation_falling_with_the_gain(cost):
        def patch_separation(model_, images, sets, encoded=None):
            gain = float(model_.patch_experts[0].memory_gain[0]) / ratio[0]
            per_set = {"blatant image": 1.0, "blatant pixel": 0.95 - cost * gain, "subtle image": 1.0, "subtle pixel": 0.97}
            return {**per_set, "mean": float(np.mean(list(per_set.values())))}
        return patch_separation

    tokens = model.standardise(val.taps)
    for expert in model.patch_experts:
        expert.memory_gain.zero_()
    model.patch_memory.fit(model.standardise(train.taps), torch.Generator().manual_seed(0))
    with torch.no_grad():
        memory = model.memory_distances(tokens)
        ratio = [float(e(tokens, memory=memory).anomaly_map.std() / memory.std()) for e in model.patch_experts]
    # One pixel AUROC falls by 0.008 per unit of gain: 0.5 and 1.0 stay within one point, 2.0 does not.
    monkeypatch.setattr(whitening, "patch_separation", separation_falling_with_the_gain(0.008))
    record = whitening.choose_memory(model, train, val, val_images, lambda: None, seed=0)
    assert record["gain"] == 1.0
    assert np.allclose([float(e.memory_gain[0]) for e in model.patch_experts], ratio, rtol=1e-4)
    monkeypatch.setattr(whitening, "patch_separation", separation_falling_with_the_gain(0.03))  # costs too much
    record = whitening.choose_memory(model, train, val, val_images, lambda: None, seed=0)
    assert record["gain"] == 0.0 and all(float(e.memory_gain[0]) == 0 for e in model.patch_experts)
    model.drop_unused_map_terms()
    assert model.memory_distances(tokens) is None


def test_the_colour_term_is_kept_at_its_best_gain_only_where_it_removes_a_tenth_of_the_error(measured_run, monkeypatch):
    import numpy as np
    import torch

    import amoe_sdk.training.whitening as whitening
    from amoe_sdk.training.fusion import PseudoAnomalies
    from amoe_sdk.training.trainer import encode_all

    model, _ = load_detector(measured_run)
    size = model.config.input_size
    train_images = torch.randint(0, 255, (4, 3, size, size), dtype=torch.uint8)
    val_images = torch.randint(0, 255, (4, 3, size, size), dtype=torch.uint8)
    val = encode_all(model, val_images)
    pseudo = PseudoAnomalies(val_images, np.ones((4, size, size), bool))
    sets = {"blatant": pseudo, "subtle": pseudo}

    def separation_peaking_at_half(height):  # the subtle set gains up to gain 0.5, the blatant pixel AUROC falls
        def patch_separation(model_, images, sets_, encoded=None):
            gain = float(model_.patch_experts[0].colour_gain[0]) / ratio
            per_set = {"blatant image": 0.97, "blatant pixel": 0.74 - 0.1 * gain, "subtle image": 0.65 + height * min(gain, 0.5) - 0.1 * gain, "subtle pixel": 0.76}
            return {**per_set, "mean": float(np.mean(list(per_set.values())))}
        return patch_separation

    with torch.no_grad():
        model.colour.fit(train_images)
        deviations = model.colour(val_images.float())
        tokens = model.standardise(val.taps)
        ratio = float(model.patch_experts[0](tokens).anomaly_map.std() / deviations.std())
    monkeypatch.setattr(whitening, "patch_separation", separation_peaking_at_half(0.6))
    record = whitening.choose_colour(model, train_images, val, val_images, lambda: None, seed=0, sets=sets)
    assert record["gain"] == 0.5 and abs(float(model.patch_experts[0].colour_gain[0]) - 0.5 * ratio) < 1e-4 * ratio
    # The blatant pixel AUROC falls 5 points there: the memory's rule would have refused every gain.
    assert record["patch_auroc_by_gain"]["0.5"]["blatant pixel"] < record["patch_auroc_by_gain"]["0.0"]["blatant pixel"] - 0.01
    monkeypatch.setattr(whitening, "patch_separation", separation_peaking_at_half(0.1))  # best, but too little
    record = whitening.choose_colour(model, train_images, val, val_images, lambda: None, seed=0, sets=sets)
    assert record["gain"] == 0.0 and all(float(e.colour_gain[0]) == 0 for e in model.patch_experts)
    model.drop_unused_map_terms()
    assert model.colour_deviations(val_images.float()) is None


@pytest.mark.parametrize("colour_gain, memory_gain, passes", [(0.5, 0.0, 2), (0.0, 1.0, 2), (0.0, 0.0, 1)])
def test_the_whitening_is_chosen_again_with_the_map_terms_in_place(measured_run, monkeypatch, colour_gain, memory_gain, passes):
    import torch

    import amoe_sdk.training.trainer as trainer
    from amoe_sdk.config import AmoeConfig

    model, payload = load_detector(measured_run)
    config = AmoeConfig.from_dict(payload["config"], "test")
    size = model.config.input_size
    images = torch.randint(0, 255, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = trainer.encode_all(model, images)
    for expert in model.patch_experts:  # as trained: no map term yet
        expert.memory_gain.zero_()
        expert.colour_gain.zero_()
    seen = []  # each whitening pass: the gains of the map terms in the model when it was chosen

    def choose_whitening(model_, ratios, val_images, renormalise, seed, sets, encoded):
        expert = model_.patch_experts[0]
        seen.append((float(expert.colour_gain[0]), float(expert.memory_gain[0])))
        form = ("diagonal", 1.0) if len(seen) == 1 else ("diagonal", 0.5)
        return {"form": form[0], "gain": form[1], "patch_auroc_by_candidate": {"pass": len(seen)}}

    def choose_term(term, gain):
        def choose(model_, *args, **kwargs):
            for expert in model_.patch_experts:
                getattr(expert, f"{term}_gain").fill_(gain)
            return {"gain": gain}
        return choose

    monkeypatch.setattr(trainer, "choose_whitening", choose_whitening)
    monkeypatch.setattr(trainer, "choose_colour", choose_term("colour", colour_gain))
    monkeypatch.setattr(trainer, "choose_memory", choose_term("memory", memory_gain))
    record = trainer.calibrate_after_training(model, features, features, images, images, config)["whitening"]
    assert seen == [(0.0, 0.0), (colour_gain, memory_gain)][:passes]  # the second pass sees the terms in place
    assert record["colour"]["gain"] == colour_gain and record["memory"]["gain"] == memory_gain
    if passes == 1:
        assert (record["form"], record["gain"]) == ("diagonal", 1.0) and "without_terms" not in record
    else:
        assert (record["form"], record["gain"]) == ("diagonal", 0.5)
        assert record["without_terms"] == {"form": "diagonal", "gain": 1.0, "patch_auroc_by_candidate": {"pass": 1}}


@pytest.mark.parametrize(
    "term, config_key, left_out",
    [
        ("memory", "memory_size", lambda m: m.config.patch.memory_size == 0 and m.patch_memory is None),
        ("colour", "colour_deviation", lambda m: m.config.patch.colour_deviation is False and m.colour is None),
    ],
)
def test_a_checkpoint_from_before_a_map_term_loads_with_the_same_maps(measured_run, tmp_path, term, config_key, left_out):
    import torch

    payload = torch.load(measured_run / "model.pt", weights_only=True)
    gains = {k: v for k, v in payload["state_dict"].items() if k.endswith(f".{term}_gain")}
    assert gains, f"the default config has the {term} term"
    payload["state_dict"] = {**payload["state_dict"], **{k: torch.zeros_like(v) for k, v in gains.items()}}
    torch.save(payload, tmp_path / "model.pt")
    reference, _ = load_detector(tmp_path)
    module = "patch_memory." if term == "memory" else "colour."
    payload["state_dict"] = {
        k: v for k, v in payload["state_dict"].items() if not k.startswith(module) and not k.endswith(f".{term}_gain")
    }
    del payload["config"]["model"]["patch"][config_key]
    older = tmp_path / "older"
    older.mkdir()
    torch.save(payload, older / "model.pt")
    model, _ = load_detector(older)
    assert left_out(model)
    images = torch.randint(0, 255, (2, 3, model.config.input_size, model.config.input_size)).float()
    with torch.no_grad():
        assert torch.equal(model(images).anomaly_map, reference(images).anomaly_map)


def test_cached_encoder_features_give_the_calibration_the_full_passes_maps_bit_for_bit(measured_run):
    import numpy as np
    import torch

    from amoe_sdk.training.fusion import encode_calibration_images, level_outputs, pseudo_anomaly_sets
    from amoe_sdk.training.whitening import patch_separation

    model, _ = load_detector(measured_run)
    size = model.config.input_size
    images = torch.randint(0, 255, (12, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sets = pseudo_anomaly_sets(images, seed=0)
    encoded = encode_calibration_images(model, images, sets)
    assert [len(batch.taps) for batch in encoded["normal"]] == [8, 4]  # level_outputs' batches
    cached, full = level_outputs(model, images, 0, features=encoded["normal"]), level_outputs(model, images, 0)
    assert all(np.array_equal(a, b) for a, b in zip(cached, full))
    assert patch_separation(model, images, sets, encoded) == patch_separation(model, images, sets)
