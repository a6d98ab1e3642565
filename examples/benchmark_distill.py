"""Teacher against distilled student: cost, speed and accuracy, FP32 and INT8, ONNX Runtime and OpenVINO.

Usage: python examples/benchmark_distill.py TEACHER_RUN STUDENT_RUN DATA_DIR [--out BUNDLES_DIR] [--threads 2]
       [--runs 200] [--reuse]
Converts both runs for ONNX Runtime and OpenVINO in FP32 and INT8 (INT8 through the accuracy gate on
pseudo-anomalies; DATA_DIR's test set is never seen by the converter), then prints one table: parameters and
GFLOPs of what each model's inference runs (torch's FLOP counter, batch 1), bundle size, latency of the backend
call at batch 1 (each bundle alone in a fresh process, three alternating rounds, medians of their p50 / p99),
image and pixel AUROC and AUPRO on DATA_DIR's labelled test images, and the INT8 gate's verdict.

Example: amoe train --data data/sample/kit --out runs/teacher-kit --config examples/configs/teacher_4x3.yaml
         amoe distill --teacher runs/teacher-kit --data data/sample/kit --out runs/student-kit
         python examples/benchmark_distill.py runs/teacher-kit runs/student-kit data/sample/kit
"""

import argparse
from pathlib import Path

from amoe_sdk.checkpoint import load_detector
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.models.routing import count_cost
from amoe_sdk.data.layouts import read_dataset
from bench_common import bundle_accuracy, isolated_latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", type=Path, help="the teacher's run folder")
    parser.add_argument("student", type=Path, help="the distilled student's run folder")
    parser.add_argument("data", type=Path, help="MVTec category with labelled test images")
    parser.add_argument("--out", type=Path, default=Path("bundles/distill"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--reuse", action="store_true", help="keep bundles already converted in --out instead of converting again")
    args = parser.parse_args()

    samples = read_dataset(args.data, require_test=True).test
    costs = {}
    for role, run in (("teacher", args.teacher), ("student", args.student)):
        model, _ = load_detector(run)
        params, gflops = count_cost(model, model.config.input_size)
        costs[role] = (params, gflops, model.num_experts, model.static_routing)

    rows = []
    for role, run in (("teacher", args.teacher), ("student", args.student)):
        for target, backend in (("onnx", "onnxruntime"), ("intel", "openvino")):
            for precision in ("fp32", "int8"):
                out = args.out / f"{run.name}-{target}-{precision}"
                if not (args.reuse and (out / "manifest.json").is_file()):
                    convert(run, out, ConvertOptions(target=target, precision=precision))
                measured = bundle_accuracy(out, samples, args.threads)
                gate = measured["manifest"].quantization or {}
                rows.append({
                    "role": role, "backend": backend, "precision": precision, "out": out, **measured,
                    "gate": "" if not gate else ("passed" if gate["passed"] else "FAILED") + f", {len(gate['float_layers'])} float layers",
                })
    latencies = isolated_latency([r["out"] for r in rows], args.data / "test" / "good", args.runs, args.threads)
    for row, (p50, p99) in zip(rows, latencies):
        row["p50"], row["p99"] = p50, p99

    print(f"\n{args.data.name}: {len(samples)} test images, batch 1, {args.threads} threads, {args.runs} timed calls per bundle\n")
    for role in ("teacher", "student"):
        params, gflops, experts, static = costs[role]
        share = f", {gflops / costs['teacher'][1]:.0%} of the teacher" if role == "student" else ""
        routing = "static (no router)" if static else "routed"
        print(f"- {role}: {experts} experts, {routing}, {params / 1e6:.2f} M parameters, {gflops:.2f} GFLOPs per image{share}")
    print()
    print("| model | backend | precision | size MB | p50 ms | p99 ms | image AUROC | pixel AUROC | AUPRO | INT8 gate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['role']} | {r['backend']} | {r['precision']} | {r['mb']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{r['image']:.3f} | {r['pixel']:.3f} | {r['aupro']:.3f} | {r['gate']} |"
        )


if __name__ == "__main__":
    main()
