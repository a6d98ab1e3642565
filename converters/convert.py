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
import onnx
import torch
from tqdm.auto import tqdm

from amoe_sdk.checkpoint import load_detector
from amoe_sdk.converters.bundle_writer import BundleWriter, check_bundle_destination
from amoe_sdk.converters.folding import expert_names, fold_routing
from amoe_sdk.converters.graph import INPUT_NAME, EdgeGraph, infer_in_batches
from amoe_sdk.converters.onnx_export import OPSET, check_finite, export_onnx, onnx_infer, save_with_metadata, to_fp16
from amoe_sdk.converters.openvino_export import compiled_infer, save_openvino
from amoe_sdk.converters.quantize_common import allowed_flips
from amoe_sdk.converters.tensorrt_checks import check_tensorrt_onnx
from amoe_sdk.calibration.data import MIN_INT8_CALIBRATION_IMAGES, MIN_THRESHOLD_IMAGES, gate_set, load_frames, normal_image_paths
from amoe_sdk.calibration.tensorrt_cache import write_tensorrt_cache
from amoe_sdk.calibration.thresholds import normal_threshold
from amoe_sdk.data.images import list_images
from amoe_sdk.errors import ConfigError, ConversionError, DataError
from amoe_sdk.runtimes.bundle import sha256_of
from amoe_sdk.runtimes.manifest import DEVICE_EXAMPLES, DEVICE_PATTERNS, SCHEMA_VERSION, TARGETS
from amoe_sdk.training.data import load_images
from amoe_sdk.typed import describe_range, in_range
from amoe_sdk.version import __version__

# Every artifact's threshold is measured in FP32 arithmetic (OpenVINO pinned to f32, ONNX Runtime on the CPU); the
# runtime pins the same precision on every device.
MEASURED_PRECISION = "f32"


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
    max_drop: float = 0.01
    max_threshold_rise: float = 2.0
    calib_method: str = "minmax"
    val_data: Path | None = None
    accuracy_control: bool = True
    tensorrt_cache_version: str = "8.6.1"


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
    if len(paths) < MIN_THRESHOLD_IMAGES:
        print(f"warning: only {len(paths)} calibration images in {source}; the threshold is noisy below {MIN_THRESHOLD_IMAGES}")
    return paths, source


def _tensorrt_device_present() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        from amoe_sdk.runtimes.backends.tensorrt_backend import _cudart

        err, count = _cudart().cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:  # no driver, no cuda-python: the engine is built on the device instead
        return False


def check_options(options: ConvertOptions) -> None:
    if options.target not in TARGETS:
        raise ConfigError(f"unknown --target {options.target}; choose one of {', '.join(TARGETS)}")
    if options.precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"--precision {options.precision}: choose fp32, fp16 or int8")
    if options.routing not in ("dense", "folded"):
        raise ConfigError(f"--routing {options.routing}: choose dense or folded")
    if options.device is not None and not DEVICE_PATTERNS[options.target].fullmatch(options.device):
        raise ConfigError(f"--device {options.device} is not a device for --target {options.target}; choose {DEVICE_EXAMPLES[options.target]}")
    if options.batch_size < 1:
        raise ConfigError(f"--batch {options.batch_size}: the batch size must be at least 1")
    for flag, value, low, high in (("--fold-min-agreement", options.fold_min_agreement, 0.0, 1.0), ("--max-drop", options.max_drop, None, 1.0),
                                   ("--threshold-sigma", options.threshold_sigma, 0.0, None), ("--max-threshold-rise", options.max_threshold_rise, 1.0, None)):
        if not in_range(value, low, high):
            raise ConfigError(f"{flag} {value} is out of range: allowed {describe_range(low, high)}")


