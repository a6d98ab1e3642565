"""Training AnomalyMoE on a folder of normal images, on the CPU, deterministically and resumably.

The encoder is frozen and there is no augmentation, so its features are computed once per image and cached;
each step then costs only the experts and the router.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from amoe_sdk.config import RANGE_STEPS, SINGLE_PRODUCT_STEPS, AmoeConfig
from amoe_sdk.data.layouts import Dataset
from amoe_sdk.data.products import describe_roots, read_products
from amoe_sdk.errors import DataError
from amoe_sdk.models.components import group_slot_offsets, kmeans
from amoe_sdk.models.detector import LEVELS, AnomalyMoE, ProductBuffers
from amoe_sdk.models.encoders import EncoderFeatures
from amoe_sdk.models.routing import product_routing, selection_summary
from amoe_sdk.training.composition import fit_composition
from amoe_sdk.training.data import load_images, split_train_val
from amoe_sdk.training.engine import RunLoop, StepFunction, find_resumable
from amoe_sdk.training.fusion import calibrate_level_weights, choose_map_levels, encode_calibration_images, pseudo_anomaly_sets
from amoe_sdk.training.losses import ClubEstimator, expert_selection_balancing, product_consistency, routed_reconstruction
from amoe_sdk.training.resume import check_batch_fits, check_resumable
from amoe_sdk.training.whitening import choose_colour, choose_memory, choose_whitening, fit_residual_statistics


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    seconds: float
    final_losses: dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def encode_all(model: AnomalyMoE, images: torch.Tensor, batch_size: int = 16, desc: str = "encode") -> EncoderFeatures:
    """Frozen-encoder features of uint8 images [N, 3, S, S] -> taps [N, C, G, G], descriptors [N, D], component
    taps [N, Cc, A, A]."""
    return EncoderFeatures.concat([
        model.encode(images[start : start + batch_size].float())
        for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit="batch")
    ])


def channel_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C, H, W] -> per-channel mean and std [C] (the std floored, so a dead channel does not divide by 0)."""
    return features.mean(dim=(0, 2, 3)), features.std(dim=(0, 2, 3)).clamp_min(1e-3)


def config_for_products(config: AmoeConfig, products: int) -> AmoeConfig:
    """The config ``products`` products train with, and their checkpoint carries: the default number of steps for
    one product or a range (``TrainConfig``) where ``train.steps`` is unset, and over a range a group of
    ``component.num_slots`` component slots for each product (``ComponentExpertConfig.slot_groups``)."""
    resolved = copy.deepcopy(config)
    if resolved.train.steps is None:
        resolved.train.steps = RANGE_STEPS if products > 1 else SINGLE_PRODUCT_STEPS
    if products > 1:
        resolved.model.component.slot_groups = products
    return resolved


@torch.no_grad()
def fit_feature_statistics(
    model: AnomalyMoE, train: EncoderFeatures, config: AmoeConfig, generator: torch.Generator, product: torch.Tensor | None = None,
) -> ProductBuffers | None:
    """Per-channel mean / std of the taps (and of the component taps) and the k-means component prototypes, from
    normal training images. With ``product`` [N] (each image's product index over a range, ``config_for_products``):
    each product's group of ``num_slots`` prototypes is fitted on its own images, and -> the products'
    ``ProductBuffers``, one row each (the model keeps the whole range's statistics). Over the mixed range, the
    statistics were the range's and k-means spent the slots on what tells the products apart (the measurements
    are in the README)."""
    assigner = model.assigner
    mean, std = channel_statistics(train.taps)
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)
    if train.components is not None:
        mean, std = channel_statistics(train.components)
        assigner.component_mean.copy_(mean)
        assigner.component_std.copy_(std)
    tokens = assigner.assignment_tokens(model.standardise(train.taps), train.components)
    component = config.model.component
    members = [slice(None)] if product is None else [product == p for p in range(component.slot_groups)]
    prototypes, statistics = [], []
    for rows in members:
        group = tokens[rows].reshape(-1, tokens.shape[-1])
        sample = group[torch.randperm(len(group), generator=generator)[:20000]]
        prototypes.append(kmeans(sample, component.num_slots, component.kmeans_iters, generator))
        if product is not None:
            statistics.append(channel_statistics(train.taps[rows]))
    assigner.prototypes.copy_(torch.cat(prototypes))
    if product is None:
        return None
    return ProductBuffers(
        torch.stack([m for m, _ in statistics]), torch.stack([s for _, s in statistics]),
        group_slot_offsets(component.slot_groups, component.num_slots),
    )


