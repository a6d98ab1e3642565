"""``amoe``: one verb per job.

    amoe data sample OUT            write the procedural sample dataset (MVTec AD layout, six categories)
    amoe train --data DIR --out RUN train a detector on normal images (resumable)
    amoe distill --teacher RUN --data DIR --out RUN   distil a teacher into a small edge student
    amoe eval --model RUN --data DIR --out metrics.json [--save-images DIR]
    amoe convert --checkpoint RUN --target onnx|intel|jetson --out BUNDLE
    amoe verify BUNDLE --data DIR   the artifact against its PyTorch reference
    amoe info RUN|BUNDLE            what a checkpoint or a bundle holds
    amoe bench BUNDLE [BUNDLE ...]  latency, FPS and AUROC of bundles side by side

Exit codes: 0 success, 2 usage error, 3 bad data, 4 bad config, 5 encoder weights, 6 checkpoint, 7 bundle,
8 conversion, 9 backend / device, 10 input frame, 11 parity beyond tolerance, 12 a bundle below the bench
floor, 1 other SDK errors. Errors print one message that names the file and the fix, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from amoe_sdk.errors import UsageError
from amoe_sdk.outputs import atomic_write_text, check_output_file, check_output_folder, check_run_folder
from amoe_sdk.process import run_command
from amoe_sdk.version import __version__

# The files whose presence makes a folder a run of ours (amoe train / amoe distill may write into it again).
RUN_FILES = ("model.pt", "last.pt")


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def cmd_data_sample(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from amoe_sdk.data.synth import SampleSpec, write_sample_dataset

    check_output_folder(args.out, "OUT")
    spec = SampleSpec(train_good=args.train_good, test_good=args.test_good, test_per_defect=args.per_defect)
    folders = write_sample_dataset(args.out, args.categories, args.seed, spec, progress=lambda jobs: tqdm(jobs, desc="render", unit="img"))
    for folder in folders:
        print(f"wrote {folder}")
    return 0


def _run_overrides(args: argparse.Namespace) -> tuple[dict, dict]:
    """--steps and --seed as config overrides where given, and the option behind each (for error messages)."""
    overrides, flags = {}, {}
    for key, flag, value in (("train.steps", "--steps", args.steps), ("train.seed", "--seed", args.seed)):
        if value is not None:
            overrides[key], flags[key] = value, flag
    return overrides, flags


def cmd_train(args: argparse.Namespace) -> int:
    from amoe_sdk.config import load_config
    from amoe_sdk.training.trainer import train

    check_run_folder(args.out, "--out", RUN_FILES)
    _threads(args.threads)
    overrides, flags = _run_overrides(args)
    if args.encoder_weights is not None:
        overrides["model.encoder.weights"] = args.encoder_weights
    config = load_config(args.config, overrides, flags)
    result = train(args.data, args.out, config, resume=not args.no_resume)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s -> {result.checkpoint}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from amoe_sdk.training.distill import distill

    check_run_folder(args.out, "--out", RUN_FILES)
    _threads(args.threads)
    overrides, flags = _run_overrides(args)
    if args.qat:
        overrides["qat.enabled"] = True
    result = distill(args.teacher, args.data, args.out, args.student, overrides, resume=not args.no_resume, flags=flags, product=args.product)
    fid = result.fidelity
    print(
        f"distilled {result.steps} steps in {result.seconds:.0f} s -> {result.checkpoint}\n"
        f"  cost: {result.student_gflops:.2f} GFLOPs, {result.student_gflops / result.teacher_gflops:.0%} of the teacher's "
        f"{result.teacher_gflops:.2f}\n"
        f"  on {fid['images']} held-out images (normal + pseudo-anomalies): image AUROC teacher {fid['teacher_image_auroc']:.3f} / "
        f"student {fid['student_image_auroc']:.3f}, pixel AUROC {fid['teacher_pixel_auroc']:.3f} / {fid['student_pixel_auroc']:.3f}, "
        f"score rank correlation {fid['score_spearman']:.3f}"
    )
    if result.student_gflops > 0.25 * result.teacher_gflops:
        print("warning: the student costs more than a quarter of the teacher; narrow it with --student (model.patch.embed_dim, "
              "model.encoder.taps, model.input_size)", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from amoe_sdk.checkpoint import load_detector, read_checkpoint, run_products
    from amoe_sdk.data.layouts import read_folder_dataset
    from amoe_sdk.data.products import read_products
    from amoe_sdk.evaluation.evaluate import combine_categories, evaluate, format_category_table, format_table, write_json

    if args.data and args.normal:
        raise UsageError("pass either --data (MVTec layout) or --normal/--abnormal (plain folders), not both")
    if not args.data and not (args.normal and args.abnormal):
        raise UsageError("evaluation needs --data DIR (MVTec layout) or --normal DIR --abnormal DIR [--masks DIR]")
    check_output_file(args.out, "--out")
    if args.save_images is not None:
        check_output_folder(args.save_images, "--save-images")
    _threads(args.threads)
    datasets = read_products([args.data], require_test=True) if args.data else [read_folder_dataset(args.normal, args.abnormal, args.masks)]
    payload = read_checkpoint(args.model)
    products = run_products(payload)
    is_range = "products" in payload
    if is_range:
        unknown = [d for d in datasets if d.name not in products]
        if unknown:
            raise UsageError(
                f"{unknown[0].root} is not a product of {payload['path']} (its products: {', '.join(products)}): a range's "
                "detector evaluates a category with that product's own calibration, so the folder must carry its name"
            )
    elif len(datasets) > 1:
        raise UsageError(
            f"{payload['path']} was trained on one product ({', '.join(products) or 'a plain folder'}), and {args.data} holds "
            f"{len(datasets)} categories; evaluate it on its own category's folder"
        )
    started = time.time()
    per_category = {}
    for dataset in datasets:
        model, _ = load_detector(args.model, dataset.name if is_range else None)
        save_images = None if args.save_images is None else (args.save_images / dataset.name if len(datasets) > 1 else args.save_images)
        per_category[dataset.name] = {**evaluate(model, dataset, save_images), "dataset": str(dataset.root)}
    if len(datasets) == 1:
        result = next(iter(per_category.values()))
        table = format_table(result, f"{datasets[0].name}: {len(datasets[0].test)} test images")
    else:
        result = combine_categories(per_category)
        table = format_category_table(result, f"{len(datasets)} categories, each with its product's calibration")
        result["dataset"] = str(args.data)
    result["checkpoint"] = str(payload["path"])
    result["eval_seconds"] = time.time() - started
    write_json(result, args.out)
    print(table)
    print(f"metrics -> {args.out}" + (f", overlays -> {args.save_images}" if args.save_images else ""))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if (Path(args.path) / "manifest.json").is_file() or (Path(args.path) / "products.json").is_file():
        return _info_bundle(args)  # torch-free: a bundle is inspected where it runs
    from amoe_sdk.checkpoint import read_checkpoint

    payload = read_checkpoint(args.path)
    summary = {
        "checkpoint": str(payload["path"]),
        "sdk_version": payload["sdk_version"],
        "format": payload["format"],
        "step": payload["step"],
        "finished": "calibration" in payload or "products" in payload,
        "data_root": payload.get("data_root"),
        "train_images": len(payload.get("train_images", [])),
        "val_images": len(payload.get("val_images", [])),
        "train_seconds": payload.get("train_seconds"),
        "parameters": {
            "encoder (frozen)": sum(v.numel() for k, v in payload["state_dict"].items() if k.startswith("encoder.") and v.is_floating_point()),
            "experts + router": sum(v.numel() for k, v in payload["state_dict"].items() if not k.startswith("encoder.") and v.is_floating_point()),
        },
        "normalisation": payload.get("calibration"),
        "routing_usage": payload.get("routing_usage"),
        **({"products": _product_summary(payload["products"])} if "products" in payload else {}),
        "prototypes": list(payload["state_dict"]["assigner.prototypes"].shape),
        "config": payload["config"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    import yaml

    print(yaml.safe_dump(summary, sort_keys=False, width=120))
    return 0


def _product_summary(products: dict) -> dict:
    """Per product of a range: its folder, images, and the expert sets its held-out normals pick, with shares."""
    return {
        name: {
            "data_root": record["data_root"],
            "train_images": len(record["train_images"]),
            "val_images": len(record["val_images"]),
            "routing_agreement": record["routing"]["agreement"],
            "expert_sets": [f"{'+'.join(s['experts'])}: {s['share']:.0%}" for s in record["routing"]["expert_sets"]],
        }
        for name, record in products.items()
    }


def _info_bundle(args: argparse.Namespace) -> int:
    from amoe_sdk.runtimes.bundle import PRODUCTS_NAME, REPORT_NAME, read_bundle, read_product_bundle

    def describe(bundle) -> dict:
        summary = bundle.manifest.to_dict()
        report = bundle.root / REPORT_NAME
        summary["parity_report"] = json.loads(report.read_text()) if report.is_file() else "not verified yet: run amoe verify"
        return summary

    index = Path(args.path) / PRODUCTS_NAME
    if index.is_file():  # a range bundle: each product's bundle
        names = json.loads(index.read_text())["products"]
        summary = {"products": {name: describe(read_product_bundle(args.path, name)) for name in names}}
    else:
        summary = describe(read_bundle(args.path))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    import yaml

    print(yaml.safe_dump(summary, sort_keys=False, width=120))
    return 0


BENCH_FLOOR_EXIT = 12


def cmd_bench(args: argparse.Namespace) -> int:
    from amoe_sdk.runtimes.bench import bench_bundle, json_report, load_labelled_frames, markdown_table

    if args.floor is not None and (args.data is None or not (args.data / "test").is_dir()):
        raise UsageError("--floor needs --data with labelled test images (an MVTec category)")
    if args.json_out is not None:
        check_output_file(args.json_out, "--json-out")
    if args.data is not None:
        frames, labels = load_labelled_frames(args.data)
    else:
        import numpy as np

        # Timing only: camera-sized frames, so the resize is charged as it will be on the line.
        rng = np.random.default_rng(0)
        frames, labels = [rng.integers(0, 256, (960, 1280, 3), dtype=np.uint8) for _ in range(4)], None
    rows = []
    for bundle in args.bundles:
        rows.append(bench_bundle(bundle, frames, labels, args.runs, args.depth, args.threads, args.backend, args.device))
        print(f"benchmarked {bundle}", file=sys.stderr)
    print(json_report(rows) if args.format == "json" else markdown_table(rows))
    if args.json_out:
        atomic_write_text(args.json_out, json_report(rows) + "\n")
    below = [r for r in rows if args.floor is not None and (r.image_auroc or 0.0) < args.floor]
    for row in below:
        print(f"amoe bench: {row.artifact} image AUROC {row.image_auroc:.3f} is below the floor {args.floor}", file=sys.stderr)
    return BENCH_FLOOR_EXIT if below else 0


def build_parser() -> argparse.ArgumentParser:
    # One declarative table of every verb and option, long by nature: the CLI's reference reads top to bottom.
    parser = argparse.ArgumentParser(
        prog="amoe",
        description="Train and evaluate AnomalyMoE mixture-of-experts anomaly detectors.",
        epilog="Start here: amoe data sample data/ && amoe train --data data/weave --out runs/weave && "
        "amoe eval --model runs/weave --data data/weave --out runs/weave/metrics.json --save-images runs/weave/overlays",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"amoe-sdk {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    data = verbs.add_parser("data", help="datasets", description="Dataset tools.")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    sample = data_verbs.add_parser(
        "sample",
        help="write the procedural sample dataset",
        description="Write a small deterministic dataset in the MVTec AD layout, with a pixel mask for every defect: "
        "weave (texture: scratch, dent, contamination, foreign_material), washer (object: crack, chip, stain), kit "
        "(object with logical anomalies: missing, extra, swapped, wrong_colour), leather (texture with subtle "
        "defects of weave's kinds), pins (count and size: missing, extra, wrong_size, fused) and vial (structural "
        "and logical: low_fill, label_shifted, loose_cap, crack, contamination). Normal images vary in position, "
        "rotation and lighting.",
    )
    sample.add_argument("out", type=Path, help="output folder; one sub-folder per category")
    sample.add_argument("--categories", nargs="+", default=None, help="subset of: weave washer kit leather pins vial (default: all)")
    sample.add_argument("--seed", type=int, default=0, help="same seed, same images (default 0)")
    sample.add_argument("--train-good", type=int, default=100, help="normal training images per category (default 100)")
    sample.add_argument("--test-good", type=int, default=24, help="normal test images per category (default 24)")
    sample.add_argument("--per-defect", type=int, default=10, help="test images per defect type (default 10)")
    sample.set_defaults(func=cmd_data_sample)

    tr = verbs.add_parser(
        "train",
        help="train a detector on normal images",
        description="Train AnomalyMoE on the normal images of --data (an MVTec category's train/good, or a plain "
        "folder of normal images), or one AnomalyMoE over a range of products (a folder whose sub-folders are categories, "
        "or --data repeated): its router learns to send each product's images to one expert set, and each product is "
        "calibrated on its own held-out images. A share of the images is held out to calibrate the anomaly maps. Interrupted runs "
        "resume from RUN/last.pt; the result is RUN/model.pt.",
    )
    tr.add_argument("--data", required=True, type=Path, action="append",
                    help="MVTec category folder, folder of normal images, or folder of categories (a range of products: one "
                    "detector for all); repeat --data A --data B to name the categories one by one")
    tr.add_argument("--out", required=True, type=Path, help="run folder for checkpoints, config.yaml and history.json")
    tr.add_argument("--config", type=Path, help="YAML config; missing keys keep their defaults (see RUN/config.yaml of any run)")
    tr.add_argument("--steps", type=int, help="optimisation steps (default from the config: 800 for one product, 1600 for a range)")
    tr.add_argument("--seed", type=int, help="random seed (default from the config: 0)")
    tr.add_argument("--encoder-weights", help="local weights file for a DINOv2 encoder (or a Lite0 .pth to override the embedded one)")
    tr.add_argument("--no-resume", action="store_true", help="start over even when RUN/last.pt exists")
    tr.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    tr.set_defaults(func=cmd_train)

    dis = verbs.add_parser(
        "distill",
        help="distil a trained teacher into a small edge student",
        description="Train a small student detector to reproduce a trained teacher's routed per-level anomaly maps "
        "and image scores, on the normal images of --data and on pseudo-anomalies (cut-paste, Perlin blemishes, region swaps) made "
        "from them, plus its own reconstruction objective on the normals. By default the student has the Lite0 encoder "
        "cut after stage 3, one narrow expert per level the teacher's routing uses on this product, and no router. "
        "The teacher may use another encoder (a DINOv2 teacher, a Lite0 student). RUN/model.pt is an ordinary "
        "checkpoint (amoe eval / convert / verify take it) that records its teacher's path and sha256 and the "
        "distillation config; interrupted runs resume from RUN/last.pt.",
        epilog="example: amoe train --data data/sample/kit --out runs/kit-teacher --config examples/configs/teacher_4x3.yaml && "
        "amoe distill --teacher runs/kit-teacher --data data/sample/kit --out runs/kit-student --qat && "
        "amoe convert --checkpoint runs/kit-student --target intel --precision int8 --out bundles/kit-student-int8",
    )
    dis.add_argument("--teacher", required=True, type=Path, help="the teacher's run folder or checkpoint (a finished amoe train run)")
    dis.add_argument("--data", required=True, type=Path, help="MVTec category folder or folder of normal images (the teacher's own)")
    dis.add_argument("--out", required=True, type=Path, help="run folder for the student")
    dis.add_argument("--product", help="a teacher trained over a range of products: the product to distil (--data is then "
                     "that product's category); `amoe info TEACHER` lists them")
    dis.add_argument("--student", type=Path, help="YAML overriding the student and distillation defaults: model, loss, data, qat, "
                     "train sections (see RUN/distill.yaml of any distillation run); unknown keys are errors")
    dis.add_argument("--steps", type=int, help="optimisation steps (default 2400)")
    dis.add_argument("--seed", type=int, help="random seed (default 0)")
    dis.add_argument("--qat", action="store_true", help="quantization-aware fine-tuning over the last 30 %% of the steps, "
                     "for the smallest loss when converting with --precision int8")
    dis.add_argument("--no-resume", action="store_true", help="start over even when RUN/last.pt exists")
    dis.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    dis.set_defaults(func=cmd_distill)

    ev = verbs.add_parser(
        "eval",
        help="measure image / pixel metrics on labelled test images",
        description="Image AUROC, pixel AUROC, AUPRO (to 30 %% FPR), image F1-max and its threshold, overall and "
        "per defect type. Maps are compared with the ground truth at the model's input size.",
    )
    ev.add_argument("--model", required=True, type=Path, help="run folder or checkpoint file")
    ev.add_argument("--data", type=Path, help="MVTec category folder (test/ and ground_truth/), or a folder of categories for a "
                    "range's detector: each evaluated with its product's calibration, a table per category and the means")
    ev.add_argument("--normal", type=Path, help="plain layout: folder of normal test images")
    ev.add_argument("--abnormal", type=Path, help="plain layout: folder of anomalous test images")
    ev.add_argument("--masks", type=Path, help="plain layout: masks named <stem>.png or <stem>_mask.png")
    ev.add_argument("--out", required=True, type=Path, help="metrics JSON to write")
    ev.add_argument("--save-images", type=Path, help="folder for image | ground truth | heat-map panels")
    ev.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ev.set_defaults(func=cmd_eval)

    from amoe_sdk.converters.cli import CONVERT_DESCRIPTION, CONVERT_EXAMPLES, add_convert_arguments, add_verify_arguments, cmd_convert, cmd_verify

    conv = verbs.add_parser(
        "convert", help="export a run to an ONNX / OpenVINO / TensorRT bundle", description=CONVERT_DESCRIPTION,
        epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_convert_arguments(conv)
    conv.set_defaults(func=cmd_convert)

    ver = verbs.add_parser(
        "verify",
        help="compare a bundle with its PyTorch reference",
        description="Run the bundle's artifact and the PyTorch model it came from on the same images: score and map "
        "differences, map correlation, label flips at the threshold, image AUROC of both. Writes "
        "BUNDLE/parity_report.json; exits 11 when an FP32 artifact is beyond tolerance (FP16 is reported only).",
        epilog="example: amoe verify bundles/kit-onnx --data data/sample/kit",
    )
    add_verify_arguments(ver)
    ver.set_defaults(func=cmd_verify)

    info = verbs.add_parser(
        "info",
        help="show what a checkpoint or a bundle holds",
        description="For a run: its SDK version, training step, data, parameter counts, the per-expert map "
        "normalisation measured on validation images, how often the router picks each expert, and the full config. "
        "For a bundle (after checking its checksums): its manifest and parity report.",
        epilog="example: amoe info runs/weave  (or runs/weave/model.pt, or a bundle folder; --json for scripts)",
    )
    info.add_argument("path", type=Path, help="run folder, checkpoint file or bundle folder")
    info.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    info.set_defaults(func=cmd_info)

    bench = verbs.add_parser(
        "bench",
        help="latency, FPS and AUROC of bundles side by side",
        description="Run each bundle the way a line runs it (EdgeDetector: resize, infer, map back) and print one "
        "table: backend, precision, size, pre / infer / post p50 and p99 ms, FPS at batch 1, FPS with DEPTH "
        "frames in flight (OpenVINO AsyncInferQueue, TensorRT CUDA streams, ONNX Runtime worker threads) and "
        "image AUROC on --data. Exits 12 when a bundle's AUROC is below --floor, so CI can gate a release on it.",
        epilog="example: amoe bench bundles/kit-onnx bundles/kit-intel-int8 --data data/sample/kit --floor 0.95 --threads 2",
    )
    bench.add_argument("bundles", nargs="+", type=Path, help="bundle folders written by amoe convert")
    bench.add_argument("--data", type=Path, help="MVTec category (labelled test images: AUROC) or a folder of images (timing only); "
                       "without it, timing runs on 1280x960 noise frames")
    bench.add_argument("--floor", type=float, help="minimum image AUROC; below it the command exits 12")
    bench.add_argument("--runs", type=int, default=100, help="timed calls per bundle (default 100)")
    bench.add_argument("--depth", type=int, default=2, help="frames in flight for the pipelined FPS (default 2)")
    bench.add_argument("--threads", type=int, help="CPU threads for the backend (default: the backend's choice)")
    bench.add_argument("--backend", default="auto", help="auto (from the bundle), openvino, onnxruntime or tensorrt")
    bench.add_argument("--device", help="backend device (OpenVINO CPU/GPU/NPU, ONNX Runtime CPU/CUDA, TensorRT cuda:N)")
    bench.add_argument("--format", choices=["md", "json"], default="md", help="table format on stdout (default md)")
    bench.add_argument("--json-out", type=Path, help="also write the JSON report here")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(f"amoe {args.verb}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
