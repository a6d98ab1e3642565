"""Distillation: a trained mixture-of-experts teacher in, a small edge student out, on the CPU, resumably.

The teacher's routed per-level maps and image scores are computed once, on the normal training images and on
pseudo-anomalies made from them; the student's frozen encoder features likewise. Each step then trains only the
student's experts and its map normalisation (learned against the teacher's, so that the maps can be compared) on a
batch mixing normals and pseudo-anomalies. The finished student is then calibrated as any trained detector is (its
patch experts' residual whitening, its map normalisation and its level shares, on its own maps): what it learned
to match is its teacher's maps, but what it must deploy is the best separation its own maps allow. The held-out
validation images stay the teacher's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from amoe_sdk.calibration.pseudo_anomalies import synthesise
from amoe_sdk.checkpoint import load_detector
from amoe_sdk.config import AmoeConfig, DistillConfig
from amoe_sdk.data.images import resize_to_input
from amoe_sdk.data.layouts import read_dataset
from amoe_sdk.errors import CheckpointError
from amoe_sdk.evaluation.metrics import auroc
from amoe_sdk.models.detector import LEVELS, AnomalyMoE
from amoe_sdk.models.encoders import EncoderFeatures
from amoe_sdk.models.routing import count_cost
from amoe_sdk.outputs import sha256_of
from amoe_sdk.training.data import load_images, split_train_val
from amoe_sdk.training.distill_losses import map_matching_loss, normal_reconstruction_loss, score_matching_loss
from amoe_sdk.training.qat import FakeQuantization, float_state_dict
from amoe_sdk.training.engine import RunLoop, StepFunction, find_resumable
from amoe_sdk.training.resume import check_batch_fits, check_resumable
from amoe_sdk.training.student import TeacherUsage, load_distill_config, teacher_usage
from amoe_sdk.training.trainer import (
    calibrate_after_training, calibrate_normalisation, encode_all, fit_feature_statistics, seed_everything,
)
from amoe_sdk.version import __version__

@dataclass
class DistillResult:
    checkpoint: Path
    steps: int
    seconds: float
    teacher_gflops: float
    student_gflops: float
    fidelity: dict[str, float]
    final_losses: dict[str, float]


@dataclass
class TeacherTargets:
    """What the student learns to reproduce, per image: ``level_maps`` [N, L, G, G] (routed, normalised),
    ``scores`` [N]."""

    level_maps: torch.Tensor
    scores: torch.Tensor


class LearnedNormalisation(nn.Module):
    """The student's per-expert map normalisation (map - low) / span during distillation, learned so that its maps
    match the teacher's normalised ones. ``forward(raw [B, E, G, G])`` -> the same shape."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.low = nn.Parameter(low.clone())
        self.log_span = nn.Parameter((high - low).clamp_min(1e-6).log())

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.low.view(1, -1, 1, 1)) / self.log_span.exp().view(1, -1, 1, 1)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) [E] as the detector's ``map_low`` / ``map_high`` buffers hold them."""
        return self.low.detach().clone(), (self.low + self.log_span.exp()).detach().clone()


def check_teacher(payload: dict) -> None:
    """Refuse a teacher this SDK cannot vouch for: another major.minor version, or a run that never finished."""
    path = payload["path"]
    theirs, ours = str(payload["sdk_version"]).split(".")[:2], __version__.split(".")[:2]
    if theirs != ours:
        raise CheckpointError(
            f"teacher {path} was written by amoe-sdk {payload['sdk_version']}, this is amoe-sdk {__version__}: its "
            f"model code may differ, so its maps cannot be trusted as targets. Retrain the teacher with this version "
            f"(amoe train), or distil with amoe-sdk {'.'.join(theirs)}.x"
        )
    if "calibration" not in payload:
        raise CheckpointError(
            f"teacher {path} is an unfinished run (step {payload['step']}, no map normalisation yet): finish it with "
            f"amoe train --out {Path(path).parent} (it resumes) before distilling"
        )


