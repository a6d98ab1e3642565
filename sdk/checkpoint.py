"""Checkpoints: weights, the full config, normalisation statistics, k-means prototypes and the SDK version.

Written to a temporary file and renamed, so an interrupted save never leaves a truncated checkpoint behind.
The frozen encoder's weights travel inside, so loading needs neither the weights package nor a weights file.
A checkpoint holds only tensors and plain containers (dicts, lists, strings, numbers), and is read with
``torch.load(weights_only=True)``: a file crafted to run code while it is loaded is refused, not executed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from amoe_sdk.config import AmoeConfig
from amoe_sdk.errors import CheckpointError
from amoe_sdk.version import __version__

CHECKPOINT_FORMAT = 1
FINAL_NAME = "model.pt"
RESUME_NAME = "last.pt"


def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file (the final one when the run finished)."""
    path = Path(path)
    if path.is_dir():
        for name in (FINAL_NAME, RESUME_NAME):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds no {FINAL_NAME} or {RESUME_NAME}; train with `amoe train --out {path}` first")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint payload (format, SDK version, required keys)."""
    path = resolve_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors and plain containers, which amoe-sdk does "
                "not load (loading them can run any code the file's author chose). A checkpoint written by amoe-sdk "
                "holds none: this file was made elsewhere or tampered with. If you made it yourself and trust it, load "
                "it once in your own Python, turn those objects into tensors, dicts, lists, strings and numbers, and "
                "save it again with torch.save"
            ) from None
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); it may be truncated, retrain or restore it") from exc
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path} is not an amoe-sdk checkpoint")
    if payload["format"] > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {payload['format']} from amoe-sdk {payload.get('sdk_version')}; "
            f"this amoe-sdk {__version__} reads format {CHECKPOINT_FORMAT} or older: upgrade amoe-sdk"
        )
    missing = [k for k in ("config", "state_dict", "step", "sdk_version") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is damaged")
    payload["path"] = path
    return payload


# The patch experts' subspace whitening, added after the diagonal one (see ``PatchExpert``).
SUBSPACE_BUFFERS = ("residual_basis", "residual_basis_weight", "residual_subspace_gain")
# The component grid's statistics and the composition distance (see ``ComponentAssigner``), added later still.
COMPOSITION_BUFFERS = ("component_mean", "component_std", "area_mean", "area_precision", "composition_scale")


def run_products(payload: dict[str, Any]) -> list[str]:
    """The products a checkpoint was trained on: a range's names, or the one folder's name."""
    if "products" in payload:
        return list(payload["products"])
    if "product_names" in payload:  # a range's run that has not finished
        return list(payload["product_names"])
    return [Path(payload["data_root"]).name] if payload.get("data_root") else []


def product_view(payload: dict[str, Any], product: str | None) -> dict[str, Any]:
    """A checkpoint as one of its products sees it: a range's ``product`` laid over the trained state (its
    calibrated entries, its calibration record, images and folder), so that every tool that reads one product's
    checkpoint reads it. A single product's checkpoint is returned as it is (``product``, if given, must be its
    own). CheckpointError listing the products when ``product`` is missing or not one of them: a range has no
    default product."""
    names = run_products(payload)
    if "products" not in payload:
        if product is not None and names and product != names[0]:
            raise CheckpointError(f"{payload['path']} was trained on one product, {names[0]}, not {product!r}; leave out the product")
        return payload
    if product is None:
        raise CheckpointError(
            f"{payload['path']} is one detector for a range of products ({', '.join(names)}): each has its own "
            "calibration, so name one with --product NAME (product= in Python)"
        )
    if product not in payload["products"]:
        raise CheckpointError(f"{payload['path']} has no product {product!r}; its products are {', '.join(names)}")
    record = payload["products"][product]
    return {
        **payload,
        "state_dict": {**payload["state_dict"], **record["state"]},
        "calibration": record["calibration"],
        "train_images": record["train_images"],
        "val_images": record["val_images"],
        "data_root": record["data_root"],
        "product": product,
        "product_routing": record["routing"],
    }


def load_detector(path: str | Path | dict[str, Any], product: str | None = None):
    """(AnomalyMoE in eval mode, payload) from a run directory, a checkpoint file or a payload ``read_checkpoint``
    returned (a range's conversion reads its checkpoint once for all its products); for a range of products, the
    detector and payload of ``product`` (``product_view``)."""
    from amoe_sdk.models.detector import AnomalyMoE

    payload = product_view(path if isinstance(path, dict) else read_checkpoint(path), product)
    config_data = copy.deepcopy(payload["config"])  # the payload stays as read
    state = payload["state_dict"]
    if "level_weights" not in state:
        # Written before level weights were measured per product: they were the config's, fixed.
        config_data["model"]["postprocess"].setdefault("level_weighting", "fixed")
    # Written before the component grid and the composition distance: components were assigned on the main grid,
    # and the maps had no composition term.
    before_component_grid = "assigner.prototypes" in state and "assigner.area_mean" not in state
    if before_component_grid:
        config_data["model"]["encoder"].setdefault("component_taps", [])
        config_data["model"]["component"].setdefault("composition_gain", 0.0)
    if "patch_experts.0.head.weight" in state and "patch_experts.0.residual_mean" not in state:
        # Written before residual whitening: the patch experts' maps were the cosine maps alone.
        config_data["model"]["patch"].setdefault("residual_whitening", "off")
    before_memory = "patch_experts.0.head.weight" in state and "patch_experts.0.memory_gain" not in state
    if before_memory:
        # Written before the patch memory: the patch experts' maps had no memory term.
        config_data["model"]["patch"].setdefault("memory_size", 0)
    before_colour = "patch_experts.0.head.weight" in state and "patch_experts.0.colour_gain" not in state
    if before_colour:
        # Written before the colour deviation: the patch experts' maps had no colour term.
        config_data["model"]["patch"].setdefault("colour_deviation", False)
    config = AmoeConfig.from_dict(config_data, f"checkpoint {payload['path']}")
    build_config = copy.deepcopy(config.model)
    build_config.encoder.random_weights = True  # the encoder's weights are in the state dict
    model = AnomalyMoE(build_config)
    model.config = config.model
    if "level_weights" not in state:
        state = {**state, "level_weights": model.level_weights.clone()}
    if "map_level_weights" not in state:
        # Written before the map had its own level shares: it was the score's map.
        state = {**state, "map_level_weights": state["level_weights"].clone()}
    # Buffers an older checkpoint lacks, taken unfitted from the fresh model (zero gains: the maps stay as they were).
    unfitted_buffers = set()
    if "patch_experts.0.residual_mean" in state and "patch_experts.0.residual_basis" not in state:
        unfitted_buffers |= set(SUBSPACE_BUFFERS)  # written when whitening was diagonal only
    if before_component_grid:
        unfitted_buffers |= set(COMPOSITION_BUFFERS)
    if before_memory:
        unfitted_buffers.add("memory_gain")
    if before_colour:
        unfitted_buffers.add("colour_gain")
    if "assigner.prototypes" in state and "assigner.slot_offset" not in state:
        unfitted_buffers.add("slot_offset")  # written before slot groups: every slot open
    if unfitted_buffers:
        state = {**state, **{k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in unfitted_buffers}}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {payload['path']} does not match its own config: {exc}") from exc
    return model.eval(), payload


def make_payload(model, config: AmoeConfig, step: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "sdk_version": __version__,
        "config": config.to_dict(),
        "state_dict": model.state_dict(),
        "step": step,
        **extra,
    }


def run_state(generator: torch.Generator, history: list, train_paths: list, val_paths: list, data_root) -> dict[str, Any]:
    """What a resumable run stores beside its weights: random states, loss history and its data split."""
    return {
        "generator_state": generator.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "history": history,
        "train_images": [str(p) for p in train_paths],
        "val_images": [str(p) for p in val_paths],
        "data_root": str(data_root),
    }
