"""FP32, FP16 and INT8 of one category on ONNX Runtime and OpenVINO, side by side in one run.

Usage: python examples/benchmark_precision.py RUN_DIR DATA_DIR [--out BUNDLES_DIR] [--threads 2] [--runs 200]
Converts RUN_DIR for both backends in each precision (INT8 through the accuracy gate, on pseudo-anomalies: the
test set below is never seen by the converter), then on DATA_DIR's labelled test images reports image AUROC,
pixel AUROC, AUPRO, Spearman rank correlation of the scores with the same backend's FP32, label flips at each
bundle's own threshold against FP32, size on disk, and latency of the backend call at batch 1 (p50 / p99 over
--runs calls after a warm-up; resize and map post-processing excluded, they are the same for every precision).
"""

import argparse
import time
from pathlib import Path

import numpy as np

from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.data.layouts import read_dataset
from amoe_sdk.evaluation.evaluate import load_masks
from amoe_sdk.evaluation.metrics import aupro, auroc
from amoe_sdk.runtimes import EdgeDetector
from amoe_sdk.runtimes.bundle import read_bundle
from amoe_sdk.calibration.data import load_frames


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bundles/precision"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8"])
    args = parser.parse_args()

    dataset = read_dataset(args.data, require_test=True)
    samples = dataset.test
    labels = np.array([s.label for s in samples])
    rows, fp32 = [], {}
    for target, backend in (("onnx", "onnxruntime"), ("intel", "openvino")):
        for precision in args.precisions:
            out = args.out / f"{args.run.name}-{target}-{precision}"
            convert(args.run, out, ConvertOptions(target=target, precision=precision, force=True))
            bundle = read_bundle(out)
            size = bundle.input_size
            frames = load_frames([s.image_path for s in samples], size)
            masks = load_masks(samples, size)
            detector = EdgeDetector(out, threads=args.threads)
            outputs = [detector.backend.infer(frames[i : i + 1]) for i in range(len(frames))]
            scores = np.array([o["score"][0] for o in outputs], np.float64)
            maps = np.stack([o["anomaly_map"][0, 0] for o in outputs])
            for frame in frames[:5]:
                detector.backend.infer(frame[None])
            times = []
            for i in range(args.runs):
                started = time.perf_counter()
                detector.backend.infer(frames[i % len(frames)][None])
                times.append((time.perf_counter() - started) * 1000)
            detector.close()
            verdicts = scores > bundle.manifest["threshold"]["image"]
            if precision == "fp32":
                fp32[backend] = (scores, verdicts)
            reference_scores, reference_verdicts = fp32.get(backend, (scores, verdicts))
            megabytes = sum((out / name).stat().st_size for name in bundle.manifest["files"]) / 1e6
            gate = bundle.manifest.get("quantization") or {}
            rows.append((
                backend, precision, auroc(labels, scores), auroc(masks, maps), aupro(masks, maps),
                spearman(scores, reference_scores), int((verdicts != reference_verdicts).sum()), megabytes,
                float(np.percentile(times, 50)), float(np.percentile(times, 99)),
                "" if not gate else ("gate passed" if gate["passed"] else "gate FAILED (forced)") + f", {len(gate['float_layers'])} float layers",
            ))

    print(f"\n{args.run.name}: {len(samples)} test images, batch 1, {args.threads} threads, {args.runs} timed calls\n")
    print("| backend | precision | image AUROC | pixel AUROC | AUPRO | rank corr. vs FP32 | flips vs FP32 | size MB | p50 ms | p99 ms | INT8 gate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for backend, precision, image, pixel, pro, rank, flips, mb, p50, p99, gate in rows:
        print(f"| {backend} | {precision} | {image:.3f} | {pixel:.3f} | {pro:.3f} | {rank:.3f} | {flips} | {mb:.1f} | {p50:.1f} | {p99:.1f} | {gate} |")


if __name__ == "__main__":
    main()