def convert(checkpoint: str | Path, out: str | Path, options: ConvertOptions) -> Path:
    """Convert the run or checkpoint ``checkpoint`` into the bundle folder ``out``. ``out`` must be new, empty or a
    bundle (replaced atomically); anything else is refused before any work."""
    check_options(options)
    check_bundle_destination(Path(out))
    started = time.time()
    model, payload = load_detector(checkpoint)
    for expert in model.patch_experts:  # the same maps, without the whitened form that was not chosen
        expert.drop_unused_whitening()
    model.drop_unused_map_terms()
    source_file = Path(payload["path"]).resolve()
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
        # Absolute, so that amoe verify finds it from any working directory; the hash tells a retrained run apart.
        "source": {"checkpoint": str(source_file), "step": payload["step"], "data_root": payload.get("data_root"), "sha256": sha256_of(source_file)},
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
        "routing": {
            "mode": options.routing, "top_k": model.config.router.top_k, "folding": folding,
            # A distilled student has no router: every expert counts, equally within its level.
            "static": model.static_routing,
        },
        "normalisation": {
            "map_low": model.map_low.tolist(), "map_high": model.map_high.tolist(),
            "level_weights": model.level_weights.tolist(), "top_percent": model.config.postprocess.top_percent,
        },
        "model": payload["config"]["model"],
        "onnx_opset": OPSET,
    }
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    with BundleWriter(out) as writer:
        onnx_path = writer.path("model.onnx")
        onnx_model = export_onnx(graph, onnx_path, size, options.batch_size)
        check_finite(onnx_path, size, options.batch_size)
        quantization = int8_frames = gate = None
        if options.precision == "int8":
            int8_frames, int8_source = int8_calibration_frames(payload, options.calib_data, size)
            gate = gate_set(nhwc, size, options.val_data, seed=0)
            print(f"INT8: calibrating on {len(int8_frames)} images from {int8_source}; gate on {gate.source}")
        if options.target == "intel":
            artifacts = {"openvino_xml": "model.xml", "openvino_bin": "model.bin"}
            measure_as = "openvino"
            ov_model, quantization = _openvino_model(onnx_path, options, int8_frames, gate)
            onnx_path.unlink()
            # Write, read back and measure the IR as it will run (FP16 weights included), then write it again
            # with the measured threshold in its rt_info.
            core_keys = {k: manifest[k] for k in ("sdk_version", "input", "routing")}
            # A separate file: OpenVINO memory-maps the .bin it reads, so it must not be rewritten in place.
            save_openvino(ov_model, writer.path("measure.xml"), options.precision != "fp32", {"image": 0.0, "pixel": 0.0}, core_keys)
            import openvino as ov

            ov_model = ov.Core().read_model(str(writer.path("measure.xml")))
            infer = compiled_infer(ov_model)
            threshold = _threshold(infer_in_batches(infer, nhwc, options.batch_size)["score"].astype(np.float64), options.threshold_sigma, source, measure_as)
            save_openvino(ov_model, writer.path("model.xml"), False, threshold, core_keys)
            del ov_model, infer
            writer.path("measure.xml").unlink()
            writer.path("measure.bin").unlink()
        else:
            measure_as = "onnxruntime"
            if options.target == "jetson":
                check_tensorrt_onnx(onnx_model, str(onnx_path))
            if options.precision == "fp16":
                onnx_model = to_fp16(onnx_model)
                onnx.save(onnx_model, str(onnx_path))
            elif options.precision == "int8":
                fp32_path = writer.path("fp32.onnx")
                onnx_path.rename(fp32_path)
                quantization = _quantize_onnx(fp32_path, onnx_path, int8_frames, gate, options)
                fp32_path.unlink()
                onnx_model = onnx.load(str(onnx_path))
                if options.target == "jetson":
                    check_tensorrt_onnx(onnx_model, str(onnx_path))
                    count = write_tensorrt_cache(onnx_model, writer.path("calibration.cache"), options.tensorrt_cache_version)
                    quantization["tensorrt_calibration_cache"] = {"file": "calibration.cache", "tensors": count, "tensorrt_version": options.tensorrt_cache_version}
            save_with_metadata(onnx_model, onnx_path, {"amoe_manifest": manifest})
            artifacts = {"tensorrt_onnx": "model.onnx"} if options.target == "jetson" else {"onnx": "model.onnx"}
            if quantization and "tensorrt_calibration_cache" in quantization:
                artifacts["tensorrt_calibration_cache"] = "calibration.cache"
            # For jetson: measured with ONNX Runtime on the TensorRT-ready ONNX; amoe verify checks the engine on the device.
            scores = infer_in_batches(onnx_infer(onnx_path), nhwc, options.batch_size)["score"].astype(np.float64)
            threshold = _threshold(scores, options.threshold_sigma, source, measure_as)
        if quantization is not None:
            fp32_threshold = quantization["threshold_fp32"]
            quantization["threshold_shift"] = threshold["image"] - fp32_threshold
            print(
                f"INT8 gate {'passed' if quantization['passed'] else 'FAILED'}: image AUROC {quantization['fp32']['image_auroc']:.4f} -> "
                f"{quantization['int8']['image_auroc']:.4f}, pixel AUROC {quantization['fp32']['pixel_auroc']:.4f} -> "
                f"{quantization['int8']['pixel_auroc']:.4f}; {len(quantization['float_layers'])} layer(s) kept in float; "
                f"threshold {fp32_threshold:.4f} -> {threshold['image']:.4f}; {quantization['gate_label_flips']} gate verdict(s) flipped; "
                f"{group_summary(quantization)}"
            )
            manifest["quantization"] = quantization
        if options.target == "jetson" and _tensorrt_device_present():
            from amoe_sdk.runtimes.backends.tensorrt_backend import TensorRTBackend
            from amoe_sdk.runtimes.backends.tensorrt_engine import EngineOptions, build_engine

            engine = build_engine(onnx_path, writer.path("model.engine"), EngineOptions(fp16=options.precision != "fp32", dla_core=options.dla_core, timing_cache=writer.path("timing.cache")))
            artifacts["tensorrt_engine"] = "model.engine"
            manifest["tensorrt_engine"] = {**engine, "gpu": TensorRTBackend.gpu_name(0)}
        elif options.target == "jetson":
            manifest["tensorrt_engine"] = None
            print("no TensorRT + CUDA device here: the bundle carries the TensorRT-ready ONNX; the engine is built on the device at first load")
        manifest["artifacts"] = artifacts
        manifest["threshold"] = threshold
        manifest["calibration"] = {"images": len(paths), "source": source, "measured_with": measure_as}
        manifest["convert_seconds"] = round(time.time() - started, 1)
        return writer.commit(manifest)


