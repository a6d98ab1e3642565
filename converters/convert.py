"""``convert``: a trained run in, a checked bundle out, for ONNX Runtime, OpenVINO or TensorRT.

In the shape of Ultralytics' exporter: ``Exporter`` first prepares what every target shares (the checkpoint,
the calibration images, the folded routing, the uint8-in ONNX graph (the encoder's graph, which a range's
products share, joined to the product's head), the INT8 calibration and gate images and the metadata), then runs
its target's one method (``export_onnx``, ``export_openvino``, ``export_tensorrt``), and ends in one finishing
step: the threshold measured on the artifact itself, then one manifest, written into every artifact (ONNX
``metadata_props``, OpenVINO ``rt_info``) and as ``manifest.json``, where the bundle is committed atomically.
``CONDITIONAL_OPTIONS`` says which options apply to which conversions; one given where it
does not apply is a usage error, never silently ignored.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from amoe_sdk.calibration.data import MIN_INT8_CALIBRATION_IMAGES, MIN_THRESHOLD_IMAGES, gate_set, load_frames, normal_image_paths
from amoe_sdk.calibration.tensorrt_cache import write_tensorrt_cache
from amoe_sdk.calibration.thresholds import normal_threshold
from amoe_sdk.checkpoint import load_detector
from amoe_sdk.converters.bundle_writer import BundleWriter, check_bundle_destination
from amoe_sdk.converters.folding import fold_routing
from amoe_sdk.converters.graph import INPUT_NAME, infer_in_batches
from amoe_sdk.converters.onnx_export import OPSET, EncoderExports, check_finite, export_onnx, onnx_infer, save_with_metadata, to_fp16
from amoe_sdk.converters.openvino_export import compiled_infer, save_openvino
from amoe_sdk.converters.quantize_common import QuantizationReport
from amoe_sdk.converters.tensorrt_checks import check_tensorrt_onnx
from amoe_sdk.data.images import list_images
from amoe_sdk.errors import ConfigError, ConversionError, DataError, UsageError
from amoe_sdk.models.layers import top_percent_mean
from amoe_sdk.models.routing import expert_names
from amoe_sdk.runtimes.manifest import (
    DEVICE_EXAMPLES, DEVICE_PATTERNS, PRECISIONS, ROUTING_MODES, SCHEMA_VERSION, TARGETS, BundleManifest,
)
from amoe_sdk.training.data import load_images
from amoe_sdk.outputs import sha256_of
from amoe_sdk.typed import describe_range, in_range
from amoe_sdk.version import __version__

# Every artifact's threshold is measured in FP32 arithmetic (OpenVINO pinned to f32, ONNX Runtime on the CPU); the
# runtime pins the same precision on every device.
LOG = logging.getLogger("amoe_sdk.converters")
MEASURED_PRECISION = "f32"
# The keys of the manifest that depend on the artifacts' bytes: ``manifest.json`` has them, the copy inside each
# artifact cannot.
AFTER_ARTIFACTS = ("files", "manifest_sha256")


@dataclass(frozen=True)
class OptionScope:
    """Where an option applies (None: everywhere along that axis), its flag, and its value when not given."""

    flag: str
    default: Any
    targets: tuple[str, ...] = TARGETS
    precisions: tuple[str, ...] | None = None
    routing: tuple[str, ...] | None = None

    def applies(self, target: str, precision: str, routing: str) -> bool:
        return (
            target in self.targets
            and (self.precisions is None or precision in self.precisions)
            and (self.routing is None or routing in self.routing)
        )

    def where(self) -> str:
        parts = [f"--target {' / '.join(self.targets)}"] if self.targets != TARGETS else []
        if self.precisions:
            parts.append(f"--precision {' / '.join(self.precisions)}")
        if self.routing:
            parts.append(f"--routing {' / '.join(self.routing)}")
        return " with ".join(parts)


# The options only some conversions take (Ultralytics' table of formats and their arguments). Each is None in
# ``ConvertOptions`` until given, so that a given one is told apart from its default.
CONDITIONAL_OPTIONS = {
    "fold_min_agreement": OptionScope("--fold-min-agreement", 0.95, routing=("folded",)),
    "max_drop": OptionScope("--max-drop", 0.01, precisions=("int8",)),
    "max_threshold_rise": OptionScope("--max-threshold-rise", 2.0, precisions=("int8",)),
    "val_data": OptionScope("--val-data", None, precisions=("int8",)),
    "calib_method": OptionScope("--calib-method", "minmax", targets=("onnx", "jetson"), precisions=("int8",)),
    "accuracy_control": OptionScope("--no-accuracy-control", True, targets=("intel",), precisions=("int8",)),
    "tensorrt_cache_version": OptionScope("--tensorrt-cache-version", "8.6.1", targets=("jetson",), precisions=("int8",)),
    "dla_core": OptionScope("--dla-core", None, targets=("jetson",)),
}
CALIB_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class ConvertOptions:
    """``amoe convert``'s options. The ones in ``CONDITIONAL_OPTIONS`` are None until given; ``resolved()`` checks
    that each given one applies to this conversion and fills the rest with their defaults."""

    target: str = "onnx"
    precision: str = "fp32"
    routing: str = "dense"
    product: str | None = None
    calib_data: Path | None = None
    force: bool = False
    device: str | None = None
    batch_size: int = 1
    threshold_sigma: float = 3.0
    fold_min_agreement: float | None = None
    max_drop: float | None = None
    max_threshold_rise: float | None = None
    val_data: Path | None = None
    calib_method: str | None = None
    accuracy_control: bool | None = None
    tensorrt_cache_version: str | None = None
    dla_core: int | None = None

    def resolved(self) -> "ConvertOptions":
        """The options checked (ConfigError for a bad value, UsageError for one that does not apply here), with the
        defaults of those not given."""
        if self.target not in TARGETS:
            raise ConfigError(f"unknown --target {self.target}; choose one of {', '.join(TARGETS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision}: choose {', '.join(PRECISIONS)}")
        if self.routing not in ROUTING_MODES:
            raise ConfigError(f"--routing {self.routing}: choose {' or '.join(ROUTING_MODES)}")
        filled = {}
        for name, scope in CONDITIONAL_OPTIONS.items():
            value = getattr(self, name)
            if scope.applies(self.target, self.precision, self.routing):
                filled[name] = scope.default if value is None else value
            elif value is not None:
                raise UsageError(
                    f"{scope.flag} applies only to {scope.where()}, not to --target {self.target} --precision "
                    f"{self.precision} --routing {self.routing}; leave it out"
                )
        options = replace(self, **filled)
        options.check_values()
        return options

    def check_values(self) -> None:
        if self.device is not None and not DEVICE_PATTERNS[self.target].fullmatch(self.device):
            raise ConfigError(f"--device {self.device} is not a device for --target {self.target}; choose {DEVICE_EXAMPLES[self.target]}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch {self.batch_size}: the batch size must be at least 1")
        if self.calib_method is not None and self.calib_method not in CALIB_METHODS:
            raise ConfigError(f"--calib-method {self.calib_method}: choose {', '.join(CALIB_METHODS)}")
        ranges = (("--fold-min-agreement", self.fold_min_agreement, 0.0, 1.0), ("--max-drop", self.max_drop, None, 1.0),
                  ("--threshold-sigma", self.threshold_sigma, 0.0, None), ("--max-threshold-rise", self.max_threshold_rise, 1.0, None))
        for flag, value, low, high in ranges:
            if value is not None and not in_range(value, low, high):
                raise ConfigError(f"{flag} {value} is out of range: allowed {describe_range(low, high)}")


@dataclass
class Artifact:
    """What a target's export method leaves for the finishing step: ``files`` (the manifest's artifact keys ->
    file names), the backend whose FP32 arithmetic measures the threshold, an ``infer`` over the artifact as it
    will run, ``embed``, which writes the finished manifest into the artifact, and ``leftovers``, files only the
    measurement needed (removed once the artifact is released: OpenVINO memory-maps the weights it read)."""

    files: dict[str, str]
    measured_with: str
    infer: Callable[[np.ndarray], dict[str, np.ndarray]]
    embed: Callable[[dict], None]
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific manifest keys (``tensorrt_engine``)
    leftovers: list[Path] = field(default_factory=list)


class Exporter:
    """``Exporter(options)(checkpoint, out)`` -> the bundle folder. See the module's notes for the steps.
    ``encoders``: encoder graphs exported before, to reuse where they match (``amoe convert --all-products``)."""

    def __init__(self, options: ConvertOptions, encoders: EncoderExports | None = None):
        self.options = options.resolved()
        self.encoders = encoders

    def __call__(self, checkpoint: str | Path | dict, out: str | Path) -> Path:
        check_bundle_destination(Path(out))
        started = time.time()
        self.prepare(checkpoint)
        export = {"onnx": self.export_onnx, "intel": self.export_openvino, "jetson": self.export_tensorrt}[self.options.target]
        with BundleWriter(out) as writer:
            self.writer = writer
            self.export_graph()
            artifact = export()
            manifest = self.finish(artifact, started)
            leftovers = artifact.leftovers
            del artifact
            for path in leftovers:
                path.unlink()
            return writer.commit(manifest)

    # -- shared preparation ---------------------------------------------------------------------------------------
    def prepare(self, checkpoint: str | Path | dict) -> None:
        """Load the run, read the calibration images, fold the routing when asked, and start the metadata."""
        options = self.options
        model, self.payload = load_detector(checkpoint, options.product)
        for expert in model.patch_experts:  # the same maps, without the whitened form that was not chosen
            expert.drop_unused_whitening()
        model.drop_unused_map_terms()
        self.size = size = model.config.input_size
        self.paths, self.source = calibration_paths(self.payload, options.calib_data)
        images = load_images(self.paths, size, lambda x: tqdm(x, desc="read calibration", leave=False, unit="img"))
        self.frames = images.permute(0, 2, 3, 1).contiguous().numpy()
        folding = None
        core: torch.nn.Module = model
        if options.routing == "folded":
            routing = self.payload.get("product_routing")
            product_set = routing["expert_sets"][0]["experts"] if routing else None
            core, report = fold_routing(model, images, options.fold_min_agreement, options.force, product_set)
            folding = report.to_dict()
            LOG.info(
                "folded routing: %.1f%% of %d images agree on %s; kept %s; params %s -> %s, GFLOPs %.2f -> %.2f",
                100 * report.agreement, report.images, " + ".join(report.selected), ", ".join(report.kept),
                f"{report.params_before:,}", f"{report.params_after:,}", report.gflops_before, report.gflops_after,
            )
        self.core = core.eval()
        self.metadata = self.describe(model, folding)
        self.int8_frames = self.gate = self.quantization = None
        if options.precision == "int8":
            self.int8_frames, int8_source = int8_calibration_frames(self.payload, options.calib_data, size)
            self.gate = gate_set(self.frames, size, options.val_data, seed=0)
            LOG.info("INT8: calibrating on %d images from %s; gate on %s", len(self.int8_frames), int8_source, self.gate.source)

    def describe(self, model, folding: dict | None) -> dict:
        """The manifest's keys known before any artifact exists."""
        options, size, batch = self.options, self.size, self.options.batch_size
        source_file = Path(self.payload["path"]).resolve()
        return {
            "schema_version": SCHEMA_VERSION,
            "sdk_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # Absolute, so that amoe verify finds it from any working directory; the hash tells a retrained run apart.
            "source": {"checkpoint": str(source_file), "step": self.payload["step"], "data_root": self.payload.get("data_root"), "sha256": sha256_of(source_file),
                       "product": self.payload.get("product")},
            "target": options.target,
            "precision": options.precision,
            "device": options.device,
            "input": {
                "name": INPUT_NAME, "size": size, "batch": batch, "layout": "NHWC", "dtype": "uint8",
                "colour": "BGR", "resize": "cv2.resize INTER_LINEAR to size x size",
            },
            "outputs": {"anomaly_map": [batch, 1, size, size], "score": [batch], "routing_weights": [batch, model.num_experts]},
            "experts": expert_names(model),
            "routing": {
                "mode": options.routing, "top_k": model.config.router.top_k, "folding": folding,
                # A distilled student has no router: every expert counts, equally within its level.
                "static": model.static_routing,
            },
            "normalisation": {
                "map_low": model.map_low.tolist(), "map_high": model.map_high.tolist(),
                "level_weights": model.level_weights.tolist(), "top_percent": model.config.postprocess.top_percent,
                "map_level_weights": model.map_level_weights.tolist(),
            },
            "model": self.payload["config"]["model"],
            "onnx_opset": OPSET,
        }

    def export_graph(self) -> None:
        """The uint8-in FP32 ONNX graph every target starts from, checked to give finite outputs."""
        self.onnx_path = self.writer.path("model.onnx")
        self.onnx_model = export_onnx(self.core, self.onnx_path, self.size, self.options.batch_size, self.encoders)
        check_finite(self.onnx_path, self.size, self.options.batch_size)

    # -- one method per target --------------------------------------------------------------------------------------
    def export_onnx(self) -> Artifact:
        """ONNX for ONNX Runtime: FP16 weights and activations (uint8 in, FP32 out kept), or INT8 QDQ."""
        return self._onnx_artifact("onnx")

    def export_tensorrt(self) -> Artifact:
        """The TensorRT-ready ONNX (checked against TensorRT's limits; INT8 as symmetric QDQ with the calibration
        cache beside it), and the engine where TensorRT and a CUDA device are here. The engine builder stays in the
        runtime (``runtimes/backends/tensorrt_engine.py``): a Jetson builds the engine at first load without torch,
        and the runtime may not import the converters."""
        check_tensorrt_onnx(self.onnx_model, str(self.onnx_path))
        artifact = self._onnx_artifact("tensorrt_onnx")
        if self.quantization is not None:
            check_tensorrt_onnx(self.onnx_model, str(self.onnx_path))
            version = self.options.tensorrt_cache_version
            count = write_tensorrt_cache(self.onnx_model, self.writer.path("calibration.cache"), version)
            self.quantization.tensorrt_calibration_cache = {"file": "calibration.cache", "tensors": count, "tensorrt_version": version}
            artifact.files["tensorrt_calibration_cache"] = "calibration.cache"
        if _tensorrt_device_present():
            from amoe_sdk.runtimes.backends.tensorrt_backend import TensorRTBackend
            from amoe_sdk.runtimes.backends.tensorrt_engine import EngineOptions, build_engine

            engine_options = EngineOptions(fp16=self.options.precision != "fp32", dla_core=self.options.dla_core, timing_cache=self.writer.path("timing.cache"))
            engine = build_engine(self.onnx_path, self.writer.path("model.engine"), engine_options)
            artifact.files["tensorrt_engine"] = "model.engine"
            artifact.extra["tensorrt_engine"] = {**engine, "gpu": TensorRTBackend.gpu_name(0)}
        else:
            LOG.info("no TensorRT + CUDA device here: the bundle carries the TensorRT-ready ONNX; the engine is built on the device at first load")
        return artifact

    def export_openvino(self) -> Artifact:
        """OpenVINO IR: FP16-compressed weights, or INT8 through NNCF. Written, read back and measured as it will
        run (FP16 weights included), then written again with the manifest in its rt_info by ``embed``."""
        import openvino as ov

        ov_model = ov.convert_model(str(self.onnx_path))
        if self.options.precision == "int8":
            ov_model = self._quantize_openvino(ov_model)
        self.onnx_path.unlink()
        measure_xml = self.writer.path("measure.xml")
        # A separate file: OpenVINO memory-maps the .bin it reads, so it must not be rewritten in place.
        save_openvino(ov_model, measure_xml, self.options.precision != "fp32")
        measured = ov.Core().read_model(str(measure_xml))
        embed = lambda manifest: save_openvino(measured, self.writer.path("model.xml"), False, embedded(manifest))  # noqa: E731
        files = {"openvino_xml": "model.xml", "openvino_bin": "model.bin"}
        return Artifact(files, "openvino", compiled_infer(measured), embed, leftovers=[measure_xml, measure_xml.with_suffix(".bin")])

    # -- shared finishing -------------------------------------------------------------------------------------------
    def finish(self, artifact: Artifact, started: float) -> dict:
        """Measure the threshold on the artifact, then write the one manifest into it -> ``manifest.json``'s content
        (``BundleWriter.commit`` adds the files' hashes and the manifest's digest)."""
        options = self.options
        outputs = infer_in_batches(artifact.infer, self.frames, options.batch_size)
        scores = outputs["score"].astype(np.float64)
        map_scores = top_percent_mean(
            torch.from_numpy(outputs["anomaly_map"].astype(np.float64)), self.metadata["normalisation"]["top_percent"]
        ).numpy()
        threshold = measured_threshold(scores, map_scores, options.threshold_sigma, self.source, artifact.measured_with)
        manifest = {
            # The schema's defaults written out, as manifest.json has them, so that every copy is the same.
            **BundleManifest.optional_defaults(),
            **self.metadata,
            "artifacts": artifact.files,
            "threshold": threshold,
            "calibration": {"images": len(self.paths), "source": self.source, "measured_with": artifact.measured_with},
            **artifact.extra,
        }
        if self.quantization is not None:
            self.quantization.threshold_shift = threshold["image"] - self.quantization.threshold_fp32
            self._report_gate(threshold["image"])
            manifest["quantization"] = self.quantization.to_dict()
        manifest["convert_seconds"] = round(time.time() - started, 1)
        artifact.embed(manifest)
        return manifest

    # -- INT8 -------------------------------------------------------------------------------------------------------
    def _onnx_artifact(self, key: str) -> Artifact:
        """The ONNX artifact at the chosen precision, for ONNX Runtime (``onnx``) or TensorRT (``tensorrt_onnx``).
        For TensorRT, measured with ONNX Runtime on the same ONNX; amoe verify checks the engine on the device."""
        if self.options.precision == "fp16":
            self.onnx_model = to_fp16(self.onnx_model)
            onnx.save(self.onnx_model, str(self.onnx_path))
        elif self.options.precision == "int8":
            fp32_path = self.writer.path("fp32.onnx")
            self.onnx_path.rename(fp32_path)
            self.quantization = self._quantize_onnx(fp32_path, self.onnx_path, for_tensorrt=key == "tensorrt_onnx")
            self._check_gate(self.quantization)
            fp32_path.unlink()
            self.onnx_model = onnx.load(str(self.onnx_path))
        embed = lambda manifest: save_with_metadata(self.onnx_model, self.onnx_path, {"amoe_manifest": embedded(manifest)})  # noqa: E731
        return Artifact({key: "model.onnx"}, "onnxruntime", onnx_infer(self.onnx_path), embed)

    def _quantize_onnx(self, fp32_path: Path, out_path: Path, for_tensorrt: bool) -> QuantizationReport:
        from amoe_sdk.converters.quantize_onnx import gated_quantize

        o = self.options
        # OpenVINO's layer search runs here too, with the range method's default (--calib-method is not its option).
        method = o.calib_method or CONDITIONAL_OPTIONS["calib_method"].default
        result = gated_quantize(fp32_path, out_path, self.int8_frames, self.gate, o.batch_size, onnx_infer, o.max_drop,
                                method, for_tensorrt=for_tensorrt, sigma=o.threshold_sigma, max_threshold_rise=o.max_threshold_rise)
        return QuantizationReport.measure(
            result.reference, result.final, self.gate, method, o.max_drop, o.max_threshold_rise,
            result.float_nodes, result.float_groups, result.ranking, result.tries, o.routing == "dense",
        )

    def _quantize_openvino(self, ov_model):
        from amoe_sdk.converters.quantize_openvino import quantize_openvino

        o = self.options
        # The layer search runs on ONNX Runtime's QDQ simulation of the same graph (seconds per try, where NNCF's
        # accuracy control takes minutes); NNCF then quantizes with the groups it found kept in float.
        search_path = self.onnx_path.with_name("search.onnx")
        search = self._quantize_onnx(self.onnx_path, search_path, for_tensorrt=False)
        search_path.unlink(missing_ok=True)
        quantized, reference, final, float_layers, float_groups = quantize_openvino(
            ov_model, self.int8_frames, self.gate, o.batch_size, o.max_drop, o.accuracy_control, search.float_groups,
            o.threshold_sigma, o.max_threshold_rise, search.ranking,
        )
        method = "nncf accuracy control" if o.accuracy_control else "nncf"
        self.quantization = QuantizationReport.measure(
            reference, final, self.gate, method, o.max_drop, o.max_threshold_rise, float_layers, float_groups,
            search.ranking, search.tries, o.routing == "dense",
        )
        self._check_gate(self.quantization)
        return quantized

    def _check_gate(self, report: QuantizationReport) -> None:
        if not (report.passed or self.options.force):
            raise ConversionError(report.failure(self.options.max_threshold_rise))

    def _report_gate(self, threshold: float) -> None:
        q = self.quantization
        LOG.info(
            "INT8 gate %s: image AUROC %.4f -> %.4f, pixel AUROC %.4f -> %.4f; %d layer(s) kept in float; threshold "
            "%.4f -> %.4f; %d gate verdict(s) flipped; %s", "passed" if q.passed else "FAILED", q.fp32["image_auroc"],
            q.int8["image_auroc"], q.fp32["pixel_auroc"], q.int8["pixel_auroc"], len(q.float_layers), q.threshold_fp32,
            threshold, q.gate_label_flips, q.group_summary(),
        )


