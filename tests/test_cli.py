import json
import subprocess
import sys

from amoe_sdk.cli.main import main


def test_help_teaches_every_verb(capsys):
    for verb in (["train"], ["eval"], ["info"], ["data", "sample"], ["convert"], ["verify"]):
        try:
            main([*verb, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        text = capsys.readouterr().out
        assert "usage: amoe" in text and len(text) > 300


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "amoe_sdk.cli.main", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "amoe-sdk" in result.stdout


def test_info_and_eval(tiny_run, sample_root, tmp_path, capsys):
    assert main(["info", str(tiny_run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 6 and info["finished"] and info["prototypes"][0] == 3
    out = tmp_path / "metrics.json"
    overlays = tmp_path / "overlays"
    assert main(["eval", "--model", str(tiny_run), "--data", str(sample_root / "washer"), "--out", str(out), "--save-images", str(overlays)]) == 0
    metrics = json.loads(out.read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "per_defect"} <= set(metrics)
    assert set(metrics["per_defect"]) == {"crack", "chip", "stain"}
    assert set(metrics["per_level"]) == {"patch", "component", "global"}
    assert all(0 <= level["image_auroc"] <= 1 and set(level["per_defect"]) == {"crack", "chip", "stain"} for level in metrics["per_level"].values())
    assert len(list(overlays.rglob("*.png"))) == metrics["num_images"]
    printed = capsys.readouterr().out
    assert "img AUROC" in printed and "image AUROC by level" in printed


def test_errors_give_exit_codes_and_messages(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m.json")]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 6
    assert "amoe train" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--config", str(tmp_path / "no.yaml")]) == 4


def test_convert_verify_and_bundle_info(tiny_run, sample_root, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["convert", "--checkpoint", str(tiny_run), "--target", "onnx", "--out", str(bundle)]) == 0
    assert "amoe verify" in capsys.readouterr().out
    assert main(["verify", str(bundle), "--data", str(sample_root / "washer")]) == 0
    assert "passed" in capsys.readouterr().out
    assert main(["info", str(bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["target"] == "onnx" and info["parity_report"]["passed"] and "model.onnx" in info["files"]
    # An impossible tolerance must fail: the gate is real.
    assert main(["verify", str(bundle), "--data", str(sample_root / "washer"), "--map-rtol", "1e-12"]) == 11
    assert "differs from its PyTorch reference" in capsys.readouterr().err


def test_amoe_convert_console_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "amoe_sdk.converters.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--target" in result.stdout and "folded" in result.stdout


def test_a_convert_option_that_does_not_apply_to_the_target_is_a_usage_error(tiny_run, tmp_path, capsys):
    cases = [
        (["--target", "onnx", "--dla-core", "0"], "--dla-core applies only to --target jetson"),
        (["--target", "intel", "--precision", "int8", "--calib-method", "entropy"], "--calib-method applies only to --target onnx / jetson"),
        (["--target", "onnx", "--precision", "int8", "--tensorrt-cache-version", "10.3"], "--tensorrt-cache-version applies only to --target jetson"),
        (["--target", "onnx", "--no-accuracy-control"], "--no-accuracy-control applies only to --target intel with --precision int8"),
        (["--target", "intel", "--max-drop", "0.02"], "--max-drop applies only to --precision int8"),
        (["--target", "onnx", "--fold-min-agreement", "0.8"], "--fold-min-agreement applies only to --routing folded"),
    ]
    for flags, message in cases:
        out = tmp_path / "never"
        assert main(["convert", "--checkpoint", str(tiny_run), "--out", str(out), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
        assert not out.exists()
    assert main(["convert", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "b"), "--target", "onnx", "--precision", "int8", "--calib-method", "often"]) == 4
    assert "--calib-method often: choose minmax, entropy, percentile" in capsys.readouterr().err


def test_usage_errors_exit_2_in_every_verb(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "m.json")]) == 2  # neither --data nor --normal / --abnormal
    assert "evaluation needs --data" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--floor", "0.5"]) == 2  # a floor needs labelled data
    assert "--floor needs --data" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b"), "--target", "onnx", "--dla-core", "0"]) == 2
