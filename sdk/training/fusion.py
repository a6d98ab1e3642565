"""How much each level counts in the fused map, measured per product at the end of training.

The router is trained on normal images only, so it cannot know which level will see a defect; with equal fixed
shares, a level that cannot tell this product's normal images from anomalous ones (the component level on a
texture, the global level under pose and lighting variation) adds only noise, and the noise hides what the other
levels see. So each level is scored alone on the held-out normal images against pseudo-anomalies made from
them, and its share follows that score (the measurements are in the README, "The detector").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from amoe_sdk.calibration.pseudo_anomalies import PSEUDO_KINDS, synthesise, synthesise_subtle
from amoe_sdk.evaluation.metrics import auroc
from amoe_sdk.models.detector import LEVELS, AnomalyMoE
from amoe_sdk.models.encoders import EncoderFeatures


# A candidate (a whitening form, a set of levels for the map) replaces the baseline only if it removes this share of
# the baseline's pseudo-anomaly error (1 - AUROC): relative, as image AUROCs saturate on objects while their pixel
# AUROCs still differ; a smaller share is within the noise.
MIN_ERROR_REDUCTION = 0.1
# A level whose measured share is below this is left out (share 0): it moves no score by more than this share of the
# map's range, yet a folded bundle keeps its experts and pays for them on every frame (a global level that cleared
# chance by a hair took 0.04 % of kit's map and kept 0.14 GFLOPs of experts in its folded bundle).
MIN_LEVEL_SHARE = 0.01
# The calibration's forward passes run in batches of this many images; ``encode_in_batches`` caches the encoder's
# features in the same batches, so that a candidate's maps are those of a full pass bit for bit.
CALIBRATION_BATCH = 8


def best_removing_enough_error(separation: dict, candidates, baseline):
    """The candidate with the best mean pseudo-anomaly AUROC in ``separation`` if it removes
    ``MIN_ERROR_REDUCTION`` of the ``baseline``'s error (1 - AUROC), else the baseline."""
    best = max(candidates, key=lambda candidate: separation[candidate]["mean"])
    if 1.0 - separation[best]["mean"] > (1.0 - MIN_ERROR_REDUCTION) * (1.0 - separation[baseline]["mean"]):
        return baseline
    return best


def _level_passes(model: AnomalyMoE, images: torch.Tensor, batch_size: int, features: list[EncoderFeatures] | None):
    """Per batch of uint8 ``images``, each level's map and score (``AnomalyMoE.level_outputs``); with ``features``
    (``encode_in_batches``) only the experts run."""
    for index, start in enumerate(range(0, len(images), batch_size)):
        batch = images[start : start + batch_size].float()
        yield model.level_outputs(model(batch) if features is None else model.forward_features(features[index], batch))


@torch.no_grad()
def level_outputs(
    model: AnomalyMoE, images: torch.Tensor, level: int, batch_size: int = CALIBRATION_BATCH,
    features: list[EncoderFeatures] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each level's own image score (its routed map, upsampled, blurred, top-percent mean) and the map of level
    ``level``: uint8 [N, 3, S, S] -> (scores [N, L], maps [N, S, S]). ``features``: the images' encoder features
    in these batches (``encode_in_batches``), so that only the experts run."""
    scores, maps = [], []
    for level_maps, level_scores_ in _level_passes(model, images, batch_size, features):
        scores.append(level_scores_.numpy())
        maps.append(level_maps[:, level].numpy())
    return np.concatenate(scores), np.concatenate(maps)


@torch.no_grad()
def encode_in_batches(model: AnomalyMoE, images: torch.Tensor, batch_size: int = CALIBRATION_BATCH) -> list[EncoderFeatures]:
    """The frozen encoder's features of uint8 images [N, 3, S, S] in ``level_outputs``' batches. A calibration scores
    up to 23 candidates on the same images, and the encoder took a fifth of its time (96 -> 75 s per product on the
    sample range); in the same batches its features are the same bit for bit, so the choices are those of full
    forward passes."""
    return [model.encode(images[start : start + batch_size].float()) for start in range(0, len(images), batch_size)]


def level_scores(
    model: AnomalyMoE, images: torch.Tensor, batch_size: int = CALIBRATION_BATCH, features: list[EncoderFeatures] | None = None,
) -> np.ndarray:
    """Each level's own image score: uint8 [N, 3, S, S] -> [N, L]."""
    return level_outputs(model, images, 0, batch_size, features)[0]


@dataclass
class PseudoAnomalies:
    """``images``: uint8 [M, 3, S, S]; ``masks``: bool [M, S, S], where pixels changed."""

    images: torch.Tensor
    masks: np.ndarray


def pseudo_anomaly_sets(val_images: torch.Tensor, seed: int) -> dict[str, PseudoAnomalies]:
    """From held-out normals (uint8 [N, 3, S, S]): 2N blatant pseudo-anomalies (cut-paste, Perlin, region swaps)
    and N subtle ones, at the normals' own contrast -> {"blatant", "subtle"}."""
    normals = val_images.permute(0, 2, 3, 1).numpy()
    blatant = synthesise(normals, 2 * len(normals), seed=seed, kinds=PSEUDO_KINDS)
    subtle = synthesise_subtle(normals, len(normals), seed=seed)[:2]
    return {
        name: PseudoAnomalies(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), masks.astype(bool))
        for name, (images, masks) in (("blatant", blatant), ("subtle", subtle))
    }


