"""``convert``: a trained run in, a checked bundle out, for ONNX Runtime, OpenVINO or TensorRT.

Steps: load the checkpoint; read the calibration images (the run's held-out normal images unless
``calib_data`` names others); fold the routing when asked; export the uint8-in graph to ONNX and check it;
build the target's artifact; measure the normal score distribution on the artifact itself and set the
threshold from it; write the bundle atomically.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from amoe_sdk.checkpoint import load_detector
from amoe_sdk.converters.bundle_writer import BundleWriter
from amoe_sdk.converters.folding import expert_names, fold_routing
from amoe_sdk.converters.graph import INPUT_NAME, OUTPUT_NAMES, EdgeGraph
from amoe_sdk.converters.onnx_export import OPSET, check_finite, export_onnx, save_with_metadata, to_fp16
from amoe_sdk.converters.tensorrt_checks import check_tensorrt_onnx
from amoe_sdk.data.images import list_images
from amoe_sdk.errors import ConfigError, DataError
from amoe_sdk.runtimes.backends import create_backend
from amoe_sdk.runtimes.bundle import SCHEMA_VERSION, Bundle
from amoe_sdk.training.data import load_images
from amoe_sdk.version import __version__

TARGETS = ("onnx", "intel", "jetson")
MIN_CALIBRATION_IMAGES = 8


@dataclass
class ConvertOptions:
    target: str = "onnx"
    precision: str = "fp32"
    routing: str = "dense"
    calib_data: Path | None = None
    fold_min_agreement: float = 0.95
    force: bool = False
    device: str | None = None
    batch_size: int = 1
    threshold_sigma: float = 3.0
    dla_core: int | None = None


def calibration_paths(payload: dict, calib_data: Path | None) -> tuple[list[Path], str]:
    """The normal images to calibrate on, and where they came from."""
    if calib_data is not None:
        paths = list_images(calib_data)
        source = str(calib_data)
    else:
        paths = [Path(p) for p in payload.get("val_images", [])]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(
                f"the run's held-out validation images are gone (first missing: {missing[0]}); "
                "pass --calib-data DIR with normal images that were not used for training"
            )
        source = "the run's held-out validation images"
    if not paths:
        raise DataError(f"no calibration images in {source}; pass --calib-data DIR with normal images (PNG/JPEG/BMP)")
    if len(paths) < MIN_CALIBRATION_IMAGES:
        print(f"warning: only {len(paths)} calibration images in {source}; the threshold is noisy below {MIN_CALIBRATION_IMAGES}")
    return paths, source


def artifact_scores(bundle: Bundle, backend: str, device: str | None, images_nhwc: np.ndarray, batch_size: int) -> np.ndarray:
    """Image scores of the artifact itself on uint8 [N, S, S, 3] frames."""
    runner = create_backend(bundle, backend, device)
    scores = []
    try:
        for start in range(0, len(images_nhwc), batch_size):
            chunk = images_nhwc[start : start + batch_size]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
            scores.append(runner.infer(np.ascontiguousarray(padded))["score"][: len(chunk)])
    finally:
        runner.close()
    return np.concatenate(scores).astype(np.float64)


def _tensorrt_device_present() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        from amoe_sdk.runtimes.backends.tensorrt_backend import _cudart

        err, count = _cudart().cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:  # no driver, no cuda-python: the engine is built on the device instead
        return False


def convert(checkpoint: str | Path, out: str | Path, options: ConvertOptions) -> Path:
    if options.target not in TARGETS:
        raise ConfigError(f"unknown --target {options.target}; choose one of {', '.join(TARGETS)}")
    if options.precision not in ("fp32", "fp16"):
        raise ConfigError(f"--precision {options.precision} is not supported here; choose fp32 or fp16")
    if options.routing not in ("dense", "folded"):
        raise ConfigError(f"--routing {options.routing}: choose dense or folded")
    started = time.time()
    model, payload = load_detector(checkpoint)
    size = model.config.input_size
    paths, source = calibration_paths(payload, options.calib_data)
    images = load_images(paths, size, lambda x: tqdm(x, desc="read calibration", leave=False, unit="img"))

    folding = None
    core: torch.nn.Module = model
    if options.routing == "folded":
        core, report = fold_routing(model, images, options.fold_min_agreement, options.force)
        folding = report.to_dict()
        print(
            f"folded routing: {report.agreement:.1%} of {report.images} images agree on {' + '.join(report.selected)}; "
            f"kept {', '.join(report.kept)}; params {report.params_before:,} -> {report.params_after:,}, "
            f"GFLOPs {report.gflops_before:.2f} -> {report.gflops_after:.2f}"
        )
    graph = EdgeGraph(core).eval()
    names = expert_names(model)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "sdk_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(payload["path"]), "step": payload["step"], "data_root": payload.get("data_root")},
        "target": options.target,
        "precision": options.precision,
        "device": options.device,
        "input": {
            "name": INPUT_NAME, "size": size, "batch": options.batch_size, "layout": "NHWC", "dtype": "uint8",
            "colour": "BGR", "resize": "cv2.resize INTER_LINEAR to size x size",
        },
        "outputs": {
            "anomaly_map": [options.batch_size, 1, size, size],
            "score": [options.batch_size],
            "routing_weights": [options.batch_size, model.num_experts],
        },
        "experts": names,
        "routing": {"mode": options.routing, "top_k": model.config.router.top_k, "folding": folding},
        "normalisation": {
            "map_low": model.map_low.tolist(), "map_high": model.map_high.tolist(),
            "level_weights": model.config.postprocess.level_weights, "top_percent": model.config.postprocess.top_percent,
        },
        "model": payload["config"]["model"],
        "onnx_opset": OPSET,
    }
    with BundleWriter(out) as writer:
        onnx_path = writer.path("model.onnx")
        onnx_model = export_onnx(graph, onnx_path, size, options.batch_size)
        check_finite(onnx_path, size, options.batch_size)
        if options.target == "onnx" and options.precision == "fp16":
            onnx_model = to_fp16(onnx_model)
        provisional = {"schema_version": SCHEMA_VERSION, "target": options.target, "precision": options.precision}
        if options.target == "jetson":
            check_tensorrt_onnx(onnx_model, str(onnx_path))
            save_with_metadata(onnx_model, onnx_path, {"amoe_manifest": manifest})
            artifacts = {"tensorrt_onnx": "model.onnx"}
            # Measured with ONNX Runtime on the TensorRT-ready ONNX; amoe verify checks the engine on the device.
            measure_as, measure_artifacts = "onnxruntime", {"onnx": "model.onnx"}
        elif options.target == "onnx":
            save_with_metadata(onnx_model, onnx_path, {"amoe_manifest": manifest})
            artifacts = measure_artifacts = {"onnx": "model.onnx"}
            measure_as = "onnxruntime"
        else:
            artifacts = measure_artifacts = {"openvino_xml": "model.xml", "openvino_bin": "model.bin"}
            measure_as = "openvino"
        probe = Bundle(writer.tmp, {**provisional, "artifacts": measure_artifacts, "input": manifest["input"]})
        nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        if options.target == "intel":
            # The IR needs the threshold in rt_info: measure on an FP32 IR first when FP16 is asked for.
            from amoe_sdk.converters.openvino_export import export_openvino

            export_openvino(onnx_path, writer.path("model.xml"), False, {"image": 0.0, "pixel": 0.0}, {})
            scores = artifact_scores(probe, measure_as, options.device, nhwc, options.batch_size)
            threshold = _threshold(scores, options.threshold_sigma, source, measure_as)
            export_openvino(onnx_path, writer.path("model.xml"), options.precision == "fp16", threshold, {k: manifest[k] for k in ("sdk_version", "input", "routing")})
            if options.precision == "fp16":
                scores = artifact_scores(probe, measure_as, options.device, nhwc, options.batch_size)
                threshold = _threshold(scores, options.threshold_sigma, source, measure_as)
            onnx_path.unlink()
        else:
            scores = artifact_scores(probe, measure_as, None, nhwc, options.batch_size)
            threshold = _threshold(scores, options.threshold_sigma, source, measure_as)
        if options.target == "jetson" and _tensorrt_device_present():
            from amoe_sdk.runtimes.backends.tensorrt_engine import EngineOptions, build_engine

            engine = build_engine(onnx_path, writer.path("model.engine"), EngineOptions(fp16=options.precision == "fp16", dla_core=options.dla_core, timing_cache=writer.path("timing.cache")))
            artifacts["tensorrt_engine"] = "model.engine"
            from amoe_sdk.runtimes.backends.tensorrt_backend import TensorRTBackend

            manifest["tensorrt_engine"] = {**engine, "gpu": TensorRTBackend.gpu_name(0)}
        elif options.target == "jetson":
            manifest["tensorrt_engine"] = None
            print("no TensorRT + CUDA device here: the bundle carries the TensorRT-ready ONNX; the engine is built on the device at first load")
        manifest["artifacts"] = artifacts
        manifest["threshold"] = threshold
        manifest["calibration"] = {"images": len(paths), "source": source, "measured_with": measure_as}
        manifest["convert_seconds"] = round(time.time() - started, 1)
        return writer.commit(manifest)


def _threshold(scores: np.ndarray, sigma: float, source: str, backend: str) -> dict:
    """The image threshold from normal scores: mean + sigma * std. The pixel threshold is the same value: the
    image score is the mean of the map's top pixels, so both live on the map's normalised scale."""
    mean, std = float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    value = mean + sigma * std
    return {
        "image": value, "pixel": value, "sensitivity": 0.5, "rule": f"mean + {sigma:g} std of normal scores",
        "normal_score_mean": mean, "normal_score_std": std, "normal_score_max": float(scores.max()),
        "images": len(scores), "source": source, "measured_with": backend,
    }
