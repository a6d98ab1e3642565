"""Our detector against anomalib's PaDiM and PatchCore: the same images, the same embedded Lite0 encoder, one
metric implementation (ours), one table.

Usage: python examples/benchmark_peers.py DATA_DIR [--categories kit pins ...] [--runs runs] [--bundles bundles/peers]
                                          [--models ours ours-int8 student padim patchcore] [--threads 2] [--retrain]
                                          [--no-latency] [--json-out peers.json] [--merge earlier.json ...]

Needs the ``peers`` extra (anomalib; it keeps our torch): pip install -e ".[peers]"

Per category: our detector with the default config (``amoe train`` into RUNS/<category> unless a finished run is
there, or ``--retrain``), PaDiM on Lite0 ``blocks.1``, ``blocks.2``, ``blocks.4`` and PatchCore on ``blocks.2``,
``blocks.4`` (coreset 10 %). The peers get our Lite0 ImageNet weights loaded strictly into anomalib's timm
extractor (every key present with its shape, then the extractor's stage outputs compared with our encoder's on a
real image: anomalib would silently run a random backbone otherwise), the same 256 px input and the encoder's
own normalisation (mean = std = 0.5; ImageNet statistics are measurably worse for these weights). Every model is
scored by ``amoe_sdk.evaluation.evaluate.score_predictions`` on the category's test split: image AUROC, pixel
AUROC and AUPRO (masks compared at 256 px), overall and per defect type. Training time is wall time on this
machine: ours includes encoding and calibration; the peers' includes feature extraction and the Gaussian fit or
the coreset. Latency is end to end at batch 1 with 2 threads on each model's OpenVINO FP32 export: resize of the
frame, inference, the map back at the frame's size (ours through ``EdgeDetector.predict``).

``--models`` picks the columns (default: ours, padim, patchcore): ``ours-int8`` is our INT8 OpenVINO bundle (``amoe
convert --target intel --precision int8``, through its accuracy gate), ``student`` the student ``amoe distill``
makes from our run with its defaults (RUNS/<category>-student), each scored through its bundle on the same test
images. The peers' figures do not change with ours, and PatchCore's coreset is slow, so a run's ``--json-out``
can be laid under a later run's with ``--merge`` and printed as one table. ``--no-latency`` skips the latency
column: for a run pinned to one core beside other work, whose timings would mean nothing.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from amoe_sdk import EdgeDetector
from amoe_sdk.checkpoint import load_detector, read_checkpoint
from amoe_sdk.config import load_config
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.data.images import read_image, resize_to_input
from amoe_sdk.data.layouts import read_dataset
from amoe_sdk.evaluation.evaluate import evaluate, score_predictions
from amoe_sdk.models.encoders import Lite0Encoder
from amoe_sdk.models.lite0_weights import load_lite0_state_dict
from amoe_sdk.outputs import atomic_write_text
from bench_common import bundle_accuracy, call_latency

SIZE = 256
LATENCY_RUNS = 100
PADIM_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
PATCHCORE_LAYERS = ["blocks.2", "blocks.4"]


def rgb_batch(images_bgr: list[np.ndarray]) -> torch.Tensor:
    """BGR uint8 frames at SIZE -> the peers' input: RGB, (x / 255 - 0.5) / 0.5, NCHW float."""
    array = np.stack(images_bgr)[..., ::-1].astype(np.float32) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def load_resized(paths) -> list[np.ndarray]:
    return [resize_to_input(read_image(p), SIZE) for p in paths]


def load_our_lite0(extractor: torch.nn.Module, probe_bgr: np.ndarray) -> None:
    """Our Lite0 weights into anomalib's timm feature extractor, every key matched, then the features compared."""
    ours = load_lite0_state_dict()
    target = extractor.state_dict()
    missing = sorted(set(target) - set(ours))
    wrong = sorted(k for k in target if k in ours and ours[k].shape != target[k].shape)
    if missing or wrong:
        raise SystemExit(f"anomalib's extractor does not match our Lite0 weights: missing {missing[:5]}, wrong shape {wrong[:5]}")
    extractor.load_state_dict({k: ours[k] for k in target}, strict=True)
    encoder = Lite0Encoder(load_config().model.encoder, SIZE).eval()
    with torch.no_grad():
        x = encoder.stem(encoder.preprocess(torch.from_numpy(probe_bgr).permute(2, 0, 1)[None].float()))
        reference = {}
        for index, stage in enumerate(encoder.stages[:5]):
            x = stage(x)
            reference[f"blocks.{index}"] = x
        theirs = extractor(rgb_batch([probe_bgr]))
    theirs = theirs if isinstance(theirs, list) else list(theirs.values())
    names = [info["module"] for info in extractor.feature_info.get_dicts()]
    for name, feature in zip(names, theirs):
        error = float((feature - reference[name]).abs().max() / reference[name].abs().max())
        if error > 1e-4:
            raise SystemExit(f"anomalib's {name} differs from our encoder's by {error:.2e}: the backbone is not ours")


