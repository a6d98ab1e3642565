"""The map a person reads fuses the levels that locate; the score fuses every level that tells images apart."""

import numpy as np
import pytest
import torch

from amoe_sdk.checkpoint import load_detector, read_checkpoint
from amoe_sdk.converters.convert import measured_threshold
from amoe_sdk.converters.folding import fold_routing
from amoe_sdk.models.layers import top_percent_mean
from amoe_sdk.training.data import load_images


def _level_maps_where(masks_of, locating: list[int], painting: list[int]):
    """Fake ``all_level_maps``: the ``locating`` levels light the changed pixels, the ``painting`` ones every
    pixel of an anomalous image (a slot painted whole), the others are noise. ``masks_of``: images -> where their pixels changed."""

    def level_maps(model, images, batch_size=8, features=None):
        n, _, s, _ = images.shape
        masks = masks_of(images)
        rng = np.random.default_rng(n)
        maps = rng.uniform(0, 1, (n, 3, s, s))
        maps[:, locating] += masks[:, None]
        maps[:, painting] += masks.any(axis=(1, 2))[:, None, None, None]
        return maps

    return level_maps


def test_a_level_that_paints_where_it_cannot_locate_is_left_out_of_the_map_and_kept_in_the_score(tiny_run, sample_root, monkeypatch):
    import amoe_sdk.training.fusion as fusion

    model, _ = load_detector(tiny_run)
    model.level_weights.copy_(torch.tensor([0.6, 0.4, 0.0]))
    images = load_images(sorted((sample_root / "washer" / "train" / "good").glob("*.png"))[:6], 128)
    sets = fusion.pseudo_anomaly_sets(images, seed=0)
    # The pseudo-anomalies are made again inside with the same seed: told apart from the normals by their pixels.
    by_content = {images.numpy().tobytes(): np.zeros((len(images), 128, 128), bool)}
    by_content.update({p.images.numpy().tobytes(): p.masks for p in sets.values()})
    masks_of = lambda batch: by_content[batch.numpy().tobytes()]  # noqa: E731
    monkeypatch.setattr(fusion, "all_level_maps", _level_maps_where(masks_of, locating=[0], painting=[1]))
    record = fusion.choose_map_levels(model, images, seed=0)
    assert record["levels"] == "patch" and set(record["pixel_auroc_by_levels"]) == {"patch+component", "patch", "component"}
    assert model.map_level_weights.tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert model.level_weights.tolist() == pytest.approx([0.6, 0.4, 0.0])  # the score keeps both

    # Where both levels locate alike, no subset removes a tenth of the error: the map keeps the score's shares.
    monkeypatch.setattr(fusion, "all_level_maps", _level_maps_where(masks_of, locating=[0, 1], painting=[]))
    record = fusion.choose_map_levels(model, images, seed=0)
    assert record["levels"] == "patch+component"
    assert model.map_level_weights.tolist() == pytest.approx([0.6, 0.4, 0.0])


def test_the_detector_scores_with_the_score_shares_and_draws_the_map_with_the_map_shares(tiny_run, sample_root):
    model, _ = load_detector(tiny_run)
    model.level_weights.copy_(torch.tensor([0.5, 0.5, 0.0]))
    model.map_level_weights.copy_(torch.tensor([1.0, 0.0, 0.0]))
    images = load_images(sorted((sample_root / "washer" / "train" / "good").glob("*.png"))[:3], 128).float()
    with torch.no_grad():
        out = model(images)
        score_map, score = model.postprocess(model.fuse(out.expert_maps, out.router_logits, out.routing_weights))
        patch_map, _ = model.postprocess(
            model.fuse(out.expert_maps, out.router_logits, out.routing_weights, torch.tensor([1.0, 0.0, 0.0]))
        )
    assert torch.allclose(out.score, score, atol=1e-6)
    assert torch.allclose(out.anomaly_map, patch_map, atol=1e-6)
    assert not torch.allclose(out.anomaly_map, score_map, atol=1e-3)  # the two really differ here


def test_a_checkpoint_from_before_the_map_shares_loads_with_the_score_s_map(measured_run, tmp_path):
    payload = read_checkpoint(measured_run)
    state = {k: v for k, v in payload["state_dict"].items() if k != "map_level_weights"}
    assert len(state) == len(payload["state_dict"]) - 1  # written with them
    old = tmp_path / "old.pt"
    torch.save({**{k: v for k, v in payload.items() if k != "path"}, "state_dict": state}, old)
    model, _ = load_detector(old)
    assert model.map_level_weights.tolist() == pytest.approx(state["level_weights"].tolist())


def test_folding_keeps_the_map_shares_apart_from_the_score_s(tiny_run, sample_root):
    model, _ = load_detector(tiny_run)
    images = load_images(sorted((sample_root / "washer" / "train" / "good").glob("*.png"))[:4], 128)
    with torch.no_grad():
        model.router.mlp.fc2.weight.zero_()
        model.router.mlp.fc2.bias.copy_(torch.tensor([5.0, 0.0, 5.0, 0.0, 5.0, 0.0]))
    model.level_weights.copy_(torch.tensor([0.4, 0.3, 0.3]))
    model.map_level_weights.copy_(torch.tensor([1.0, 0.0, 0.0]))
    folded, report = fold_routing(model, images, min_agreement=0.95)
    assert report.map_fusion_weights == pytest.approx({"patch0": 1.0, "component0": 0.0, "global0": 0.0})
    with torch.no_grad():
        dense, small = model(images.float()), folded(images.float())
    assert torch.allclose(dense.anomaly_map, small.anomaly_map, atol=1e-5)
    assert torch.allclose(dense.score, small.score, atol=1e-5)


def test_the_pixel_threshold_is_measured_on_the_map_s_own_scale():
    maps = np.stack([np.full((1, 10, 10), v, np.float32) for v in (0.1, 0.2, 0.3)])
    maps[:, :, 0, 0] += 1.0  # one hot pixel: the top 1 % of 100 pixels
    map_scores = top_percent_mean(torch.from_numpy(maps.astype(np.float64)), 1.0).numpy()
    assert map_scores == pytest.approx([1.1, 1.2, 1.3])
    threshold = measured_threshold(np.array([2.0, 2.0, 2.0]), map_scores, 3.0, "test", "onnxruntime")
    assert threshold["image"] == pytest.approx(2.0) and threshold["pixel"] == pytest.approx(1.2 + 3.0 * 0.1)
