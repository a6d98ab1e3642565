"""Reading images and masks, dataset layouts, and the procedural sample dataset."""

from amoe_sdk.data.images import IMAGE_SUFFIXES, list_images, read_image, read_mask
from amoe_sdk.data.layouts import Dataset, Sample, read_dataset, read_folder_dataset, read_mvtec_category

__all__ = [
    "IMAGE_SUFFIXES",
    "Dataset",
    "Sample",
    "list_images",
    "read_dataset",
    "read_folder_dataset",
    "read_image",
    "read_mask",
    "read_mvtec_category",
]