# The encoder features of the held-out normals ("normal") and of each pseudo-anomaly set (by its name), in
# ``level_outputs``' batches.
Encoded = dict[str, list[EncoderFeatures]]


def encode_calibration_images(model: AnomalyMoE, val_images: torch.Tensor, sets: dict[str, PseudoAnomalies]) -> Encoded:
    """``encode_in_batches`` of the held-out normals (uint8 [N, 3, S, S]), "normal", and of each pseudo-anomaly set,
    by its name."""
    images = {"normal": val_images, **{name: pseudo.images for name, pseudo in sets.items()}}
    return {name: encode_in_batches(model, batch) for name, batch in images.items()}


def chance_spread(n_normal: int, n_anomalous: int) -> float:
    """The standard deviation of the AUROC of a score that cannot tell the two groups apart (Mann-Whitney's null:
    sqrt((n0 + n1 + 1) / (12 n0 n1))): with 15 held-out normals and 15 pseudo-anomalies, 0.107, so an AUROC
    of 0.6 is within one spread of chance."""
    return float(np.sqrt((n_normal + n_anomalous + 1) / (12 * n_normal * n_anomalous)))


@torch.no_grad()
def calibrate_level_weights(
    model: AnomalyMoE, val_images: torch.Tensor, base: list[float], seed: int, sets: dict[str, PseudoAnomalies] | None = None,
    encoded: Encoded | None = None,
) -> dict:
    """Set ``model.level_weights`` from each level's image AUROC on held-out normal images (uint8 [N, 3, S, S])
    against 2N blatant pseudo-anomalies (cut-paste, Perlin, region swaps) and, separately, N subtle ones made
    from them. A level's separation is the lower of its two AUROCs less one chance spread (``chance_spread``) of
    that set, and share_l = base_l * max(separation_l - 0.5, 0)^2 / std_l, normalised, with std_l the spread of
    the level's image score on the normal images: a level counts by how well it separates the set it separates
    worse, beyond what chance gives with this many images, in units of its own noise. Blatant pseudo-anomalies
    are seen by every level, the global one included, so their AUROC alone gave shares to levels at chance on the
    real defects (the measurements are in the README); a level must also see anomalies at the normals' own
    contrast to add more than noise. The square leans towards the level that separates best without silencing
    one that helps (on pins the component level still adds to the patch level). Where no level separates beyond
    chance, the separations without the chance spread decide; where no level beats 0.5 either, the base shares
    stay. A share below ``MIN_LEVEL_SHARE`` becomes 0 and the others are renormalised. -> the record the
    checkpoint keeps."""
    model.eval()
    sets = pseudo_anomaly_sets(val_images, seed) if sets is None else sets
    encoded = encoded or {}
    normal = level_scores(model, val_images, features=encoded.get("normal"))
    present = model.level_matrix.sum(dim=1) > 0
    separation_by_set, beyond_chance = {}, []
    for name, pseudo in sets.items():
        scores = np.concatenate([normal, level_scores(model, pseudo.images, features=encoded.get(name))])
        labels = np.r_[np.zeros(len(normal)), np.ones(len(pseudo.images))]
        separation_by_set[name] = np.array([auroc(labels, scores[:, i]) if present[i] else 0.5 for i in range(len(LEVELS))])
        beyond_chance.append(separation_by_set[name] - chance_spread(len(normal), len(pseudo.images)))
    noise = normal.std(axis=0, ddof=1) if len(normal) > 1 else np.ones(len(LEVELS))
    noise = np.maximum(noise, 0.1 * np.median(noise[present.numpy()]) + 1e-12)  # a near-constant level cannot take it all
    candidates = {
        "beyond_chance": np.minimum.reduce(beyond_chance),
        "above_half": np.minimum.reduce(list(separation_by_set.values())),
    }
    decided_by = "base"
    shares = base_shares = np.asarray(base, dtype=np.float64) * present.numpy()
    for name, separation in candidates.items():
        measured = base_shares * np.maximum(separation - 0.5, 0.0) ** 2 / noise
        if measured.sum() > 0:
            decided_by, shares = name, measured
            break
    shares = shares / shares.sum()
    # The largest share is at least 1 / levels, so one always stays.
    negligible = [level for i, level in enumerate(LEVELS) if 0 < shares[i] < MIN_LEVEL_SHARE]
    shares = np.where(shares >= MIN_LEVEL_SHARE, shares, 0.0)
    model.level_weights.copy_(torch.tensor(shares / shares.sum(), dtype=torch.float32))
    return {
        "rule": "base share x max(min over pseudo-anomaly sets of (AUROC - chance spread) - 0.5, 0)^2 / normal score "
        "std of each level alone on held-out normals vs blatant and subtle pseudo-anomalies",
        "pseudo_auroc": {
            name: {level: float(values[i]) for i, level in enumerate(LEVELS) if present[i]}
            for name, values in separation_by_set.items()
        },
        "normal_score_std": {level: float(noise[i]) for i, level in enumerate(LEVELS) if present[i]},
        "level_weights": {level: float(model.level_weights[i]) for i, level in enumerate(LEVELS)},
        "images": {"normal": len(val_images), **{name: len(pseudo.images) for name, pseudo in sets.items()}},
        "decided_by": decided_by,
        "left_out_below_min_share": negligible,
    }