def routed_outputs(
    model: AnomalyMoE, normalise, features: EncoderFeatures, images: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(routed per-level maps [B, L, G, G], image scores [B]) of a detector on one batch, its raw expert maps
    normalised by ``normalise`` ([B, E, G, G] -> the same): the teacher's own statistics, or the student's learned
    normalisation."""
    logits, weights, outputs = model.run_experts(features, images.float())
    level_maps = model.level_maps(normalise(torch.cat([o.anomaly_map for o in outputs], dim=1)), logits, weights)
    fused = (model.level_weights.view(1, -1, 1, 1) * level_maps).sum(dim=1, keepdim=True)
    return level_maps, model.postprocess(fused)[1]


@torch.no_grad()
def teacher_pass(teacher: AnomalyMoE, images: torch.Tensor, batch_size: int = 8, desc: str = "teacher") -> tuple[TeacherTargets, EncoderFeatures]:
    """Teacher targets on uint8 images [N, 3, S, S], and its encoder features (for the routing analysis)."""
    maps, scores, features = [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit="batch"):
        chunk = images[start : start + batch_size].float()
        features.append(teacher.encode(chunk))
        level_maps, chunk_scores = routed_outputs(teacher, teacher.normalise_maps, features[-1], chunk)
        maps.append(level_maps)
        scores.append(chunk_scores)
    return TeacherTargets(torch.cat(maps), torch.cat(scores)), EncoderFeatures.concat(features)


def _progress(desc: str):
    return lambda items: tqdm(items, desc=desc, leave=False, unit="img")


def _resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, s, s] -> [N, 3, size, size], resized as the runtime resizes."""
    if images.shape[-1] == size:
        return images
    nhwc = images.permute(0, 2, 3, 1).numpy()
    return torch.from_numpy(np.stack([resize_to_input(image, size) for image in nhwc])).permute(0, 3, 1, 2).contiguous()


def _split(dataset_train: list[Path], teacher_payload: dict, config: DistillConfig) -> tuple[list[Path], list[Path]]:
    """The teacher's own train / validation split when it was made on these images (its validation images stay
    unseen by both), else a fresh seeded split."""
    val = [Path(p) for p in teacher_payload.get("val_images", [])]
    train = [Path(p) for p in teacher_payload.get("train_images", [])]
    available = set(dataset_train)
    if val and train and set(val) <= available and set(train) <= available:
        return train, val
    tc = config.train
    return split_train_val(dataset_train, tc.val_fraction, tc.min_val_images, tc.seed)


def _teacher_record(teacher_file: Path, teacher_hash: str, payload: dict) -> dict:
    """What a student records of its teacher; a resumed distillation must find the same file (by digest)."""
    return {
        "path": str(teacher_file), "sha256": teacher_hash, "sdk_version": payload["sdk_version"],
        "step": payload["step"], "config": payload["config"], **({"product": payload["product"]} if "product" in payload else {}),
    }


def _check_same_teacher(saved: dict, path: Path, teacher_file: Path, teacher_hash: str) -> None:
    record = saved.get("distillation")
    if record is None:
        raise CheckpointError(f"{path} is not a distillation run; use a new --out folder")
    if record["teacher"]["sha256"] != teacher_hash:
        raise CheckpointError(
            f"{path} was distilled from another teacher ({record['teacher']['path']}, sha256 "
            f"{record['teacher']['sha256'][:12]}...), not {teacher_file}; use a new --out folder or --no-resume"
        )


def distill(
    teacher_path: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    student_yaml: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = True,
    show_progress: bool = True,
    flags: dict[str, str] | None = None,
    product: str | None = None,
) -> DistillResult:
    """Distil the teacher run ``teacher_path`` into a student on the normal images of ``data_root``; writes
    ``out_dir/model.pt`` (an ordinary checkpoint with a ``distillation`` record) and resumes from ``out_dir/last.pt``
    (or a finished run's ``model.pt``). ``flags`` names the command-line option behind each override, for messages.
    ``product``: for a teacher trained over a range of products, the one to distil (its calibration and the expert
    set its images route to: the student is that product's static detector)."""
    # Longer than 60 lines on purpose: its order is the order the data live in (teacher targets made and the
    # teacher's features freed before the student exists; the seed set where the student's draws begin), which
    # helpers would hide; each self-contained block is already one.
    started = time.time()
    out_dir = Path(out_dir)
    teacher, teacher_payload = load_detector(teacher_path, product)
    check_teacher(teacher_payload)
    teacher_file = Path(teacher_payload["path"]).resolve()
    teacher_hash = sha256_of(teacher_file)

    # Refuse a broken --student file now, not after minutes of teacher inference.
    provisional = load_distill_config(teacher.config, TeacherUsage.everything(teacher), student_yaml, overrides, flags)
    dataset = read_dataset(data_root)
    # The split and the routing analysis come first: the student's defaults depend on what the teacher uses.
    train_paths, val_paths = _split(dataset.train, teacher_payload, provisional)
    check_batch_fits(provisional.train.batch_size, train_paths, data_root)
    resume_from, saved = find_resumable(out_dir, resume)
    if saved is not None:  # what can be checked before the teacher runs; the config once it is known
        _check_same_teacher(saved, resume_from, teacher_file, teacher_hash)
    t_normals = load_images(train_paths, teacher.config.input_size, _progress("read train"))
    normal_targets, t_features = teacher_pass(teacher, t_normals, desc="teacher on normals")
    usage = teacher_usage(teacher, t_features, provisional.data.min_expert_weight)
    config = load_distill_config(teacher.config, usage, student_yaml, overrides, flags)
    if saved is not None:
        check_resumable(saved, saved["distillation"]["config"], config.to_dict(), train_paths, val_paths, config.train.steps, resume_from)
    del t_features
    seed_everything(config.train.seed)
    s_size = config.model.input_size
    normals = _resize_batch(t_normals, s_size)
    del t_normals
    val_images = load_images(val_paths, s_size, _progress("read val"))
    pseudo, pseudo_targets = _pseudo_anomalies(teacher, normals, normal_targets, config)

    student, training_config, generator, normal_features, val_features, pool = _student_setup(
        teacher, config, normals, normal_targets, pseudo, pseudo_targets, val_images,
    )
    # The learned normalisation starts from the untrained student's own quantiles on the normal training images.
    calibrate_normalisation(student, normal_features, normals, training_config)
    normaliser = LearnedNormalisation(student.map_low, student.map_high)
    optimizer = torch.optim.AdamW(
        [
            {"params": student.trainable_parameters(), "weight_decay": config.train.weight_decay},
            {"params": list(normaliser.parameters()), "weight_decay": 0.0},  # the normalisation is not a weight
        ],
        lr=config.train.lr,
    )
    quantization = FakeQuantization(list(student.patch_experts) + list(student.component_experts) + list(student.global_experts))
    record = {"teacher": _teacher_record(teacher_file, teacher_hash, teacher_payload), "config": config.to_dict(), "teacher_usage": usage.to_dict()}
    run = RunLoop(
        out_dir, student, training_config, optimizer, generator, (train_paths, val_paths, data_root),
        {"normaliser": normaliser}, "distill", show_progress, checkpoint_extra={"distillation": record},
        weights=lambda: float_state_dict(student),
    )
    run.restore(saved)
    step = distillation_step(student, normaliser, config, pool, generator, optimizer, quantization)
    losses = run.run(step, postfix={"map": ".4f", "score": ".4f", "rec": ".4f"})
    quantization.disable()

    calibration, fidelity = _calibrate_student(teacher, student, normaliser, normal_features, val_features, normals, val_images, config)
    cost = _cost(teacher, student)
    final_record = {"distillation": {**record, "cost": cost, "fidelity": fidelity}}
    final = run.finish({"calibration": calibration, "train_seconds": time.time() - started}, final_record)
    config.save_yaml(out_dir / "distill.yaml")
    return DistillResult(final, config.train.steps, time.time() - started, cost["teacher_gflops"], cost["student_gflops"], fidelity, losses)


def _student_setup(
    teacher: AnomalyMoE, config: DistillConfig, normals: torch.Tensor, normal_targets: TeacherTargets,
    pseudo: torch.Tensor, pseudo_targets: TeacherTargets, val_images: torch.Tensor,
) -> tuple[AnomalyMoE, AmoeConfig, torch.Generator, EncoderFeatures, EncoderFeatures, "DistillBatches"]:
    """The untrained student with the teacher's level shares and its own feature statistics, its cached encoder
    features (normal training, validation) and its training pool."""
    student = AnomalyMoE(config.model)
    # The teacher's measured level shares (the score's and the map's), over the levels the student has: their fused
    # maps are made alike.
    present = student.level_matrix.sum(dim=1) > 0
    for name in ("level_weights", "map_level_weights"):
        shares = getattr(teacher, name) * present
        getattr(student, name).copy_(shares / shares.sum().clamp_min(1e-12))
    normal_features = encode_all(student, normals, desc="student encode train")
    pseudo_features = encode_all(student, pseudo, desc="student encode pseudo") if len(pseudo) else None
    val_features = encode_all(student, val_images, desc="student encode val")
    generator = torch.Generator().manual_seed(config.train.seed)
    training_config = config.as_training_config()
    fit_feature_statistics(student, normal_features, training_config, generator)
    pool = DistillBatches(
        torch.cat([normals, pseudo]),
        normal_features if pseudo_features is None else EncoderFeatures.concat([normal_features, pseudo_features]),
        TeacherTargets(torch.cat([normal_targets.level_maps, pseudo_targets.level_maps]), torch.cat([normal_targets.scores, pseudo_targets.scores])),
        len(normals), len(pseudo),
    )
    return student, training_config, generator, normal_features, val_features, pool


def _calibrate_student(
    teacher: AnomalyMoE, student: AnomalyMoE, normaliser: LearnedNormalisation, normal_features: EncoderFeatures,
    val_features: EncoderFeatures, normals: torch.Tensor, val_images: torch.Tensor, config: DistillConfig,
) -> tuple[dict, dict[str, float]]:
    """The distilled student's calibration record and its fidelity to the teacher (``map_error`` and
    ``score_error`` as distilled, the rest as calibrated)."""
    student.eval()
    low, high = normaliser.bounds()
    student.map_low.copy_(low)
    student.map_high.copy_(high)
    as_distilled = measure_fidelity(teacher, student, val_images, config.data.seed, config.data.pseudo_kinds)
    # Then calibrated as a trained detector. Measured on vial (test image / pixel AUROC): as distilled, 0.819 /
    # 0.811 against the teacher's 0.995 / 0.972; with its own whitening and normalisation, 0.961 / 0.963; with
    # its own level shares too, 0.978 / 0.959. Its patch experts' residual holds what their narrow
    # reconstruction misses.
    calibration = calibrate_after_training(student, normal_features, val_features, normals, val_images, config.as_training_config())
    fidelity = {
        **measure_fidelity(teacher, student, val_images, config.data.seed, config.data.pseudo_kinds),
        "map_error": as_distilled["map_error"], "score_error": as_distilled["score_error"],
    }
    return calibration, fidelity


def _pseudo_anomalies(teacher: AnomalyMoE, normals: torch.Tensor, normal_targets: TeacherTargets, config: DistillConfig) -> tuple[torch.Tensor, TeacherTargets]:
    """``data.pseudo_per_image`` pseudo-anomalies per normal image (uint8 [N, 3, s, s] at the student's size) and
    the teacher's targets on them; none when ``data.anomaly_share`` is 0."""
    size = normals.shape[-1]
    count = len(normals) * config.data.pseudo_per_image if config.data.anomaly_share > 0 else 0
    if not count:
        return torch.empty((0, 3, size, size), dtype=torch.uint8), TeacherTargets(normal_targets.level_maps[:0], normal_targets.scores[:0])
    made, _ = synthesise(normals.permute(0, 2, 3, 1).numpy(), count, seed=config.data.seed, kinds=config.data.pseudo_kinds)
    pseudo = torch.from_numpy(made).permute(0, 3, 1, 2).contiguous()
    targets, _ = teacher_pass(teacher, _resize_batch(pseudo, teacher.config.input_size), desc="teacher on pseudo-anomalies")
    return pseudo, targets


@dataclass
class DistillBatches:
    """The student's training pool: normal images first, then pseudo-anomalies (uint8 [N + P, 3, s, s]), their
    cached student encoder features and the teacher's targets on each."""

    images: torch.Tensor
    features: EncoderFeatures
    targets: TeacherTargets
    normal: int
    pseudo: int


def distillation_step(
    student: AnomalyMoE, normaliser: LearnedNormalisation, config: DistillConfig, pool: DistillBatches,
    generator: torch.Generator, optimizer: torch.optim.Optimizer, quantization: FakeQuantization,
) -> StepFunction:
    """One distillation step: a batch mixing normals and a ``data.anomaly_share`` of pseudo-anomalies; the
    student's routed level maps and scores matched to the teacher's, and its reconstruction on the normals kept.
    Fake quantization switches on for the last ``qat.fraction`` of the steps."""
    tc, lc = config.train, config.loss
    qat_start = int(round(tc.steps * (1.0 - config.qat.fraction))) if config.qat.enabled else None
    level_of_expert = torch.tensor([LEVELS.index(level) for level in student.expert_levels])
    level_scales = torch.tensor([1.0, lc.component_scale, lc.global_scale])[level_of_expert]
    n_anomalous = int(round(tc.batch_size * config.data.anomaly_share)) if pool.pseudo else 0
    batch_is_normal = torch.arange(tc.batch_size) < tc.batch_size - n_anomalous
    parameters = student.trainable_parameters() + list(normaliser.parameters())

    def step(index: int) -> dict[str, float]:
        if qat_start is not None and index >= qat_start:
            quantization.enable()
        normal_rows = torch.randint(pool.normal, (tc.batch_size - n_anomalous,), generator=generator)
        pseudo_rows = pool.normal + torch.randint(max(pool.pseudo, 1), (n_anomalous,), generator=generator)
        rows = torch.cat([normal_rows, pseudo_rows])
        batch_features, batch_images = pool.features.select(rows), pool.images[rows]
        # Two passes: the reconstruction objective in training mode (the patch experts' noisy bottleneck is what
        # keeps them from copying their input), the maps in inference mode, as they will be made at deployment.
        student.train()
        _, _, outputs = student.run_experts(batch_features, batch_images.float(), with_loss=True)
        expert_losses = torch.stack([o.loss for o in outputs], dim=1)  # [B, E]
        student.eval()
        level_maps, scores = routed_outputs(student, normaliser, batch_features, batch_images)
        map_loss = map_matching_loss(level_maps, pool.targets.level_maps[rows], student.level_weights)
        score_loss = score_matching_loss(scores, pool.targets.scores[rows])
        rec_loss = normal_reconstruction_loss(expert_losses, batch_is_normal, level_scales)
        total = lc.map_weight * map_loss + lc.score_weight * score_loss + lc.reconstruction_weight * rec_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, tc.grad_clip)
        optimizer.step()
        return {"total": total.item(), "map": map_loss.item(), "score": score_loss.item(), "rec": rec_loss.item(), "qat": float(quantization.enabled)}

    return step


