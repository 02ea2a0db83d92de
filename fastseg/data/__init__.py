"""Datasets (ADE20K, Cityscapes, image/mask folders, a synthetic task), the SegFormer/SETR
augmentation pipelines and colour palettes."""
from fastseg.data.datasets import (
    ADE20K,
    DATASETS,
    Cityscapes,
    EvalSet,
    ImageMaskFolder,
    SegmentationDataset,
    SyntheticShapes,
    TrainSampler,
    TrainSet,
    build_dataset,
    dataset_defaults,
    read_image,
    read_label,
)
from fastseg.data.palettes import colorize, generated_palette, overlay, palette_for
from fastseg.data.transforms import IGNORE_INDEX, PhotoMetricDistortion, TestTransform, TrainTransform

__all__ = [
    "ADE20K", "DATASETS", "Cityscapes", "EvalSet", "IGNORE_INDEX", "ImageMaskFolder", "PhotoMetricDistortion",
    "SegmentationDataset", "SyntheticShapes", "TestTransform", "TrainSampler", "TrainSet", "TrainTransform",
    "build_dataset", "colorize", "dataset_defaults", "generated_palette", "overlay", "palette_for", "read_image",
    "read_label",
]