@torch.no_grad()
def all_level_maps(
    model: AnomalyMoE, images: torch.Tensor, batch_size: int = CALIBRATION_BATCH, features: list[EncoderFeatures] | None = None,
) -> np.ndarray:
    """Each level's own map, upsampled and blurred as the fused map is: uint8 [N, 3, S, S] -> [N, L, S, S]."""
    return np.concatenate([level_maps.numpy() for level_maps, _ in _level_passes(model, images, batch_size, features)])


@torch.no_grad()
def choose_map_levels(
    model: AnomalyMoE, val_images: torch.Tensor, seed: int, sets: dict[str, PseudoAnomalies] | None = None,
    encoded: Encoded | None = None,
) -> dict:
    """Set ``model.map_level_weights``, the levels' shares of the map a person reads, once ``level_weights`` are
    measured: the score's shares restricted to the subset of its levels whose fused map best locates the
    pseudo-anomalies (pixel AUROC over held-out normals, uint8 [N, 3, S, S], and their blatant and subtle
    pseudo-anomalies, mean of the two), if it removes ``MIN_ERROR_REDUCTION`` of the error of all of them.

    A level can tell an image apart without locating what it sees: on pins the component level finds a missing pin
    from the other pins' area and paints them all (its map alone 0.73 pixel AUROC on blatant pseudo-anomalies
    against the patch level's 0.95), so in the score it helps and in the map it hides the defect. Each level's map
    is made as the fused one (upsampled, blurred) and the fusion is linear, so each subset's map is a weighted sum
    of the level maps; ``level_weights`` sum to 1, so at least one level has a share. -> the record the checkpoint
    keeps."""
    model.eval()
    shares = model.level_weights.numpy().astype(np.float64)
    scored = [i for i in range(len(LEVELS)) if shares[i] > 0]
    subsets = [tuple(s) for size in range(len(scored), 0, -1) for s in itertools.combinations(scored, size)]
    sets = pseudo_anomaly_sets(val_images, seed) if sets is None else sets
    encoded = encoded or {}
    normal_maps = all_level_maps(model, val_images, features=encoded.get("normal"))
    pseudo_maps = {name: all_level_maps(model, pseudo.images, features=encoded.get(name)) for name, pseudo in sets.items()}

    def restricted(subset: tuple[int, ...]) -> np.ndarray:
        kept = np.zeros_like(shares)
        kept[list(subset)] = shares[list(subset)]
        return kept / kept.sum()

    separation = {}
    for subset in subsets:
        weights = restricted(subset)
        normal = np.einsum("l,nlhw->nhw", weights, normal_maps).ravel()
        by_set = {}
        for name, pseudo in sets.items():
            anomalous = np.einsum("l,nlhw->nhw", weights, pseudo_maps[name]).ravel()
            labels = np.r_[np.zeros(normal.size, bool), pseudo.masks.ravel()]
            by_set[f"{name} pixel"] = auroc(labels, np.r_[normal, anomalous])
        separation[subset] = {**by_set, "mean": float(np.mean(list(by_set.values())))}
    chosen = best_removing_enough_error(separation, subsets, baseline=subsets[0])
    model.map_level_weights.copy_(torch.tensor(restricted(chosen), dtype=torch.float32))
    name = lambda subset: "+".join(LEVELS[i] for i in subset)  # noqa: E731
    return {
        "rule": f"the score's level shares over the subset of its levels with the best pixel AUROC on held-out normals vs "
        f"blatant and subtle pseudo-anomalies, if it removes {MIN_ERROR_REDUCTION:.0%} of the error of all of them together",
        "pixel_auroc_by_levels": {name(subset): value for subset, value in separation.items()},
        "levels": name(chosen),
        "map_level_weights": {level: float(model.map_level_weights[i]) for i, level in enumerate(LEVELS)},
    }
