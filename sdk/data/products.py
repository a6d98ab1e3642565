"""A product range: the categories one detector is trained on, read from ``--data`` arguments.

``amoe train --data ROOT`` takes ROOT as one category when it has ``train/`` (or as a plain folder of normal
images when it has no category inside), and as a range when its sub-folders are MVTec categories; ``--data A
--data B`` names the categories (or ranges) one by one. A product is named after its folder, and the names must
differ: they are what ``amoe convert --product`` and ``EdgeDetector(product=)`` select by.
"""

from __future__ import annotations

from pathlib import Path

from amoe_sdk.data.layouts import GOOD, Dataset, read_dataset
from amoe_sdk.errors import DataError


def category_folders(root: Path) -> list[Path]:
    """The sub-folders of ``root`` that are MVTec categories (``train/good``); [] when it is not a range.

    A range is all categories: a visible sub-folder without ``train/good`` beside categories is an error naming
    it, never skipped (a product would silently go untrained)."""
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    categories = [p for p in subfolders if (p / "train" / GOOD).is_dir()]
    if not categories:
        return []
    strays = [p for p in subfolders if p not in categories]
    if strays:
        raise DataError(
            f"{strays[0]} in the product range {root} has no train/good folder, beside {len(categories)} categories that "
            "do; give it train/good with normal images, move it out of the range, or pass the categories one by one "
            "with --data A --data B"
        )
    return categories


def read_products(roots: list[str | Path], require_test: bool = False) -> list[Dataset]:
    """``--data`` arguments -> the products, in the order given (a range's categories sorted by name).

    One argument that is a category or a plain folder gives one product, as ``read_dataset`` reads it. Duplicate
    product names are an error naming both folders."""
    if not roots:
        raise DataError("no --data given; pass a category folder, a folder of categories, or --data A --data B")
    products: list[Dataset] = []
    for root in map(Path, roots):
        if not root.exists():
            raise DataError(f"dataset {root} does not exist; make the sample data with `amoe data sample DIR` or fix the path")
        folders = [] if (root / "train").is_dir() or not root.is_dir() else category_folders(root)
        products += [read_dataset(folder, require_test) for folder in folders or [root]]
    seen: dict[str, Path] = {}
    for product in products:
        if product.name in seen:
            raise DataError(
                f"two products are named {product.name!r}: {seen[product.name]} and {product.root}; a product is named "
                "after its folder, so rename one of the folders"
            )
        seen[product.name] = product.root
    return products


def describe_roots(products: list[Dataset]) -> str:
    """Where a run's images came from, for its checkpoint and messages: the folder, or the folders joined."""
    return str(products[0].root) if len(products) == 1 else ", ".join(str(p.root) for p in products)
