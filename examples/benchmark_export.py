"""Per backend and routing mode: parity, bundle size, latency at batch 1 and image AUROC, in one markdown table.

Usage: python examples/benchmark_export.py RUN_DIR DATA_DIR [--out BUNDLES_DIR] [--threads 2] [--runs 200]
Converts RUN_DIR to ONNX and OpenVINO bundles in dense and folded routing (folded with --force when the router
agrees on fewer than 95 % of the calibration images; the table shows the agreement), runs `amoe verify` on each
against DATA_DIR's test images, then times EdgeDetector on them. Latency is the whole predict call (resize,
inference, map resize), p50 / p99 over --runs calls after a warm-up. PyTorch eager on the same images is the
first row; the last row is the TensorRT bundle's host-side checks (no engine can be built without a GPU).
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from amoe_sdk import EdgeDetector
from amoe_sdk.checkpoint import load_detector
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.converters.verify import verify
from amoe_sdk.data.images import read_image
from amoe_sdk.data.layouts import read_dataset
from amoe_sdk.errors import ConversionError
from amoe_sdk.evaluation.metrics import auroc
from amoe_sdk.runtimes.bundle import read_bundle
from amoe_sdk.runtimes.preprocess import resize_to_input
from bench_common import call_latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bundles/benchmark"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = read_dataset(args.data, require_test=True)
    frames = [read_image(s.image_path) for s in dataset.test]
    labels = np.array([s.label for s in dataset.test])
    model, _ = load_detector(args.run)
    size = model.config.input_size

    def torch_score(frame):
        with torch.no_grad():
            return model(torch.from_numpy(resize_to_input(frame, size)).permute(2, 0, 1)[None].float()).score.item()

    rows = []
    p50, p99 = call_latency(torch_score, frames, args.runs)
    rows.append(("PyTorch eager", "dense", "-", "reference", "-", p50, p99, auroc(labels, np.array([torch_score(f) for f in frames]))))
    for target, backend in (("onnx", "onnxruntime"), ("intel", "openvino")):
        for routing in ("dense", "folded"):
            out = args.out / f"{args.run.name}-{target}-{routing}"
            try:
                convert(args.run, out, ConvertOptions(target=target, routing=routing))
                forced = ""
            except ConversionError:
                convert(args.run, out, ConvertOptions(target=target, routing=routing, force=True))
                forced = " (forced)"
            bundle = read_bundle(out)
            folding = bundle.manifest.routing.folding
            mode = routing if folding is None else f"folded{forced}, {folding['agreement']:.0%} agree, {folding['gflops_after']:.2f} of {folding['gflops_before']:.2f} GFLOPs"
            megabytes = bundle.size_mb()
            report = verify(out, args.data, show_progress=False)
            parity = f"{'pass' if report['passed'] else 'FAIL'}, map diff {report['map_rel_diff_max']:.0e}, {report['label_flips']} flips"
            detector = EdgeDetector(out, threads=args.threads)
            p50, p99 = call_latency(detector.predict, frames, args.runs)
            scores = np.array([detector.predict(f).score for f in frames])
            rows.append((backend, mode, bundle.manifest.precision, parity, f"{megabytes:.1f} MB", p50, p99, auroc(labels, scores)))
            detector.close()
    out = args.out / f"{args.run.name}-jetson"
    convert(args.run, out, ConvertOptions(target="jetson"))  # raises when the TensorRT host checks fail
    megabytes = read_bundle(out).size_mb()
    rows.append(("TensorRT 10", "dense", "fp32", "host checks pass; engine not built (no GPU)", f"{megabytes:.1f} MB", float("nan"), float("nan"), float("nan")))

    print(f"\n{args.run.name}: batch 1, {args.threads} threads, {args.runs} timed calls, {len(frames)} test images\n")
    print("| backend | routing | precision | parity with PyTorch | size | p50 ms | p99 ms | image AUROC |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, mode, precision, parity, megabytes, p50, p99, score in rows:
        cells = [f"{x:.1f}" if np.isfinite(x) else "-" for x in (p50, p99)] + [f"{score:.3f}" if np.isfinite(score) else "-"]
        print(f"| {backend} | {mode} | {precision} | {parity} | {megabytes} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
