"""One detector for a whole product range against one detector per product, and the folded bundle each line gets.

Usage: python examples/benchmark_products.py DATA_DIR [--categories kit pins ...] [--range-run runs/range]
                                             [--per-product-runs runs] [--bundles bundles/products] [--threads 2]
                                             [--no-per-product] [--no-latency] [--latency-runs 90] [--rounds 3]
                                             [--json-out products.json]

Trains (where no finished run is there) one AnomalyMoE over every category of DATA_DIR with the default config
(``amoe train --data DATA_DIR``) and one per category (``amoe train --data DATA_DIR/<category>``). Then, per
category: both detectors' image and pixel AUROC in PyTorch (the range's with that product's calibration), the
range's folded bundle for that product (``amoe convert --product NAME --routing folded``, OpenVINO FP32: its
routing agreement on the product's held-out normals, its AUROCs through the backend and its parity with the dense
range model, ``amoe verify``), each one's GFLOPs and bundle size, and the p50 of the backend call at batch 1 with
``--threads`` threads for the per-product, the dense range and the folded bundles, each alone in its own process
in alternating rounds (measured in one run, so comparable with each other only). ``--no-per-product`` leaves
the per-product models out: the range's two bundles alone.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from amoe_sdk.checkpoint import load_detector, read_checkpoint
from amoe_sdk.config import load_config
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.converters.verify import verify
from amoe_sdk.data.layouts import read_dataset
from amoe_sdk.errors import ParityError
from amoe_sdk.runtimes.bundle import REPORT_NAME, read_bundle
from amoe_sdk.evaluation.evaluate import evaluate
from amoe_sdk.models.routing import count_cost
from amoe_sdk.outputs import atomic_write_text
from amoe_sdk.training.trainer import train
from bench_common import bundle_accuracy, isolated_latency

def finished_run(data, run: Path) -> Path:
    """``run``, trained with the default config on ``data`` where it holds no finished run."""
    if not (run / "model.pt").is_file():
        train(data, run, load_config(), resume=True)
    return run


def torch_metrics(run: Path, category: Path, product: str | None) -> dict:
    model, payload = load_detector(run, product)
    result = evaluate(model, read_dataset(category, require_test=True), show_progress=False)
    _, gflops = count_cost(model, model.config.input_size)
    return {"image_auroc": result["image_auroc"], "pixel_auroc": result["pixel_auroc"], "gflops": gflops,
            "train_seconds": payload.get("train_seconds")}


def measure_category(category: Path, range_run: Path, per_product_run: Path | None, args) -> dict:
    name = category.name
    bundles = args.bundles / name
    dense = torch_metrics(range_run, category, name)
    dense_bundle = convert(range_run, bundles / "range-dense", ConvertOptions(target="intel", product=name))
    folded_bundle = convert(range_run, bundles / "range-folded", ConvertOptions(target="intel", product=name, routing="folded"))
    samples = read_dataset(category, require_test=True).test
    folded_accuracy = bundle_accuracy(folded_bundle, samples, args.threads)
    folding = folded_accuracy["manifest"].routing.folding
    try:
        parity = verify(folded_bundle, category, show_progress=False)
    except ParityError:  # a result too: the report says by how much
        parity = json.loads((folded_bundle / REPORT_NAME).read_text())
    result = {
        "dense": {**dense, "mb": read_bundle(dense_bundle).size_mb()},
        "folded": {
            "image_auroc": folded_accuracy["image"], "pixel_auroc": folded_accuracy["pixel"], "gflops": folding["gflops_after"],
            "mb": folded_accuracy["mb"], "agreement": folding["agreement"], "kept": folding["kept"],
            "verify_passed": parity["passed"], "against_dense": parity["dense"],
        },
    }
    timed = {"dense": dense_bundle, "folded": folded_bundle}
    if per_product_run is not None:
        per_bundle = convert(per_product_run, bundles / "per-product", ConvertOptions(target="intel"))
        result["per_product"] = {**torch_metrics(per_product_run, category, None), "mb": read_bundle(per_bundle).size_mb()}
        timed = {"per_product": per_bundle, **timed}
    if args.latency:
        timings = isolated_latency(list(timed.values()), category / "train" / "good", args.latency_runs, args.threads, args.rounds)
        for key, (p50, _) in zip(timed, timings):
            result[key]["p50_ms"] = p50
    return result


def print_table(results: dict) -> None:
    print("| category | model | image AUROC | pixel AUROC | GFLOPs | MB | OpenVINO FP32 p50 ms | routing agreement |")
    print("|---|---|---|---|---|---|---|---|")
    labels = {"per_product": "per-product", "dense": "range, dense", "folded": "range, folded"}
    for name, by_model in results.items():
        for key, label in labels.items():
            if key not in by_model:
                continue
            r = by_model[key]
            latency = f"{r['p50_ms']:.1f}" if "p50_ms" in r else "not measured"
            agreement = f"{r['agreement']:.0%} ({' + '.join(r['kept'])})" if "agreement" in r else ""
            print(f"| {name} | {label} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['gflops']:.2f} | {r['mb']:.1f} | "
                  f"{latency} | {agreement} |")
    for key, label in labels.items():
        if any(key not in r for r in results.values()):
            continue
        image = np.mean([r[key]["image_auroc"] for r in results.values()])
        pixel = np.mean([r[key]["pixel_auroc"] for r in results.values()])
        print(f"mean {label}: image {image:.3f}, pixel {pixel:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="folder of MVTec-layout categories (amoe data sample writes one)")
    parser.add_argument("--categories", nargs="+", help="default: every category in DATA_DIR")
    parser.add_argument("--range-run", type=Path, default=Path("runs/range"), help="the range's run (trained when missing)")
    parser.add_argument("--per-product-runs", type=Path, default=Path("runs"), help="PER_PRODUCT_RUNS/<category> (trained when missing)")
    parser.add_argument("--bundles", type=Path, default=Path("bundles/products"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-per-product", dest="per_product", action="store_false",
                        help="measure the range's dense and folded models only, not one model per product")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency column")
    parser.add_argument("--latency-runs", type=int, default=90, help="backend calls per bundle, split over the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, each bundle in a fresh process")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.categories or sorted(p.name for p in args.data.iterdir() if (p / "train" / "good").is_dir())
    range_run = finished_run([args.data / n for n in names], args.range_run)
    products = list(read_checkpoint(range_run).get("products", {}))
    if products != names:
        print(f"{range_run} was trained on {products}, not {names}: pass another --range-run", file=sys.stderr)
        return 2
    results = {}
    for name in names:
        per_product_run = finished_run(args.data / name, args.per_product_runs / name) if args.per_product else None
        results[name] = measure_category(args.data / name, range_run, per_product_run, args)
        print(f"done {name}", file=sys.stderr, flush=True)
        if args.json_out:  # after every category: an interrupted run keeps what it measured
            atomic_write_text(args.json_out, json.dumps(results, indent=1, default=float))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