def _cost(teacher: AnomalyMoE, student: AnomalyMoE) -> dict[str, float]:
    teacher_params, teacher_gflops = count_cost(teacher, teacher.config.input_size)
    student_params, student_gflops = count_cost(student, student.config.input_size)
    return {
        "teacher_params": teacher_params, "teacher_gflops": teacher_gflops,
        "student_params": student_params, "student_gflops": student_gflops, "flops_ratio": student_gflops / teacher_gflops,
    }


@torch.no_grad()
def measure_fidelity(
    teacher: AnomalyMoE, student: AnomalyMoE, val_images: torch.Tensor, seed: int, kinds: list[str],
) -> dict[str, float]:
    """How closely the student follows its teacher on data neither has seen: the held-out normal images and one
    pseudo-anomaly of the run's ``kinds`` made from each (another seed than training's). Image and pixel AUROC of
    both, the Spearman rank correlation of their scores, and ``map_error`` / ``score_error``: the mean squared
    difference of their asinh-compressed anomaly maps (at the mask size) and scores, what distillation minimises
    (so ``distill`` records them for the student as distilled, before its own calibration puts its maps on its
    own scale)."""
    made, masks = synthesise(val_images.permute(0, 2, 3, 1).numpy(), len(val_images), seed=seed + 1, kinds=kinds)
    images = torch.cat([val_images, torch.from_numpy(made).permute(0, 3, 1, 2)])
    labels = np.r_[np.zeros(len(val_images)), np.ones(len(made))]
    pixel_truth = np.concatenate([np.zeros((len(val_images),) + masks.shape[1:], bool), masks])
    result = {}
    for name, model in (("teacher", teacher), ("student", student)):
        size = model.config.input_size
        out_scores, out_maps = [], []
        for start in range(0, len(images), 8):
            output = model(_resize_batch(images[start : start + 8], size).float())
            out_scores.append(output.score)
            out_maps.append(torch.nn.functional.interpolate(output.anomaly_map, size=masks.shape[1:], mode="bilinear", align_corners=False))
        scores = torch.cat(out_scores).numpy()
        maps = torch.cat(out_maps)[:, 0].numpy()
        result[f"{name}_image_auroc"] = auroc(labels, scores)
        result[f"{name}_pixel_auroc"] = auroc(pixel_truth.ravel(), maps.ravel())
        result[f"{name}_scores"] = scores
        result[f"{name}_maps"] = maps
    scores = [result.pop(f"{name}_scores") for name in ("teacher", "student")]
    maps = [result.pop(f"{name}_maps") for name in ("teacher", "student")]
    ranks = [np.argsort(np.argsort(s)) for s in scores]
    result["score_spearman"] = float(np.corrcoef(ranks[0], ranks[1])[0, 1])
    result["map_error"] = float(np.mean((np.arcsinh(maps[1]) - np.arcsinh(maps[0])) ** 2))
    result["score_error"] = float(np.mean((np.arcsinh(scores[1]) - np.arcsinh(scores[0])) ** 2))
    result["images"] = int(len(images))
    return result
