"""Print one table over several runs: the README's per-category figures come from this.

Usage: python examples/summarize_runs.py RUNS_DIR CATEGORY [CATEGORY ...]
Reads RUNS_DIR/<category>/metrics.json (from `amoe eval`) and the training time stored in the checkpoint.
"""

import json
import sys
from pathlib import Path

from amoe_sdk.checkpoint import read_checkpoint


def main(runs: Path, categories: list[str]) -> None:
    print("| category | image AUROC | pixel AUROC | AUPRO | F1-max | training time |")
    print("|---|---|---|---|---|---|")
    for category in categories:
        metrics = json.loads((runs / category / "metrics.json").read_text())
        seconds = read_checkpoint(runs / category).get("train_seconds", float("nan"))
        print(
            f"| {category} | {metrics['image_auroc']:.3f} | {metrics['pixel_auroc']:.3f} | {metrics['aupro']:.3f} "
            f"| {metrics['f1_max']:.3f} | {seconds / 60:.1f} min |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