def convert(checkpoint: str | Path | dict, out: str | Path, options: ConvertOptions, encoders: EncoderExports | None = None) -> Path:
    """Convert the run or checkpoint ``checkpoint`` (or its payload as ``read_checkpoint`` returned it) into the
    bundle folder ``out``. ``out`` must be new, empty or a bundle (replaced atomically); anything else, and any
    option that does not apply, is refused before any work. ``encoders``: as ``Exporter``'s."""
    return Exporter(options, encoders)(checkpoint, out)


def embedded(manifest: dict) -> dict:
    """The manifest as an artifact carries it: every key but those that hash the artifacts themselves."""
    return {k: v for k, v in manifest.items() if k not in AFTER_ARTIFACTS}


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
        LOG.warning("only %d calibration images in %s; the threshold is noisy below %d", len(paths), source, MIN_THRESHOLD_IMAGES)
    return paths, source


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
        LOG.warning("only %d INT8 calibration images; ranges are unreliable below %d", len(paths), MIN_INT8_CALIBRATION_IMAGES)
    return load_frames(paths, size), "the run's training images"


def measured_threshold(scores: np.ndarray, map_scores: np.ndarray, sigma: float, source: str, backend: str) -> dict:
    """The image threshold from normal scores [N], mean + sigma * std, and the pixel threshold by the same rule
    from the normal maps' own top-percent means [N] (``top_percent_mean``): the map may fuse fewer levels than
    the score (``AnomalyMoE.map_level_weights``), and its pixels live on its own normalised scale."""
    value, mean, std = normal_threshold(scores, sigma)
    pixel = normal_threshold(map_scores, sigma)[0]
    return {
        "image": value, "pixel": pixel, "sensitivity": 0.5, "rule": f"mean + {sigma:g} std of normal scores (the map's: of its top-percent means)",
        "normal_score_mean": mean, "normal_score_std": std, "normal_score_max": float(scores.max()),
        "images": len(scores), "source": source, "measured_with": backend, "inference_precision": MEASURED_PRECISION,
    }


def _tensorrt_device_present() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        from amoe_sdk.runtimes.backends.tensorrt_backend import _cudart

        err, count = _cudart().cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:  # no driver, no cuda-python: the engine is built on the device instead
        return False
