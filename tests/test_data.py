import shutil

import cv2
import numpy as np
import pytest

from amoe_sdk.data import read_dataset, read_folder_dataset, read_image, read_mask
from amoe_sdk.data.drawing import exact_defect_pair, rng_for
from amoe_sdk.data.synth import CATEGORIES, render
from amoe_sdk.data.synth_line import LINE_CATEGORIES
from amoe_sdk.errors import DataError


def test_sample_dataset_layout(sample_root):
    for category, (_, defects) in CATEGORIES.items():
        dataset = read_dataset(sample_root / category, require_test=True)
        assert len(dataset.train) == 16
        assert set(dataset.defect_types) == set(defects)
        anomalous = [s for s in dataset.test if s.label == 1]
        assert len(anomalous) == 2 * len(defects)
        for sample in anomalous:
            image = read_image(sample.image_path)
            mask = read_mask(sample.mask_paths[0], image.shape[:2], sample.image_path)
            assert mask.any(), sample.image_path


@pytest.mark.parametrize("category", sorted(LINE_CATEGORIES))
def test_line_categories_render_deterministically_with_masks_exactly_where_pixels_changed(category):
    scene, defects = LINE_CATEGORIES[category]
    for defect in defects:
        for index in range(3):
            image, mask = render(category, defect, 0, "test", index)
            again, mask_again = render(category, defect, 0, "test", index)
            assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
            same, same_mask, reference = exact_defect_pair(scene, rng_for(0, category, "test", defect, index), defect)
            assert np.array_equal(same, image) and np.array_equal(same_mask, mask)
            changed = (image != reference).any(axis=2)
            assert np.array_equal(mask, changed), f"{category}/{defect}/{index}"
            # The defect is local: the normal scene was drawn the same way with and without it.
            assert 20 <= mask.sum() < 0.08 * mask.size, (category, defect, index, int(mask.sum()))
    normals = [render(category, "good", 0, "train", i)[0] for i in range(2)]
    assert not np.array_equal(*normals)  # normal images vary


def test_sample_rendering_is_deterministic():
    a_img, a_mask = render("kit", "swapped", 3, "test", 1)
    b_img, b_mask = render("kit", "swapped", 3, "test", 1)
    c_img, _ = render("kit", "swapped", 4, "test", 1)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


def test_grey_and_alpha_images_become_bgr(tmp_path):
    grey = (np.arange(64 * 64) % 255).astype(np.uint8).reshape(64, 64)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    bgra = np.dstack([np.full((64, 64, 3), 9, np.uint8), np.full((64, 64), 255, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    cv2.imwrite(str(tmp_path / "w.png"), (grey.astype(np.uint16) * 256))
    for name in ("g.png", "a.png", "w.png"):
        image = read_image(tmp_path / name)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("content,match", [(b"", "empty file"), (b"not an image at all", "cannot be decoded")])
def test_broken_image_names_the_file(tmp_path, content, match):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        read_image(path)
    assert "broken.png" in str(info.value)


def test_empty_train_folder(tmp_path):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no .* images"):
        read_dataset(tmp_path / "cat")


def _copy_category(sample_root, tmp_path, name="washer"):
    target = tmp_path / name
    shutil.copytree(sample_root / name, target)
    return target


def test_anomalous_image_without_mask(sample_root, tmp_path):
    root = _copy_category(sample_root, tmp_path)
    (root / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DataError, match="crack/000.png has no mask"):
        read_dataset(root, require_test=True)


def test_mask_without_image(sample_root, tmp_path):
    root = _copy_category(sample_root, tmp_path)
    (root / "test" / "crack" / "001.png").unlink()
    with pytest.raises(DataError, match="001_mask.png has no image"):
        read_dataset(root, require_test=True)


def test_mask_of_wrong_size(sample_root, tmp_path):
    root = _copy_category(sample_root, tmp_path)
    cv2.imwrite(str(root / "ground_truth" / "crack" / "000_mask.png"), np.zeros((10, 12), np.uint8))
    dataset = read_dataset(root, require_test=True)
    sample = next(s for s in dataset.test if s.defect_type == "crack" and s.image_path.name == "000.png")
    with pytest.raises(DataError, match="12x10 but its image"):
        read_mask(sample.mask_paths[0], read_image(sample.image_path).shape[:2], sample.image_path)


def test_folder_layout(sample_root, tmp_path):
    normal = sample_root / "kit" / "test" / "good"
    abnormal = sample_root / "kit" / "test" / "missing"
    masks = sample_root / "kit" / "ground_truth" / "missing"
    dataset = read_folder_dataset(normal, abnormal, masks)
    assert sum(s.label for s in dataset.test) == 2 and all(s.mask_paths for s in dataset.test if s.label)
    lonely = tmp_path / "masks"
    shutil.copytree(masks, lonely)
    cv2.imwrite(str(lonely / "999_mask.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="999_mask.png has no image"):
        read_folder_dataset(normal, abnormal, lonely)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no"):
        read_folder_dataset(empty)


def test_training_and_the_line_runtime_read_the_same_image_files(tmp_path):
    import cv2

    from amoe_sdk.data.images import list_images
    from amoe_sdk.runtimes.sources import FolderSource

    for name in ("a.png", "b.tif", "c.tiff", "d.jpg", "e.bmp"):
        assert cv2.imwrite(str(tmp_path / name), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    listed = [p.name for p in list_images(tmp_path)]
    assert listed == ["a.png", "b.tif", "c.tiff", "d.jpg", "e.bmp"]
    source = FolderSource(tmp_path)
    source.open()
    assert [p.name for p in source.paths] == listed
