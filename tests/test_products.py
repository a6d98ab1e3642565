"""A range of products: reading it, one detector trained over it, routing that specialises by product, and each
product's own calibration stored in the checkpoint and applied where the product is named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from amoe_sdk.checkpoint import load_detector, read_checkpoint
from amoe_sdk.cli.main import main
from amoe_sdk.config import RANGE_STEPS, SINGLE_PRODUCT_STEPS, load_config
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.converters.onnx_export import EncoderExports
from amoe_sdk.converters.range_bundle import convert_products
from amoe_sdk.converters.verify import verify
from amoe_sdk.data.images import read_image, resize_to_input
from amoe_sdk.data.products import read_products
from amoe_sdk.errors import BundleError, CheckpointError, ConversionError, DataError, UsageError
from amoe_sdk.runtimes import EdgeDetector
from amoe_sdk.training.losses import product_consistency, product_sets
from amoe_sdk.training.data import load_images
from amoe_sdk.training.trainer import config_for_products, train
from tests.conftest import tiny_config

RANGE = ("washer", "weave")


@pytest.fixture(scope="module")
def product_root(sample_root, tmp_path_factory):
    """Two visibly different sample products side by side: an object on a plain ground and a texture."""
    root = tmp_path_factory.mktemp("range")
    for name in RANGE:
        shutil.copytree(sample_root / name, root / name)
    return root


@pytest.fixture(scope="module")
def range_run(product_root, tmp_path_factory):
    """One tiny detector over both products, long enough for the router to settle on one set per product."""
    out = tmp_path_factory.mktemp("range-run")
    train(product_root, out, tiny_config(**{"train.steps": 120, "train.checkpoint_every": 120}), show_progress=False)
    return out


def test_a_folder_of_categories_is_a_range_and_one_category_is_one_product(product_root, sample_root):
    assert [p.name for p in read_products([product_root])] == list(RANGE)
    assert [p.name for p in read_products([sample_root / "kit", sample_root / "pins"])] == ["kit", "pins"]
    assert [p.name for p in read_products([sample_root / "kit"])] == ["kit"]


def test_range_errors_name_the_folder_and_the_fix(product_root, sample_root, tmp_path):
    stray = tmp_path / "range"
    shutil.copytree(product_root, stray)
    (stray / "notes").mkdir()
    with pytest.raises(DataError, match=r"notes in the product range .* has no train/good .* move it out"):
        read_products([stray])
    twin = tmp_path / "other" / "washer"
    shutil.copytree(sample_root / "washer", twin)
    with pytest.raises(DataError, match=r"two products are named 'washer'.*rename one"):
        read_products([product_root / "washer", twin])
    single = tmp_path / "single"
    shutil.copytree(product_root / "washer", single / "washer")
    (single / "lonely" / "train" / "good").mkdir(parents=True)
    shutil.copy(product_root / "weave" / "train" / "good" / "000.png", single / "lonely" / "train" / "good")
    with pytest.raises(DataError, match=r"product lonely .*: 1 normal images are too few"):
        train(single, tmp_path / "run", tiny_config(**{"train.steps": 2}), show_progress=False)


def test_the_consistency_term_is_zero_only_when_every_image_clears_its_products_set_by_the_margin():
    product = torch.tensor([0, 0, 1, 1])
    apart = torch.tensor([[3.0, 0.0, -3.0], [3.0, 0.0, -3.0], [-3.0, 0.0, 3.0], [-3.0, 0.0, 3.0]])
    one_level = torch.zeros(3, dtype=torch.long)
    assert product_consistency(apart, product, 1, 1.0, one_level) == 0
    # One image of product 1 prefers product 0's expert: penalised, and the gradient lowers that logit.
    mixed = apart.clone()
    mixed[3] = torch.tensor([3.0, 0.0, 2.0])
    mixed.requires_grad_(True)
    loss = product_consistency(mixed, product, 1, 1.0, one_level)
    assert loss > 0
    loss.backward()
    assert mixed.grad[3, 0] > 0 and mixed.grad[3, 2] < 0


def test_with_one_expert_per_level_to_pick_each_product_gets_one_of_each_level_and_the_range_uses_them_all():
    levels = torch.tensor([0, 0, 1, 1, 2, 2])
    # Product 0's two best logits are both patch experts: its set still takes one expert of each level. Both
    # products prefer component0 and global1: the stronger preference gets it, the other product the other expert.
    mean = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0, 0.5], [0.0, 1.0, 3.0, 2.0, 2.5, 2.6]])
    assert product_sets(mean, 3, levels).tolist() == [[1, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 1]]
    assert product_sets(mean, 2, levels).tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1]]


def test_the_router_specialises_by_product_and_every_expert_is_used(range_run):
    payload = read_checkpoint(range_run)
    assert list(payload["products"]) == list(RANGE)
    for name, record in payload["products"].items():
        assert record["routing"]["agreement"] >= 0.95, (name, record["routing"])
    assert min(payload["routing_usage"]["selected_share"]) > 0


def test_each_product_gets_its_own_tap_statistics_and_component_slots(range_run, product_root):
    payload = read_checkpoint(range_run)
    component = payload["config"]["model"]["component"]
    per_product = tiny_config().model.component.num_slots
    assert (component["num_slots"], component["slot_groups"]) == (per_product, len(RANGE))
    means = {}
    for index, name in enumerate(RANGE):
        model, _ = load_detector(range_run, name)
        # The taps' statistics of the product's own training images, as a detector of that product alone has them.
        train_images = load_images(payload["products"][name]["train_images"], model.config.input_size)
        with torch.no_grad():
            taps = model.encode(train_images.float()).taps
        assert torch.allclose(model.feature_mean, taps.mean(dim=(0, 2, 3)), atol=1e-4)
        assert torch.allclose(model.feature_std, taps.std(dim=(0, 2, 3)).clamp_min(1e-3), atol=1e-4)
        means[name] = model.feature_mean
        own = slice(index * per_product, (index + 1) * per_product)
        assert model.assigner.prototypes.shape[0] == per_product * len(RANGE)
        open_slots = model.assigner.slot_offset == 0
        assert open_slots[own].all() and open_slots.sum() == per_product
        # Every position of the product's images falls on its own slots, never on the other product's.
        shares = payload["products"][name]["calibration"]["composition"]["normal_area_share"]
        assert sum(shares[own]) == pytest.approx(1.0), (name, shares)
        test_image = next(iter(read_products([product_root / name], require_test=True)[0].test)).image_path
        frame = resize_to_input(read_image(test_image), model.config.input_size)
        with torch.no_grad():
            features = model.encode(torch.from_numpy(frame).permute(2, 0, 1)[None].float())
            slots = model.assigner(model.standardise(features.taps), features.components)
        assert slots.areas[0, own].sum() == pytest.approx(1.0)
    assert not torch.allclose(*means.values(), atol=1e-2)


def test_a_range_trains_longer_by_default_and_an_explicit_step_count_is_kept():
    single, ranged = config_for_products(load_config(), 1), config_for_products(load_config(), 6)
    assert (single.train.steps, single.model.component.slot_groups) == (SINGLE_PRODUCT_STEPS, 1)
    assert (ranged.train.steps, ranged.model.component.slot_groups) == (RANGE_STEPS, 6)
    assert RANGE_STEPS > SINGLE_PRODUCT_STEPS
    assert config_for_products(load_config(overrides={"train.steps": 50}), 6).train.steps == 50
    assert load_config().train.steps is None  # resolved by the trainer, not by reading the config


def test_a_range_checkpoint_from_before_slot_groups_loads_with_every_slot_open(range_run, tmp_path):
    payload = read_checkpoint(range_run)
    old_products = {
        name: {**record, "state": {k: v for k, v in record["state"].items() if k != "assigner.slot_offset"}}
        for name, record in payload["products"].items()
    }
    state = {k: v for k, v in payload["state_dict"].items() if k != "assigner.slot_offset"}
    assert len(state) == len(payload["state_dict"]) - 1  # written with them
    old = tmp_path / "old.pt"
    torch.save({**{k: v for k, v in payload.items() if k != "path"}, "state_dict": state, "products": old_products}, old)
    model, _ = load_detector(old, "washer")
    assert torch.equal(model.assigner.slot_offset, torch.zeros_like(model.assigner.slot_offset))


def test_each_product_keeps_its_own_calibration_and_a_range_has_no_default(range_run):
    payload = read_checkpoint(range_run)
    washer, _ = load_detector(range_run, "washer")
    weave, _ = load_detector(range_run, "weave")
    for name, model in (("washer", washer), ("weave", weave)):
        record = payload["products"][name]
        assert torch.equal(model.map_low, record["state"]["map_low"])
        assert torch.equal(model.map_high, record["state"]["map_high"])
        assert record["val_images"] and all(f"/{name}/" in p for p in record["val_images"] + record["train_images"])
    assert not torch.equal(washer.map_high, weave.map_high)
    # Calibration changes no weight: what the products share is the trained model.
    assert all(torch.equal(p, q) for p, q in zip(washer.trainable_parameters(), weave.trainable_parameters()))
    with pytest.raises(CheckpointError, match=r"range of products \(washer, weave\).*--product NAME"):
        load_detector(range_run)
    with pytest.raises(CheckpointError, match=r"no product 'kit'; its products are washer, weave"):
        load_detector(range_run, "kit")


def test_eval_on_the_range_writes_each_category_and_the_means(range_run, product_root, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(range_run), "--data", str(product_root), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["per_category"]) == list(RANGE)
    for key in ("image_auroc", "pixel_auroc"):
        assert result[key] == pytest.approx(sum(r[key] for r in result["per_category"].values()) / 2)
    # One category of the range is evaluated with its own product's calibration, as within the range.
    single = tmp_path / "washer.json"
    assert main(["eval", "--model", str(range_run), "--data", str(product_root / "washer"), "--out", str(single)]) == 0
    assert json.loads(single.read_text())["scores"] == result["per_category"]["washer"]["scores"]
    assert "mean" in capsys.readouterr().out


def test_info_prints_each_products_expert_sets(range_run, capsys):
    assert main(["info", str(range_run), "--json"]) == 0
    products = json.loads(capsys.readouterr().out)["products"]
    assert set(products) == set(RANGE)
    assert all(p["routing_agreement"] >= 0.95 and p["expert_sets"][0].endswith("%") for p in products.values())


def test_each_product_folds_without_force_and_its_bundle_matches_the_dense_model(range_run, product_root, tmp_path, monkeypatch):
    import amoe_sdk.converters.range_bundle as range_bundle

    made = []
    monkeypatch.setattr(range_bundle, "EncoderExports", lambda: made.append(EncoderExports()) or made[-1])
    out, rows = convert_products(range_run, tmp_path / "folded", ConvertOptions(target="onnx", routing="folded"))
    assert [r["product"] for r in rows] == list(RANGE)
    assert len(made) == 1 and made[0].exports == 1  # one encoder export, joined to each product's head
    for row in rows:
        # One expert per level: half the experts, and a fold that is exact where the router agrees.
        assert row["agreement"] >= 0.95 and len(row["kept"]) == 3 and row["gflops_after"] < row["gflops_before"]
        report = verify(out / row["product"], product_root / row["product"], show_progress=False)
        dense = report["dense"]
        assert report["passed"] and dense["agreeing_images"] > 0
        assert dense["agreeing_map_rel_diff_max"] <= 1e-4 and dense["agreeing_label_flips"] == 0
        assert dense["agreeing_images"] + dense["disagreeing_images"] == report["images"]


def test_a_fold_is_refused_below_the_agreement(range_run, product_root, tmp_path):
    # Folded for the washer, measured on the weave's images: the washer's set is not where they route.
    options = ConvertOptions(target="onnx", routing="folded", product="washer", calib_data=product_root / "weave" / "train" / "good")
    with pytest.raises(ConversionError, match=r"agrees on the product's expert set \(.*\) for only 0.0%"):
        convert(range_run, tmp_path / "refused", options)
    assert not (tmp_path / "refused").exists()


def test_a_range_bundle_opens_one_product_by_name_and_never_a_default(range_run, tmp_path):
    out, _ = convert_products(range_run, tmp_path / "dense", ConvertOptions(target="onnx"))
    assert json.loads((out / "products.json").read_text())["products"] == {n: n for n in RANGE}
    with pytest.raises(BundleError, match=r"one bundle per product \(washer, weave\) and no product was named.*product=NAME"):
        EdgeDetector(out)
    with pytest.raises(BundleError, match="has no product 'kit'"):
        EdgeDetector(out, product="kit")
    frame = np.full((96, 96, 3), 128, np.uint8)
    payload = read_checkpoint(range_run)
    for name in RANGE:
        with EdgeDetector(out, product=name) as detector:
            assert detector.bundle.manifest.source.product == name
            assert detector.bundle.manifest.routing.mode == "dense"
            assert np.isfinite(detector.predict(frame).score)
        # The bundle's threshold is measured on this product's held-out normals, not the other's.
        assert detector.bundle.manifest.threshold.images == len(payload["products"][name]["val_images"])
    with pytest.raises(BundleError, match="was converted for product 'washer', not 'weave'"):
        EdgeDetector(out / "washer", product="weave")
    # A second conversion replaces the range bundle; a folder of the user's is never replaced.
    convert_products(range_run, out, ConvertOptions(target="onnx"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="not a range bundle of ours"):
        convert_products(range_run, tmp_path / "mine", ConvertOptions(target="onnx"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_the_cli_folds_one_product_and_refuses_a_range_fold_without_one(range_run, tmp_path, capsys):
    assert main(["convert", "--checkpoint", str(range_run), "--target", "onnx", "--routing", "folded", "--product", "weave",
                 "--out", str(tmp_path / "weave")]) == 0
    assert json.loads((tmp_path / "weave" / "manifest.json").read_text())["source"]["product"] == "weave"
    assert main(["convert", "--checkpoint", str(range_run), "--target", "onnx", "--routing", "folded",
                 "--out", str(tmp_path / "none")]) == 2
    assert "--product NAME, or for each with --all-products" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", str(range_run), "--target", "onnx", "--routing", "folded", "--all-products",
                 "--out", str(tmp_path / "all")]) == 0
    assert "| washer |" in capsys.readouterr().out


def test_one_product_of_a_range_distils_into_its_own_student(range_run, product_root, tmp_path):
    from amoe_sdk.training.distill import distill
    from tests.test_distill import write_student_yaml

    student_yaml = write_student_yaml(tmp_path / "student.yaml")
    with pytest.raises(CheckpointError, match="range of products"):
        distill(range_run, product_root / "weave", tmp_path / "none", student_yaml, {"train.steps": 2}, show_progress=False)
    result = distill(range_run, product_root / "weave", tmp_path / "weave", student_yaml, {"train.steps": 4}, show_progress=False, product="weave")
    payload = read_checkpoint(result.checkpoint)
    assert payload["distillation"]["teacher"]["product"] == "weave"
    # The teacher's own held-out weave images stay unseen by the student too.
    assert payload["val_images"] == read_checkpoint(range_run)["products"]["weave"]["val_images"]