@torch.no_grad()
def calibrate_normalisation(model: AnomalyMoE, val: EncoderFeatures, val_images: torch.Tensor, config: AmoeConfig, refit: bool = True) -> dict:
    """Per-expert map statistics on normal validation images (never the test set), and their image scores.
    ``refit=False`` keeps the model's normalisation and only measures the scores (after the level shares
    changed)."""
    model.eval()
    maps, logits, weights = [], [], []
    for start in range(0, len(val_images), 16):
        chunk = val.select(slice(start, start + 16))
        chunk_logits, chunk_weights, outputs = model.run_experts(chunk, val_images[start : start + 16].float())
        maps.append(torch.cat([o.anomaly_map for o in outputs], dim=1))
        logits.append(chunk_logits)
        weights.append(chunk_weights)
    maps, logits, weights = torch.cat(maps), torch.cat(logits), torch.cat(weights)  # [N, E, G, G], [N, E], [N, E]
    per_expert = maps.transpose(0, 1).reshape(model.num_experts, -1)  # [E, N*G*G]
    post = config.model.postprocess
    if refit:
        model.map_low.copy_(torch.quantile(per_expert, post.norm_low_quantile, dim=1))
        model.map_high.copy_(torch.quantile(per_expert, post.norm_high_quantile, dim=1))
    # The raw expert maps do not depend on the normalisation: fuse them again instead of re-running the experts.
    scores = [
        model.postprocess(model.fuse(maps[i : i + 16], logits[i : i + 16], weights[i : i + 16]))[1]
        for i in range(0, len(maps), 16)
    ]
    scores = torch.cat(scores)
    return {
        "map_low": model.map_low.tolist(),
        "map_high": model.map_high.tolist(),
        "val_scores": scores.tolist(),
        "val_score_mean": float(scores.mean()),
        "val_score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "val_score_max": float(scores.max()),
    }


