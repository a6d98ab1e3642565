"""Picking a run up again: which checkpoint to resume from, and when a run folder must not be resumed.

A run folder belongs to one training setup on one set of images. Resuming it with another config, other images
or fewer steps than it has already reached would write a ``model.pt`` that claims the new setup but holds the
old weights, so each of these is refused with the flag that starts over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amoe_sdk.checkpoint import FINAL_NAME, RESUME_NAME, read_checkpoint
from amoe_sdk.errors import CheckpointError, ConfigError

# Steps and checkpoint spacing may change between a run and its resumption; nothing else may.
RESUMABLE_KEYS = ("steps", "checkpoint_every")


def resume_source(out_dir: Path) -> Path | None:
    """``last.pt`` (written at every checkpoint and at the end), else a finished run's ``model.pt``, else None."""
    for name in (RESUME_NAME, FINAL_NAME):
        if (out_dir / name).is_file():
            return out_dir / name
    return None


def load_resumable(path: Path) -> dict[str, Any]:
    try:
        return read_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. To start this run over, pass --no-resume (or use a new --out folder)") from exc


def check_resumable(saved: dict[str, Any], saved_config: dict, config: dict, train_paths: list[Path], val_paths: list[Path],
                    steps: int, path: Path) -> None:
    """Refuse to resume ``saved`` (read from ``path``) under ``config`` on these images for ``steps`` steps unless
    only the steps or the checkpoint spacing changed, the images are the same and no step is taken back."""
    start_over = "use a new --out folder, or pass --no-resume to start over in this one (it replaces the run)"
    if _strip(saved_config) != _strip(config):
        raise CheckpointError(f"{path} was trained with another config; {start_over}")
    if not (_same_images(saved.get("train_images", []), train_paths) and _same_images(saved.get("val_images", []), val_paths)):
        raise CheckpointError(
            f"{path} was trained on other images ({len(saved.get('train_images', []))} training images from "
            f"{saved.get('data_root')}) than --data gives now ({len(train_paths)} training images); {start_over}"
        )
    if saved["step"] > steps:
        raise CheckpointError(
            f"train.steps={steps} (--steps or the config) is lower than the {saved['step']} steps {path} has already "
            f"reached; pass --steps {saved['step']} or more to continue it, or {start_over}"
        )


def check_batch_fits(batch_size: int, train_paths: list[Path], data_root) -> None:
    """A batch larger than the training set would only repeat images within each batch: refused."""
    if batch_size > len(train_paths):
        raise ConfigError(
            f"train.batch_size={batch_size} is larger than the {len(train_paths)} training images of {data_root} "
            f"(the rest are held out for calibration); lower train.batch_size to at most {len(train_paths)}, or add images"
        )


def _strip(config: dict) -> dict:
    return {**config, "train": {k: v for k, v in config["train"].items() if k not in RESUMABLE_KEYS}}


def _same_images(saved: list[str], current: list[Path]) -> bool:
    return [Path(p).resolve() for p in saved] == [Path(p).resolve() for p in current]