class Peer:
    """A PaDiM or PatchCore torch model fitted on the normal images, and its OpenVINO export."""

    def __init__(self, kind: str, train_images: list[np.ndarray], coreset: float):
        from anomalib.models.image.padim.torch_model import PadimModel
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        self.kind = kind
        if kind == "padim":
            self.model = PadimModel(backbone="tf_efficientnet_lite0", layers=PADIM_LAYERS, pre_trained=False, n_features=100)
        else:
            self.model = PatchcoreModel(layers=PATCHCORE_LAYERS, backbone="tf_efficientnet_lite0", pre_trained=False)
        load_our_lite0(self.model.feature_extractor.feature_extractor, train_images[0])
        started = time.perf_counter()
        self.model.train()
        for start in range(0, len(train_images), 16):
            self.model(rgb_batch(train_images[start : start + 16]))
        if kind == "padim":
            self.model.fit()
        else:
            self.model.subsample_embedding(coreset)
        self.model.eval().requires_grad_(False)  # nothing trains; the tracer refuses tensors that want gradients
        self.train_seconds = time.perf_counter() - started

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for start in range(0, len(images), 8):
            out = self.model(rgb_batch(images[start : start + 8]))
            scores.append(out.pred_score.reshape(-1).numpy())
            maps.append(out.anomaly_map[:, 0].numpy())
        return np.concatenate(scores), np.concatenate(maps)

    def export_openvino(self, folder: Path):
        """uint8 BGR NHWC [1, SIZE, SIZE, 3] in (our contract), (anomaly map, score) out; -> a compiled model."""
        import openvino as ov

        model = self.model

        class Graph(torch.nn.Module):
            def forward(self, images):
                x = images.permute(0, 3, 1, 2).flip(1).float() / 127.5 - 1.0
                out = model(x)
                return out.anomaly_map, out.pred_score

        folder.mkdir(parents=True, exist_ok=True)
        onnx_path = folder / f"{self.kind}.onnx"
        with torch.no_grad():
            torch.onnx.export(Graph().eval(), (torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8),), str(onnx_path),
                              dynamo=False, opset_version=17, input_names=["images"], output_names=["anomaly_map", "score"])
        return ov.Core().compile_model(ov.convert_model(str(onnx_path)), "CPU",
                                       {"INFERENCE_NUM_THREADS": "2", "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})


def peer_step(compiled):
    request = compiled.create_infer_request()

    def step(frame: np.ndarray) -> float:
        out = request.infer({0: cv2.resize(frame, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)[None]})
        amap = np.asarray(out[compiled.outputs[0]])[0, 0]
        cv2.resize(amap, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_LINEAR)
        return float(np.asarray(out[compiled.outputs[1]]).reshape(-1)[0])

    return step


def bundle_timer(bundle: Path, category: Path, threads: int):
    """-> a call giving p50, p99 ms of ``EdgeDetector.predict`` on the category's test frames: resize, inference,
    map back."""
    def timer() -> tuple[float, float]:
        frames = [read_image(s.image_path) for s in read_dataset(category, require_test=True).test]
        with EdgeDetector(bundle, threads=threads) as detector:
            return call_latency(lambda f: detector.predict(f).score, frames, LATENCY_RUNS)

    return timer


def trained_run(category: Path, runs: Path, retrain: bool = False) -> Path:
    """RUNS/<category>, trained with the default config where it has no finished run (or with ``retrain``)."""
    from amoe_sdk.training.trainer import train

    run = runs / category.name
    if retrain or not (run / "model.pt").is_file():
        train(category, run, load_config(), resume=False)
    return run


def run_result(run: Path, category: Path, bundle: Path, threads: int):
    """A run of ours scored in PyTorch (``evaluate``: per defect and per level), and the timer of its FP32 OpenVINO
    bundle, written to ``bundle``."""
    model, _ = load_detector(run)
    result = evaluate(model, read_dataset(category, require_test=True), show_progress=False)
    result["train_seconds"] = read_checkpoint(run)["train_seconds"]
    return result, bundle_timer(convert(run, bundle, ConvertOptions(target="intel")), category, threads)


def ours(category: Path, args):
    run = trained_run(category, args.runs, args.retrain)
    return run_result(run, category, args.bundles / f"{category.name}-ours-intel", args.threads)


def ours_int8(category: Path, args):
    """Our INT8 OpenVINO bundle, scored through its backend on the test images (a bundle has no PyTorch twin)."""
    from amoe_sdk.errors import ConversionError

    run = trained_run(category, args.runs)
    try:
        bundle = convert(run, args.bundles / f"{category.name}-ours-intel-int8", ConvertOptions(target="intel", precision="int8"))
    except ConversionError as exc:  # the accuracy gate refused: a result too, printed as such
        return {"refused": str(exc)}, None
    dataset = read_dataset(category, require_test=True)
    accuracy = bundle_accuracy(bundle, dataset.test, args.threads)
    result = {**score_predictions(dataset, accuracy["scores"], accuracy["maps"]), "train_seconds": read_checkpoint(run)["train_seconds"]}
    return result, bundle_timer(bundle, category, args.threads)


def student(category: Path, args):
    from amoe_sdk.training.distill import distill

    teacher = trained_run(category, args.runs)
    out = args.runs / f"{category.name}-student"
    if not (out / "model.pt").is_file():
        distill(teacher, category, out, resume=False)
    return run_result(out, category, args.bundles / f"{category.name}-student-intel", args.threads)


def peer(kind: str):
    def fit_and_score(category: Path, args):
        dataset = read_dataset(category, require_test=True)
        fitted = Peer(kind, load_resized(dataset.train), args.coreset)
        scores, maps = fitted.predict(load_resized([s.image_path for s in dataset.test]))
        result = {**score_predictions(dataset, scores, maps), "train_seconds": fitted.train_seconds}
        compiled = fitted.export_openvino(args.bundles / f"{category.name}-{kind}")
        frames = [read_image(s.image_path) for s in dataset.test]
        return result, lambda: call_latency(peer_step(compiled), frames, LATENCY_RUNS)

    return fit_and_score


# Each column: (category, args) -> (result, a call that times it, or None where there is nothing to time).
MODELS = {"ours": ours, "ours-int8": ours_int8, "student": student, "padim": peer("padim"), "patchcore": peer("patchcore")}


def measure(model: str, category: Path, args) -> dict:
    result, timer = MODELS[model](category, args)
    if timer is not None and args.latency:
        result["p50_ms"], result["p99_ms"] = timer()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="folder of MVTec-layout categories (amoe data sample writes one)")
    parser.add_argument("--categories", nargs="+", help="default: every category in DATA_DIR")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="our runs: RUNS/<category> (trained when missing)")
    parser.add_argument("--bundles", type=Path, default=Path("bundles/peers"), help="OpenVINO exports for the latency column")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["ours", "padim", "patchcore"],
                        help="the columns, in this order (default: ours padim patchcore)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--coreset", type=float, default=0.1, help="PatchCore coreset sampling ratio (default 0.1)")
    parser.add_argument("--retrain", action="store_true", help="train our detector again even where a finished run exists")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency column")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", default=[],
                        help="--json-out files of earlier runs: their models join the table where this run has none")
    args = parser.parse_args()
    if any(m in ("padim", "patchcore") for m in args.models):
        try:
            import anomalib  # noqa: F401
        except ImportError:
            print('benchmark_peers.py needs anomalib for the peers: pip install -e ".[peers]"', file=sys.stderr)
            return 2
    for path in args.merge:
        if not path.is_file():
            print(f"--merge {path} does not exist: pass a file an earlier --json-out wrote", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    names = args.categories or sorted(p.name for p in args.data.iterdir() if (p / "train" / "good").is_dir())
    results: dict[str, dict[str, dict]] = {}
    for name in names:
        results[name] = {model: measure(model, args.data / name, args) for model in args.models}
        print(f"done {name}", file=sys.stderr, flush=True)
        if args.json_out:  # after every category: an interrupted run keeps what it measured
            atomic_write_text(args.json_out, json.dumps(results, indent=1, default=float))
    models = list(args.models)
    for path in args.merge:
        for name, by_model in json.loads(path.read_text()).items():
            if name not in results:
                continue
            for model, result in by_model.items():
                results[name].setdefault(model, result)
                if model not in models:
                    models.append(model)
    print_tables(results, models)
    return 0


def print_tables(results: dict, models: list[str]) -> None:
    print("| category | model | image AUROC | pixel AUROC | AUPRO | training s | OpenVINO FP32 p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, by_model in results.items():
        for model in models:
            r = by_model.get(model)
            if r is None:
                print(f"| {name} | {model} | not run | | | | |")
                continue
            if "refused" in r:
                print(f"| {name} | {model} | refused by the INT8 gate: {r['refused'][:120]} | | | | |")
                continue
            latency = f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}" if "p50_ms" in r else "not measured"
            print(f"| {name} | {model} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
                  f"{r['train_seconds']:.0f} | {latency} |")
    means = {m: np.mean([results[n].get(m, {}).get("image_auroc", np.nan) for n in results]) for m in models}
    print("\nmean image AUROC: " + ", ".join(f"{m} {v:.3f}" for m, v in means.items()))
    print("\n| category | defect | " + " | ".join(f"{m} image / pixel" for m in models) + " |")
    print("|---|---|" + "---|" * len(models))
    for name, by_model in results.items():
        scored = [by_model[m] for m in models if "per_defect" in by_model.get(m, {})]
        for defect in scored[0]["per_defect"] if scored else []:
            cells = [
                f"{by_model[m]['per_defect'][defect]['image_auroc']:.3f} / {by_model[m]['per_defect'][defect]['pixel_auroc']:.3f}"
                if "per_defect" in by_model.get(m, {}) else "-" for m in models
            ]
            print(f"| {name} | {defect} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