@torch.no_grad()
def calibrate_after_training(
    model: AnomalyMoE, train: EncoderFeatures, val: EncoderFeatures, train_images: torch.Tensor, val_images: torch.Tensor,
    config: AmoeConfig,
) -> dict:
    """Everything measured on normal images once the experts are trained, in order: the components' normal areas
    (``model.component.composition_gain``), the patch experts' residual statistics and whitening form and gain,
    then the patch memory's and the colour deviation's gains (``model.patch.residual_whitening: auto``) and, where
    either has a gain, the whitening form and gain again with them in place, the map normalisation, then the level
    shares (``level_weighting: pseudo``), each on the maps the step before it settled. ``train_images``: uint8
    [M, 3, S, S], the images of ``train``. -> the calibration record."""
    model.eval()
    composition = None
    if config.model.component.composition_gain > 0 and len(model.component_experts):
        composition = fit_composition(model, train, config.model.component.composition_gain)
    whitening = None
    seed = config.train.seed
    whiten = config.model.patch.residual_whitening == "auto" and len(model.patch_experts)
    weigh_levels = config.model.postprocess.level_weighting == "pseudo"
    # The same for every choice: made once.
    sets = pseudo_anomaly_sets(val_images, seed) if whiten or weigh_levels else None
    encoded = encode_calibration_images(model, val_images, sets) if sets is not None else None
    if whiten:
        ratios = fit_residual_statistics(model, train)
        renormalise = lambda: calibrate_normalisation(model, val, val_images, config)  # noqa: E731
        whitening = choose_whitening(model, ratios, val_images, renormalise, seed, sets, encoded)
        if model.patch_memory is not None:
            whitening["memory"] = choose_memory(model, train, val, val_images, renormalise, seed, sets, encoded)
        if model.colour is not None:
            whitening["colour"] = choose_colour(model, train_images, val, val_images, renormalise, seed, sets, encoded)
        terms = {term: whitening[term] for term in ("memory", "colour") if term in whitening}
        if any(record["gain"] > 0 for record in terms.values()):
            # The form was chosen on maps without these terms, but the map that ships has them, and they see some
            # of what the form sees: chosen again with them in place (on leather's range model, diagonal at gain
            # 1.0 beat 0.5 by 0.0014 of mean pseudo-anomaly AUROC without the colour term and lost by 0.010 with
            # it, and its test AUROC rose from 0.948 to 0.986; the measurements are in the README, decision (8)).
            without_terms = {key: whitening[key] for key in ("form", "gain", "patch_auroc_by_candidate")}
            whitening = {
                **choose_whitening(model, ratios, val_images, renormalise, seed, sets, encoded), **terms, "without_terms": without_terms,
            }
    calibration = calibrate_normalisation(model, val, val_images, config)
    if weigh_levels:
        fusion = calibrate_level_weights(model, val_images, config.model.postprocess.level_weights, seed, sets, encoded)
        fusion["map"] = choose_map_levels(model, val_images, seed, sets, encoded)
        # The validation scores again, with the measured shares.
        calibration = {**calibrate_normalisation(model, val, val_images, config, refit=False), "fusion": fusion}
    if whitening is not None:
        calibration["whitening"] = whitening
    if composition is not None:
        calibration["composition"] = composition
    return calibration


def eir_estimators(model: AnomalyMoE, config: AmoeConfig) -> torch.nn.ModuleDict:
    """One CLUB estimator per level with at least two experts: Expert Information Repulsion needs a pair."""
    dims = {"patch": config.model.patch.embed_dim, "component": config.model.component.code_dim, "global": config.model.global_.code_dim}
    estimators = torch.nn.ModuleDict()
    for level, experts in (("patch", model.patch_experts), ("component", model.component_experts), ("global", model.global_experts)):
        if len(experts) >= 2:
            estimators[level] = ClubEstimator(dims[level])
    return estimators