def int8_calibration_frames(payload: dict, calib_data: Path | None, size: int) -> tuple[np.ndarray, str]:
    """INT8 range calibration images: ``--calib-data`` or the run's training images."""
    if calib_data is not None:
        paths = normal_image_paths(calib_data)
        return load_frames(paths, size), str(calib_data)
    paths = [Path(p) for p in payload.get("train_images", [])]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise DataError(
            f"the run's training images are gone ({missing[0] if missing else 'none recorded'}); "
            "pass --calib-data DIR with normal images for INT8 calibration"
        )
    if len(paths) < MIN_INT8_CALIBRATION_IMAGES:
        print(f"warning: only {len(paths)} INT8 calibration images; ranges are unreliable below {MIN_INT8_CALIBRATION_IMAGES}")
    return load_frames(paths, size), "the run's training images"


def _quantization_report(result_reference, result_final, float_layers: list[str], passed: bool, options: ConvertOptions, tries: list[dict], gate) -> dict:
    changed = [
        int(i) for i in np.nonzero(((result_reference.routing > 0) != (result_final.routing > 0)).any(axis=1))[0]
    ]
    return {
        "method": options.calib_method if options.target != "intel" else ("nncf accuracy control" if options.accuracy_control else "nncf"),
        "max_drop": options.max_drop,
        "gate_data": gate.source,
        "fp32": {"image_auroc": result_reference.image_auroc, "pixel_auroc": result_reference.pixel_auroc},
        "int8": {"image_auroc": result_final.image_auroc, "pixel_auroc": result_final.pixel_auroc},
        # Each anomaly group against the normals, gated on its own: (image AUROC, pixel AUROC) FP32 and INT8.
        "groups": {name: {"fp32": list(result_reference.groups[name]), "int8": list(values)} for name, values in result_final.groups.items()},
        "drop": result_final.drop_from(result_reference),
        "gate_label_flips": result_final.flips_from(result_reference),
        "gate_images": len(gate.labels),
        "threshold_rise": result_final.threshold_rise(result_reference),
        "passed": passed,
        "float_layers": float_layers,
        "routing_changed_images": changed if options.routing == "dense" else [],
        "tries": tries,
        "threshold_fp32": result_reference.threshold,
    }


