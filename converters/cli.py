"""``amoe-convert`` (also ``amoe convert``) and ``amoe verify``: argument parsing and the commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amoe_sdk.errors import UsageError
from amoe_sdk.process import run_command

CONVERT_DESCRIPTION = """\
Convert a trained run into a bundle for the edge: the artifact, manifest.json (input contract, normalisation,
threshold, routing, checksums) and, after `amoe verify`, the parity report.

targets:
  onnx    ONNX (opset 17, static shapes) for ONNX Runtime on any machine
  intel   OpenVINO IR for Intel CPU / iGPU / NPU (--device picks the default device)
  jetson  TensorRT: a TensorRT-checked ONNX, plus the engine when TensorRT and a CUDA GPU are here;
          otherwise EdgeDetector builds and caches the engine on the Jetson at first load

routing:
  dense   exact: every expert and the router stay in the graph (static ops only)
  folded  measure the router on the calibration images; when one expert set covers at least
          --fold-min-agreement of them, drop the router and the unused experts (refused below it
          unless --force; the histogram of expert sets is printed either way)

precision:
  fp32 / fp16  FP16 halves the weights (OpenVINO compresses them; ONNX keeps uint8 in and FP32 out)
  int8         calibrated on normal images (--calib-data, default the run's training images), then gated:
               image and pixel AUROC on held-out normals plus anomalies (--val-data, default pseudo-anomalies)
               may drop at most --max-drop against FP32, at most 5 % of those images may change verdict, and
               the INT8 threshold may be at most --max-threshold-rise times FP32's; otherwise the most
               sensitive layers go back to float until the gate holds, or the conversion fails (--force
               keeps the result)

The threshold is measured on the converted artifact itself over normal held-out images (mean +
--threshold-sigma std of their scores); the runtime applies it, so it can change without re-export.
"""

CONVERT_EXAMPLES = """\
examples:
  amoe convert --checkpoint runs/kit --target onnx --out bundles/kit-onnx
  amoe convert --checkpoint runs/kit --target intel --precision fp16 --device GPU --out bundles/kit-ov
  amoe convert --checkpoint runs/kit --target jetson --routing folded --out bundles/kit-trt
  amoe convert --checkpoint runs/kit --target intel --precision int8 --out bundles/kit-ov-int8
  amoe convert --checkpoint runs/range --product kit --target intel --routing folded --out bundles/kit-folded
then: amoe verify bundles/kit-onnx --data data/sample/kit
"""


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``amoe convert``; those that apply to only some targets, precisions or routings (``--dla-core``,
    ``--calib-method``, ``--max-drop`` ...) have no argparse default, so that ``ConvertOptions.resolved`` can refuse
    one given where it does not apply."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="run folder (or model.pt) from `amoe train`")
    parser.add_argument("--target", required=True, choices=("onnx", "intel", "jetson"), help="which runtime the bundle is for")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write: new, empty, or a bundle (replaced "
                        "atomically); any other folder or file is refused and left as it is")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"), help="default fp32; int8 is accuracy-gated (see --max-drop)")
    parser.add_argument("--routing", default="dense", choices=("dense", "folded"), help="default dense (exact)")
    parser.add_argument("--product", help="a detector trained over a range of products: the product whose calibration and "
                        "threshold the bundle carries (with --routing folded, whose expert set it keeps); `amoe info RUN` lists them")
    parser.add_argument("--all-products", action="store_true", help="a detector trained over a range of products: one bundle "
                        "per product into OUT/<product> with an index (EdgeDetector(OUT, product=NAME)), and a table of "
                        "each one's routing agreement, kept experts, parameters and GFLOPs")
    parser.add_argument("--calib-data", type=Path, help="folder of normal images for folding and the threshold "
                        "(default: the run's held-out validation images)")
    parser.add_argument("--fold-min-agreement", type=float, help="--routing folded: share of images that must pick the same experts (default 0.95)")
    parser.add_argument("--force", action="store_true", help="fold to the most common expert set even below the agreement, "
                        "and keep an INT8 result that misses the gate")
    parser.add_argument("--device", help="device recorded in the bundle, used by EdgeDetector when given none (intel: CPU, GPU, "
                        "NPU, AUTO; onnx: CPU, CUDA, TensorRT; jetson: cuda:0); absent on the device is an error, never the CPU")
    parser.add_argument("--batch", type=int, default=1, help="fixed batch size of the graph (default 1)")
    parser.add_argument("--threshold-sigma", type=float, default=3.0, help="threshold = mean + this many std of normal scores (default 3)")
    parser.add_argument("--dla-core", type=int, help="jetson: build for this DLA core, with GPU fallback")
    parser.add_argument("--max-drop", type=float, help="int8: largest allowed drop of image and of pixel AUROC against FP32 (default 0.01)")
    parser.add_argument("--max-threshold-rise", type=float,
                        help="int8: largest allowed ratio of the INT8 threshold to FP32's on the same normal images (default 2): "
                        "a higher noise floor hides subtle defects that pseudo-anomalies cannot reveal")
    parser.add_argument("--val-data", type=Path, help="int8: MVTec category whose anomalous test images (with masks) form the gate "
                        "(default: pseudo-anomalies made from held-out normal images)")
    parser.add_argument("--calib-method",
                        help="int8 for onnx / jetson: activation range calibration, minmax (default), entropy or percentile")
    parser.add_argument("--no-accuracy-control", action="store_true", help="int8 for intel: plain NNCF quantization instead of accuracy control")
    parser.add_argument("--tensorrt-cache-version", help="int8 for jetson: TensorRT version in the calibration cache header (default 8.6.1)")
    parser.add_argument("--threads", type=int, help="CPU threads for export and calibration")


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from amoe_sdk.converters.convert import ConvertOptions, convert
    from amoe_sdk.converters.range_bundle import convert_products, format_rows
    from amoe_sdk.runtimes.bundle import read_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    options = ConvertOptions(
        target=args.target, precision=args.precision, routing=args.routing, product=args.product, calib_data=args.calib_data,
        fold_min_agreement=args.fold_min_agreement, force=args.force, device=args.device, batch_size=args.batch,
        threshold_sigma=args.threshold_sigma, dla_core=args.dla_core, max_drop=args.max_drop, max_threshold_rise=args.max_threshold_rise, val_data=args.val_data,
        calib_method=args.calib_method, accuracy_control=False if args.no_accuracy_control else None,
        tensorrt_cache_version=args.tensorrt_cache_version,
    )
    options.resolved()  # options that do not fit are refused before the checkpoint is read
    if args.all_products or (options.product is None and _is_range(args.checkpoint)):
        if not args.all_products and options.routing == "folded":
            raise UsageError(
                f"{args.checkpoint} is one detector for a range of products; fold it for one with --product NAME, or "
                "for each with --all-products"
            )
        out, rows = convert_products(args.checkpoint, args.out, options)
        print(format_rows(rows))
        print(f"wrote {out}: one bundle per product; open one with EdgeDetector({str(out)!r}, product=NAME)")
        print(f"next: amoe verify {out}/NAME --data DATA/NAME")
        return 0
    out = convert(args.checkpoint, args.out, options)
    bundle = read_bundle(out)
    threshold = bundle.manifest.threshold
    files = ", ".join(f"{name} ({(out / name).stat().st_size / 1e6:.1f} MB)" for name in bundle.manifest.files)
    print(f"wrote {out}: {files}")
    print(f"threshold {threshold.image:.4f} ({threshold.rule}, {threshold.images} images, {threshold.measured_with})")
    print(f"next: amoe verify {out} --data DATA")
    return 0


def _is_range(checkpoint: Path) -> bool:
    from amoe_sdk.checkpoint import read_checkpoint

    return "products" in read_checkpoint(checkpoint)


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle folder from `amoe convert`")
    parser.add_argument("--data", required=True, type=Path, help="MVTec category (its test split, with labels) or a folder of images")
    parser.add_argument("--reference", type=Path, help="run folder of the PyTorch reference (default: the one recorded in the bundle)")
    parser.add_argument("--backend", default="auto", help="auto, openvino, onnxruntime or tensorrt")
    parser.add_argument("--device", help="backend device (default: the bundle's)")
    parser.add_argument("--map-rtol", type=float, default=1e-4, help="FP32 tolerance on map differences, relative to the map range (default 1e-4)")
    parser.add_argument("--threads", type=int, help="CPU threads for the PyTorch reference")


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from amoe_sdk.converters.verify import verify

    if args.threads:
        torch.set_num_threads(args.threads)
    report = verify(args.bundle, args.data, args.reference, args.backend, args.device, args.map_rtol)
    for key in ("backend", "precision", "routing", "images", "score_rel_diff_max", "map_rel_diff_max",
                "map_correlation_min", "label_flips", "image_auroc_reference", "image_auroc_artifact", "passed"):
        if key in report:
            value = report[key]
            print(f"{key:24s} {value:.3g}" if isinstance(value, float) else f"{key:24s} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``amoe-convert`` console command: the same as ``amoe convert``."""
    parser = argparse.ArgumentParser(
        prog="amoe-convert", description=CONVERT_DESCRIPTION, epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_convert_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("amoe-convert", lambda: cmd_convert(args))


if __name__ == "__main__":
    sys.exit(main())