def training_step(
    model: AnomalyMoE, config: AmoeConfig, features: EncoderFeatures, images: torch.Tensor, generator: torch.Generator,
    optimizer: torch.optim.Optimizer, estimators: torch.nn.ModuleDict, estimator_optimizer: torch.optim.Optimizer | None,
    product: torch.Tensor | None = None, range_buffers: ProductBuffers | None = None,
) -> StepFunction:
    """The AnomalyMoE step on cached encoder features of uint8 ``images`` [N, 3, S, S]: routed reconstruction, the
    router's own reconstruction term, Expert Information Repulsion (CLUB, alternating with its estimators) and
    Expert Selection Balancing. With ``product`` [N] (each image's product index, over a range of products), each
    product fills an equal share of the batches whatever its image count, the router gets the product
    consistency term on every training image, and each image is standardised and assigned to components as its
    product (``range_buffers``)."""
    level_of_expert = torch.tensor([LEVELS.index(level) for level in model.expert_levels])
    level_scales = torch.tensor([1.0, config.loss.component_scale, config.loss.global_scale])[level_of_expert]
    expert_index = {level: [e for e, l in enumerate(model.expert_levels) if l == level] for level in LEVELS}
    lc = config.loss
    specialise = product is not None and model.router is not None
    if product is not None:
        draw_weight = 1.0 / torch.bincount(product).double()[product]

    def draw_batch() -> torch.Tensor:
        if product is None:
            return torch.randint(len(images), (config.train.batch_size,), generator=generator)
        return torch.multinomial(draw_weight, config.train.batch_size, replacement=True, generator=generator)

    def step(_: int) -> dict[str, float]:
        batch = draw_batch()
        logits, weights, outputs = model.run_experts(
            features.select(batch), images[batch].float(), with_loss=True,
            easy_fraction=lc.hard_mining_easy_fraction, easy_scale=lc.hard_mining_easy_scale,
            product_buffers=None if product is None else range_buffers.rows(product[batch]),
        )
        expert_losses = torch.stack([o.loss for o in outputs], dim=1)  # [B, E]
        rec, router_rec = routed_reconstruction(expert_losses, weights, level_scales, level_of_expert)
        esb, esb_parts = expert_selection_balancing(logits, weights, lc.capacity_weight, lc.z_weight)
        eir = torch.zeros(())
        pairs = []
        for level, estimator in estimators.items():
            i, j = torch.randperm(len(expert_index[level]), generator=generator)[:2].tolist()
            # Unit-normalised: on raw representations the experts could drive the bound down by scaling them up.
            x = torch.nn.functional.normalize(outputs[expert_index[level][i]].representation, dim=1)
            y = torch.nn.functional.normalize(outputs[expert_index[level][j]].representation, dim=1)
            eir = eir + estimator.upper_bound(x, y)
            pairs.append((estimator, x.detach(), y.detach()))
        total = rec + lc.router_weight * router_rec + lc.eir_weight * eir + lc.esb_weight * esb
        consistency = torch.zeros(())
        if specialise:
            # Every training image, not the batch: the router is small and a batch holds a product once or twice.
            logits_all = model.router(features.descriptor)[0]
            consistency = product_consistency(logits_all, product, model.router.top_k, lc.product_margin, level_of_expert)
            total = total + lc.product_consistency_weight * consistency
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), config.train.grad_clip)
        optimizer.step()
        if estimator_optimizer is not None:
            # CLUB alternation: the estimator maximises log q(y|x) on detached representations.
            estimator_optimizer.zero_grad(set_to_none=True)
            (-sum(est.log_likelihood(x, y) for est, x, y in pairs)).backward()
            estimator_optimizer.step()
        per_level = {f"rec_{level}": expert_losses[:, idx].mean().item() for level, idx in expert_index.items() if idx}
        losses = {"total": total.item(), "rec": rec.item(), "router": router_rec.item(), "eir": eir.item(), "esb": esb.item(), **per_level, **esb_parts}
        return {**losses, "consistency": consistency.item()} if specialise else losses

    return step


def product_split(product: Dataset, config: AmoeConfig, several: bool) -> tuple[list[Path], list[Path]]:
    """One product's seeded train / validation split; over a range, a product too small to split names itself."""
    tc = config.train
    try:
        return split_train_val(product.train, tc.val_fraction, tc.min_val_images, tc.seed)
    except DataError as exc:
        if not several:
            raise
        raise DataError(f"product {product.name} ({product.root}): {exc}") from None


@torch.no_grad()
def calibrate_products(
    model: AnomalyMoE, products: list[Dataset], splits: list[tuple[list[Path], list[Path]]], train: EncoderFeatures,
    val: EncoderFeatures, train_images: torch.Tensor, val_images: torch.Tensor, config: AmoeConfig, range_buffers: ProductBuffers,
) -> dict[str, dict]:
    """``calibrate_after_training`` once per product, on its own training and held-out images (the features and
    images of every product, in ``splits`` order), each from the trained state.

    -> per product: its folder, images, calibration record, routing on its held-out normals (``product_routing``)
    and ``state``, the entries of the state dict its calibration changed (its ``range_buffers`` laid first). The
    model is left as trained (no product's calibration): ``checkpoint.load_detector(run, product)`` lays a
    product's ``state`` over it."""
    trained = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    records: dict[str, dict] = {}
    train_start = val_start = 0
    for index, (product, (train_paths, val_paths)) in enumerate(zip(tqdm(products, desc="calibrate", unit="product", leave=False), splits)):
        in_train = slice(train_start, train_start + len(train_paths))
        in_val = slice(val_start, val_start + len(val_paths))
        train_start, val_start = in_train.stop, in_val.stop
        model.load_state_dict(trained)
        range_buffers.apply(model, index)
        calibration = calibrate_after_training(
            model, train.select(in_train), val.select(in_val), train_images[in_train], val_images[in_val], config
        )
        records[product.name] = {
            "data_root": str(product.root),
            "train_images": [str(p) for p in train_paths],
            "val_images": [str(p) for p in val_paths],
            "calibration": calibration,
            "routing": product_routing(model, val.select(in_val)),
            "state": {name: t.clone() for name, t in model.state_dict().items() if not torch.equal(t, trained[name])},
        }
    model.load_state_dict(trained)
    return records


