"""A range's bundles: ``amoe convert`` of a detector trained over a range of products writes one bundle per
product (each with that product's calibration and threshold; folded, each with that product's expert set) into
one folder with an index, ``products.json``, which ``EdgeDetector(folder, product=NAME)`` opens by name. The
products share the frozen encoder, so its graph is exported once and joined to each product's head
(``onnx_export.EncoderExports``), and the checkpoint is read once; each product has its own calibration pass.

Written as a bundle is: everything in a hidden folder beside the target, swapped in by renames at the end, and
only over a folder that is new, empty or a range bundle of ours.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from amoe_sdk.checkpoint import read_checkpoint, run_products
from amoe_sdk.converters.bundle_writer import check_bundle_destination
from amoe_sdk.converters.convert import ConvertOptions, convert
from amoe_sdk.converters.onnx_export import EncoderExports
from amoe_sdk.errors import UsageError
from amoe_sdk.outputs import WRITER_MARKER, mark_as_ours, remove_stale_writers
from amoe_sdk.runtimes.bundle import PRODUCTS_NAME, read_bundle

RANGE_FORMAT = 1


def check_range_destination(out: Path) -> None:
    """``out`` is new, empty, or a range bundle holding only its index and its products' bundles; UsageError
    changing nothing otherwise."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} is a file or a link, not a folder; pass a new folder (nothing was changed)")
    if not out.exists() or not any(out.iterdir()):
        return
    index = out / PRODUCTS_NAME
    if not index.is_file():
        raise UsageError(
            f"--out {out} is a folder that is not a range bundle of ours (no {PRODUCTS_NAME}): amoe convert replaces "
            "only bundles. Pass a new folder (nothing was changed)"
        )
    listed = set(json.loads(index.read_text()).get("products", {}).values())
    foreign = sorted(e.name for e in out.iterdir() if not e.name.startswith(".") and e.name != PRODUCTS_NAME and e.name not in listed)
    if foreign:
        raise UsageError(
            f"--out {out} is a range bundle that also holds files of yours ({', '.join(foreign[:5])}); replacing it "
            "would delete them. Move them out of the folder, or pass another --out (nothing was changed)"
        )
    for name in listed:
        check_bundle_destination(out / name)


def product_row(name: str, bundle_dir: Path) -> dict:
    """One line of the table ``amoe convert --all-products`` prints, from a product's bundle."""
    manifest = read_bundle(bundle_dir).manifest
    folding = manifest.routing.folding or {}
    return {
        "product": name, "bundle": str(bundle_dir), "routing": manifest.routing.mode,
        "agreement": folding.get("agreement"), "kept": folding.get("kept"),
        "params_before": folding.get("params_before"), "params_after": folding.get("params_after"),
        "gflops_before": folding.get("gflops_before"), "gflops_after": folding.get("gflops_after"),
        "threshold": manifest.threshold.image,
    }


def convert_products(checkpoint: str | Path, out: str | Path, options: ConvertOptions) -> tuple[Path, list[dict]]:
    """Every product of the range run ``checkpoint`` converted with ``options`` into ``out/<product>``, and the
    index. -> (``out``, one ``product_row`` per product)."""
    out = Path(out)
    payload = read_checkpoint(checkpoint)
    if "products" not in payload:
        raise UsageError(f"{payload['path']} is a detector of one product; convert it without --all-products")
    if options.product is not None:
        raise UsageError("--all-products converts every product; leave out --product, or convert one product without --all-products")
    check_range_destination(out)
    products = run_products(payload)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_writers(out.parent, f".{out.name}.range-")
    tmp = out.parent / f".{out.name}.range-{os.getpid()}"
    old = out.parent / f".{out.name}.range-old-{os.getpid()}"
    try:
        tmp.mkdir()
        mark_as_ours(tmp)
        # The products share the checkpoint, read once, and the frozen encoder, exported once.
        rows, encoders = [], EncoderExports()
        for name in tqdm(products, desc="products", unit="bundle", leave=False):
            rows.append(product_row(name, convert(payload, tmp / name, replace(options, product=name), encoders)))
        index = {"format": RANGE_FORMAT, "source": str(Path(payload["path"]).resolve()), "routing": options.routing,
                 "products": {name: name for name in products}}
        (tmp / PRODUCTS_NAME).write_text(json.dumps(index, indent=2))
        check_range_destination(out)  # again: the folder may have changed during the conversions
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            out.rename(old)
        (tmp / WRITER_MARKER).unlink()
        tmp.rename(out)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    return out, [{**row, "bundle": str(out / row["product"])} for row in rows]


def format_rows(rows: list[dict]) -> str:
    """The table of a range's conversion: per product, the routing agreement, kept experts, parameters and GFLOPs."""
    lines = ["| product | agreement | kept experts | params before -> after | GFLOPs before -> after | threshold |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["agreement"] is None:
            lines.append(f"| {r['product']} | dense | all | - | - | {r['threshold']:.4f} |")
            continue
        lines.append(
            f"| {r['product']} | {r['agreement']:.1%} | {' + '.join(r['kept'])} | {r['params_before']:,} -> {r['params_after']:,} | "
            f"{r['gflops_before']:.2f} -> {r['gflops_after']:.2f} | {r['threshold']:.4f} |"
        )
    return "\n".join(lines)

