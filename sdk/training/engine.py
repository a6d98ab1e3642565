"""The run engine ``train`` and ``distill`` share: resume, learning-rate schedule, history, periodic and final
checkpoints, the progress bar. Each of them brings its own setup, a step function and its own finishing.

A run folder holds ``last.pt`` (every ``train.checkpoint_every`` steps and at the end), ``model.pt`` (the finished
detector), ``config.yaml`` and ``history.json``. Whether a saved run may be resumed is ``resume.py``'s rule.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from amoe_sdk.checkpoint import FINAL_NAME, RESUME_NAME, atomic_torch_save, make_payload, run_state
from amoe_sdk.config import AmoeConfig
from amoe_sdk.models.detector import AnomalyMoE
from amoe_sdk.outputs import atomic_write_text
from amoe_sdk.training.resume import load_resumable, resume_source


def learning_rate(step: int, config: AmoeConfig) -> float:
    """Linear warm-up then cosine decay to 1 % of the peak."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def find_resumable(out_dir: Path, resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """(the checkpoint to resume from, its payload), or (None, None) for a fresh run or ``resume=False``."""
    source = resume_source(out_dir) if resume else None
    return source, load_resumable(source) if source is not None else None


# A step function: (step index, from 0) -> its losses by name, as floats.
StepFunction = Callable[[int], dict[str, float]]


@dataclass
class RunLoop:
    """One resumable optimisation run of ``model`` under ``config`` (the training config its checkpoint carries).

    ``states``: what is saved and restored beside the model, by checkpoint key (objects with ``state_dict`` /
    ``load_state_dict``; None is saved as None). ``images``: the run's (train paths, val paths, data root), which
    a resumed run must match. ``checkpoint_extra``: written into every checkpoint of the run. ``weights``: the
    state dict to save instead of ``model.state_dict()`` (a student saves its float weights, not fake-quantized).
    """

    out_dir: Path
    model: AnomalyMoE
    config: AmoeConfig
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    images: tuple[list[Path], list[Path], str | Path]
    states: dict[str, Any]
    desc: str
    show_progress: bool = True
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    weights: Callable[[], dict] | None = None
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Continue from a checked resumable payload (``resume.check_resumable``); None starts at step 0."""
        if saved is None:
            return
        self.model.load_state_dict(saved["state_dict"])
        self.optimizer.load_state_dict(saved["optimizer"])
        for key, state in self.states.items():
            if state is not None:
                state.load_state_dict(saved[key])
        self.generator.set_state(saved["generator_state"])
        torch.set_rng_state(saved["torch_rng_state"])
        self.step, self.history = saved["step"], saved["history"]

    def save(self, path: Path, step: int, extra: dict[str, Any] | None = None) -> None:
        train_paths, val_paths, data_root = self.images
        payload = make_payload(self.model, self.config, step, {
            "optimizer": self.optimizer.state_dict(),
            **{key: state.state_dict() if state is not None else None for key, state in self.states.items()},
            **run_state(self.generator, self.history, train_paths, val_paths, data_root),
            **self.checkpoint_extra,
            **(extra or {}),
        })
        if self.weights is not None:
            payload["state_dict"] = self.weights()
        atomic_torch_save(payload, path)

    def run(self, step_function: StepFunction, postfix: dict[str, str]) -> dict[str, float]:
        """Steps from the restored step to ``train.steps``: the schedule's learning rate, the step, its history
        entry, the bar (``postfix``: loss name -> format) and ``last.pt`` every ``train.checkpoint_every`` steps.
        -> the last step's losses ({} when nothing was left to do)."""
        tc = self.config.train
        elapsed_before = self.history[-1]["elapsed_s"] if self.history else 0.0
        started = time.time()
        losses: dict[str, float] = {}
        bar = tqdm(range(self.step, tc.steps), initial=self.step, total=tc.steps, desc=self.desc, unit="step",
                   disable=not self.show_progress)
        for step in bar:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(step, self.config)
            losses = step_function(step)
            self.history.append({"step": step + 1, **losses, "elapsed_s": elapsed_before + time.time() - started})
            bar.set_postfix({name: format(losses[name], spec) for name, spec in postfix.items()})
            if (step + 1) % tc.checkpoint_every == 0 and step + 1 < tc.steps:
                self.save(self.out_dir / RESUME_NAME, step + 1)
        bar.close()
        self.step = tc.steps
        return losses

    def finish(self, final_extra: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        """Write ``model.pt`` (with ``final_extra``: calibration, timings), ``last.pt``, ``config.yaml`` and
        ``history.json``; ``extra`` goes into both checkpoints. -> the path of ``model.pt``."""
        final = self.out_dir / FINAL_NAME
        self.save(final, self.step, {**(extra or {}), **final_extra})
        self.save(self.out_dir / RESUME_NAME, self.step, extra)
        self.config.save_yaml(self.out_dir / "config.yaml")
        atomic_write_text(self.out_dir / "history.json", json.dumps(self.history))
        return final