def _check_gate(report: dict, options: ConvertOptions) -> None:
    if report["passed"] or options.force:
        return
    raise ConversionError(
        f"INT8 misses the accuracy gate (--max-drop {options.max_drop}): image AUROC {report['fp32']['image_auroc']:.4f} -> "
        f"{report['int8']['image_auroc']:.4f}, pixel AUROC {report['fp32']['pixel_auroc']:.4f} -> {report['int8']['pixel_auroc']:.4f}, "
        f"{report['gate_label_flips']} gate verdict(s) flipped (at most {allowed_flips(report['gate_images'])} allowed), "
        f"threshold x{report['threshold_rise']:.2f} (at most x{options.max_threshold_rise:g}); {group_summary(report)} "
        f"even with {len(report['float_layers'])} layer(s) in float; use --precision fp16, raise --max-drop, or --force to keep it"
    )


def group_summary(report: dict) -> str:
    """Image / pixel AUROC FP32 -> INT8 of each gate group, as one clause."""
    return "by group: " + ", ".join(
        f"{name} {g['fp32'][0]:.4f} / {g['fp32'][1]:.4f} -> {g['int8'][0]:.4f} / {g['int8'][1]:.4f}" for name, g in report["groups"].items()
    )


def _quantize_onnx(fp32_path: Path, out_path: Path, frames: np.ndarray, gate, options: ConvertOptions, enforce: bool = True) -> dict:
    from amoe_sdk.converters.quantize_onnx import gated_quantize

    result = gated_quantize(fp32_path, out_path, frames, gate, options.batch_size, onnx_infer, options.max_drop,
                            options.calib_method, for_tensorrt=options.target == "jetson", sigma=options.threshold_sigma,
                            max_threshold_rise=options.max_threshold_rise)
    report = _quantization_report(result.reference, result.final, result.float_nodes, result.passed, options, result.tries, gate)
    report["float_groups"] = result.float_groups
    report["ranking"] = result.ranking
    if enforce:
        _check_gate(report, options)
    return report


def _openvino_model(onnx_path: Path, options: ConvertOptions, frames, gate):
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    if options.precision != "int8":
        return model, None
    from amoe_sdk.converters.quantize_openvino import quantize_openvino

    # The layer search runs on ONNX Runtime's QDQ simulation of the same graph (seconds per try, where NNCF's
    # accuracy control takes minutes); NNCF then quantizes with the groups it found kept in float.
    search = _quantize_onnx(onnx_path, onnx_path.with_name("search.onnx"), frames, gate, options, enforce=False)
    onnx_path.with_name("search.onnx").unlink(missing_ok=True)
    quantized, reference, final, float_layers, float_groups = quantize_openvino(
        model, frames, gate, options.batch_size, options.max_drop, options.accuracy_control, search["float_groups"], options.threshold_sigma,
        options.max_threshold_rise, search["ranking"],
    )
    report = _quantization_report(reference, final, float_layers, final.passes(reference, options.max_drop, options.max_threshold_rise), options, search["tries"], gate)
    report["float_groups"] = float_groups
    report["ranking"] = search["ranking"]
    _check_gate(report, options)
    return quantized, report


def _threshold(scores: np.ndarray, sigma: float, source: str, backend: str) -> dict:
    """The image threshold from normal scores: mean + sigma * std. The pixel threshold is the same value: the
    image score is the mean of the map's top pixels, so both live on the map's normalised scale."""
    value, mean, std = normal_threshold(scores, sigma)
    return {
        "image": value, "pixel": value, "sensitivity": 0.5, "rule": f"mean + {sigma:g} std of normal scores",
        "normal_score_mean": mean, "normal_score_std": std, "normal_score_max": float(scores.max()),
        "images": len(scores), "source": source, "measured_with": backend, "inference_precision": MEASURED_PRECISION,
    }