def train(
    data: str | Path | list[str | Path], out_dir: str | Path, config: AmoeConfig, resume: bool = True, show_progress: bool = True
) -> TrainResult:
    """Train on the normal images of ``data`` and write ``out_dir/model.pt``; resumes from ``out_dir/last.pt``.

    ``data``: a category or a plain folder (one product), a folder of categories or a list of them (a range of
    products, ``data/products.py``): one detector over all of them, its router trained to specialise by product and
    its calibration measured per product (``calibrate_products``)."""
    started = time.time()
    out_dir = Path(out_dir)
    seed_everything(config.train.seed)
    products = read_products(data if isinstance(data, (list, tuple)) else [data])
    several = len(products) > 1
    config = config_for_products(config, len(products))
    tc = config.train
    data_root = describe_roots(products)
    splits = [product_split(product, config, several) for product in products]
    train_paths = [path for paths, _ in splits for path in paths]
    val_paths = [path for _, paths in splits for path in paths]
    check_batch_fits(tc.batch_size, train_paths, data_root)
    # A run folder is resumed only for the same setup on the same images: checked before any image is read.
    resume_from, saved = find_resumable(out_dir, resume)
    if saved is not None:
        check_resumable(saved, saved["config"], config.to_dict(), train_paths, val_paths, tc.steps, resume_from)
    size = config.model.input_size
    train_images = load_images(train_paths, size, lambda x: tqdm(x, desc="read train", leave=False, unit="img"))
    val_images = load_images(val_paths, size, lambda x: tqdm(x, desc="read val", leave=False, unit="img"))

    model = AnomalyMoE(config.model)
    train_features = encode_all(model, train_images, desc="encode train")
    val_features = encode_all(model, val_images, desc="encode val")
    generator = torch.Generator().manual_seed(tc.seed)
    product = torch.tensor([i for i, (paths, _) in enumerate(splits) for _ in paths]) if several else None
    range_buffers = fit_feature_statistics(model, train_features, config, generator, product)

    estimators = eir_estimators(model, config)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    estimator_optimizer = torch.optim.Adam(estimators.parameters(), lr=tc.estimator_lr) if len(estimators) else None
    run = RunLoop(
        out_dir, model, config, optimizer, generator, (train_paths, val_paths, data_root),
        {"estimators": estimators, "estimator_optimizer": estimator_optimizer}, "train", show_progress,
        checkpoint_extra={"product_names": [p.name for p in products]} if several else {},
    )
    run.restore(saved)
    model.train()
    step = training_step(
        model, config, train_features, train_images, generator, optimizer, estimators, estimator_optimizer, product, range_buffers
    )
    postfix = {"rec": ".4f", "eir": ".3f", "esb": ".3f", **({"consistency": ".3f"} if several and model.router is not None else {})}
    losses = run.run(step, postfix=postfix)

    if several:
        finished = {"products": calibrate_products(
            model, products, splits, train_features, val_features, train_images, val_images, config, range_buffers
        )}
    else:
        finished = {"calibration": calibrate_after_training(model, train_features, val_features, train_images, val_images, config)}
    with torch.no_grad():
        usage = selection_summary(model, model.route(train_features.descriptor, len(train_features.taps))[1])
    final = run.finish({**finished, "routing_usage": usage, "train_seconds": time.time() - started})
    return TrainResult(final, tc.steps, time.time() - started, losses)
