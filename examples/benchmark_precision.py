"""FP32, FP16 and INT8 of one category on ONNX Runtime and OpenVINO, side by side in one run.

Usage: python examples/benchmark_precision.py RUN_DIR DATA_DIR [--out BUNDLES_DIR] [--threads 2] [--runs 200] [--reuse]
Converts RUN_DIR for both backends in each precision (INT8 through the accuracy gate, on pseudo-anomalies: the
test set below is never seen by the converter), then on DATA_DIR's labelled test images reports image AUROC,
pixel AUROC, AUPRO, Spearman rank correlation of the scores with the same backend's FP32, label flips at each
bundle's own threshold against FP32, errors against the labels at that threshold, size on disk, and latency of
the backend call at batch 1 (`amoe bench`: each bundle alone in a fresh process, three alternating rounds of
--runs / 3 calls after a warm-up, medians of the rounds' p50 and p99; resize and map post-processing excluded,
they are the same for every precision).
"""

import argparse
from pathlib import Path

import numpy as np

from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.data.layouts import read_dataset
from bench_common import bundle_accuracy, isolated_latency


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
    parser.add_argument("--reuse", action="store_true", help="keep bundles already converted in --out instead of converting again")
    args = parser.parse_args()

    dataset = read_dataset(args.data, require_test=True)
    samples = dataset.test
    labels = np.array([s.label for s in samples])
    bundles = []
    for target, backend in (("onnx", "onnxruntime"), ("intel", "openvino")):
        for precision in args.precisions:
            out = args.out / f"{args.run.name}-{target}-{precision}"
            if not (args.reuse and (out / "manifest.json").is_file()):
                convert(args.run, out, ConvertOptions(target=target, precision=precision, force=True))
            bundles.append((backend, precision, out))

    rows, fp32 = [], {}
    for backend, precision, out in bundles:
        measured = bundle_accuracy(out, samples, args.threads)
        scores, verdicts = measured["scores"], measured["verdicts"]
        if precision == "fp32":
            fp32[backend] = (scores, verdicts)
        reference_scores, reference_verdicts = fp32.get(backend, (scores, verdicts))
        gate = measured["manifest"].quantization or {}
        rows.append({
            "backend": backend, "precision": precision, "image": measured["image"], "pixel": measured["pixel"],
            "aupro": measured["aupro"], "rank": spearman(scores, reference_scores),
            "flips": int((verdicts != reference_verdicts).sum()), "errors": int((verdicts != labels.astype(bool)).sum()),
            "mb": measured["mb"],
            "gate": "" if not gate else ("passed" if gate["passed"] else "FAILED (forced)") + f", {len(gate['float_layers'])} float layers",
        })

    latencies = isolated_latency([out for _, _, out in bundles], args.data / "test" / "good", args.runs, args.threads)
    for row, (p50, p99) in zip(rows, latencies):
        row["p50"], row["p99"] = p50, p99
    reference_p50 = {row["backend"]: row["p50"] for row in rows if row["precision"] == "fp32"}
    reference_mb = {row["backend"]: row["mb"] for row in rows if row["precision"] == "fp32"}

    print(f"\n{args.run.name}: {len(samples)} test images, batch 1, {args.threads} threads, {args.runs} timed calls per bundle in 3 alternating rounds, each in its own process\n")
    print("| backend | precision | image AUROC | pixel AUROC | AUPRO | rank corr. vs FP32 | flips vs FP32 | errors at threshold | size MB (vs FP32) | p50 ms | p99 ms | speed-up vs FP32 | INT8 gate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size_share = r["mb"] / reference_mb.get(r["backend"], r["mb"])
        speedup = reference_p50.get(r["backend"], r["p50"]) / r["p50"]
        print(
            f"| {r['backend']} | {r['precision']} | {r['image']:.3f} | {r['pixel']:.3f} | {r['aupro']:.3f} | {r['rank']:.3f} | "
            f"{r['flips']} | {r['errors']} | {r['mb']:.1f} ({size_share:.0%}) | {r['p50']:.1f} | {r['p99']:.1f} | {speedup:.2f}x | {r['gate']} |"
        )


if __name__ == "__main__":
    main()
