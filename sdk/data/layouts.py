"""Dataset layouts: the MVTec AD category layout and a plain folder layout.

Both give a ``Dataset``: the normal training images and the labelled test samples with their masks. Layout
errors (an empty train folder, a mask with no image, an anomalous image with no mask) are found here, before any
training starts, and the message names the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from amoe_sdk.data.images import IMAGE_SUFFIXES, list_images
from amoe_sdk.errors import DataError

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One test image: ``label`` is 0 (normal) or 1 (anomalous); ``mask_paths`` is empty for normal images."""

    image_path: Path
    label: int
    defect_type: str
    mask_paths: tuple[Path, ...] = ()


@dataclass
class Dataset:
    """A category: the normal ``train`` images and the ``test`` samples."""

    name: str
    root: Path
    train: list[Path] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.label == 1})


def read_dataset(root: str | Path, require_test: bool = False) -> Dataset:
    """Read ``root`` as an MVTec AD category when it has ``train/good``, else as a plain folder of normal images."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset {root} does not exist; make the sample data with `amoe data sample DIR` or fix the path")
    if (root / "train").is_dir():
        return read_mvtec_category(root, require_test=require_test)
    if require_test:
        raise DataError(
            f"{root} has no MVTec layout (train/good, test/<type>, ground_truth/<type>); for plain folders pass "
            "--normal DIR --abnormal DIR [--masks DIR] instead of --data"
        )
    return read_folder_dataset(root)


def read_mvtec_category(root: str | Path, require_test: bool = False) -> Dataset:
    """Read one MVTec AD category: ``train/good``, ``test/<type>`` and ``ground_truth/<type>/<name>_mask.png``.

    MVTec LOCO's ``ground_truth/<type>/<name>/*.png`` (several masks per image) is read too.
    """
    root = Path(root)
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise DataError(f"{root} has no train/good folder; an MVTec category holds train/good with normal images")
    train = list_images(train_dir)
    if not train:
        raise DataError(f"{train_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images; training needs normal images")
    dataset = Dataset(name=root.name, root=root, train=train)
    test_dir = root / "test"
    if not test_dir.is_dir():
        if require_test:
            raise DataError(f"{root} has no test folder; evaluation needs test/good and test/<defect> images")
        return dataset
    gt_root = root / "ground_truth"
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        images = list_images(type_dir)
        if type_dir.name == GOOD:
            dataset.test.extend(Sample(p, 0, GOOD) for p in images)
            continue
        gt_dir = gt_root / type_dir.name
        claimed: set[Path] = set()
        for image_path in images:
            masks = _mvtec_masks(gt_dir, image_path.stem)
            if not masks:
                raise DataError(
                    f"anomalous image {image_path} has no mask; expected {gt_dir / (image_path.stem + '_mask.png')}"
                )
            claimed.update(masks)
            dataset.test.append(Sample(image_path, 1, type_dir.name, tuple(masks)))
        if gt_dir.is_dir():
            for mask in _all_mask_files(gt_dir):
                if mask not in claimed:
                    raise DataError(f"mask {mask} has no image in {type_dir}; remove it or add the image")
    if require_test and not dataset.test:
        raise DataError(f"{test_dir} holds no test images")
    return dataset


def _mvtec_masks(gt_dir: Path, stem: str) -> list[Path]:
    single = [gt_dir / f"{stem}_mask{suffix}" for suffix in IMAGE_SUFFIXES]
    found = [p for p in single if p.is_file()]
    loco_dir = gt_dir / stem
    if loco_dir.is_dir():
        found.extend(list_images(loco_dir))
    return found


def _all_mask_files(gt_dir: Path) -> list[Path]:
    files = list_images(gt_dir)
    for sub in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
        files.extend(list_images(sub))
    return files


def read_folder_dataset(
    normal_dir: str | Path, abnormal_dir: str | Path | None = None, mask_dir: str | Path | None = None
) -> Dataset:
    """A plain layout: a folder of normal images, optionally a folder of anomalous ones and a folder of masks.

    Used for training, ``normal_dir`` is the training set. Used for evaluation, the normal images are test
    samples too. A mask is ``<stem>.png`` or ``<stem>_mask.png`` in ``mask_dir``; when ``mask_dir`` is given,
    every anomalous image needs one and every mask needs an image.
    """
    normal_dir = Path(normal_dir)
    normal = list_images(normal_dir)
    if not normal:
        raise DataError(f"{normal_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images; it must contain normal images")
    dataset = Dataset(name=normal_dir.name, root=normal_dir, train=normal)
    dataset.test.extend(Sample(p, 0, GOOD) for p in normal)
    if abnormal_dir is None:
        if mask_dir is not None:
            raise DataError("a mask folder was given without an abnormal folder; pass --abnormal DIR as well")
        return dataset
    abnormal = list_images(abnormal_dir)
    if not abnormal:
        raise DataError(f"{abnormal_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    masks_by_stem: dict[str, Path] = {}
    if mask_dir is not None:
        for mask in list_images(mask_dir):
            stem = mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem
            masks_by_stem[stem] = mask
        stems = {p.stem for p in abnormal}
        for stem, mask in masks_by_stem.items():
            if stem not in stems:
                raise DataError(f"mask {mask} has no image named {stem}.* in {abnormal_dir}")
    for image_path in abnormal:
        mask = masks_by_stem.get(image_path.stem)
        if mask_dir is not None and mask is None:
            raise DataError(
                f"anomalous image {image_path} has no mask in {mask_dir} (expected {image_path.stem}.png or "
                f"{image_path.stem}_mask.png); add it or evaluate without --masks"
            )
        dataset.test.append(Sample(image_path, 1, "abnormal", (mask,) if mask else ()))
    return dataset
