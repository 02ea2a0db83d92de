"""Segmentation datasets on disk (ADE20K, Cityscapes, a generic folder) and a generated one.

Every dataset yields raw samples: ``load(i) -> (image (H, W, 3) uint8 RGB, label (H, W) int64)``
with class ids in ``[0, num_classes)`` and ``ignore_index`` (255) for unlabelled pixels. The
augmentation is applied by :class:`TrainSet` / :class:`EvalSet`, which wrap a dataset.

=============  ======================================================================================
``ade20k``     ``images/{training,validation}/*.jpg`` + ``annotations/{training,validation}/*.png``;
               label 0 ("other") → 255 and classes shifted by −1: 150 classes
               (mmseg's ``reduce_zero_label=True``, the official setup)
``cityscapes`` ``leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png`` +
               ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png``: 19 classes, 255 ignored
``folder``     ``<root>/<images>[/<split>]/*`` + ``<root>/<labels>[/<split>]/*.png`` matched by file
               stem; ``num_classes`` given; optional ``reduce_zero_label``
``synthetic``  coloured shapes on noisy backgrounds, label = shape class, generated in memory from
               a seed (a toy task a small model learns in a few dozen iterations)
=============  ======================================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastseg.data.palettes import ADE20K_CLASSES, CITYSCAPES_CLASSES
from fastseg.data.transforms import IGNORE_INDEX

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def _preview(items, limit: int = 5) -> str:
    items = [str(i) for i in items]
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def read_image(path, exif: bool = True) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, as image viewers show it — the one reader of
    ``predict``, ``eval`` and training data.

    - EXIF orientation is applied (``exif=False``: the pixels as stored), as OpenCV's and so
      mmcv's readers do; a photo shown upright gets an upright mask.
    - 16-bit images (PNG/TIFF modes ``I;16*``, and ``I``, read as 16-bit values) keep their top
      8 bits (``>> 8``), as OpenCV's 8-bit read does; 48/64-bit RGB(A) PNGs are read that way by
      Pillow itself. Grey, palette and alpha images become RGB (alpha dropped).
    - Float images (mode ``F``) have no agreed range and are refused. Anything that is not an
      image file (a folder, a text file, a truncated image) raises ``ValueError`` naming it.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot read image {path}: it is a folder, not an image file")
    try:
        with Image.open(path) as im:
            if exif and im.getexif().get(EXIF_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
            return _as_rgb8(im, path)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, FileNotFoundError):  # not an image, truncated, or too large for Pillow
            raise
        raise ValueError(f"cannot read image {path}: {e}") from None


EXIF_ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose applies


def _as_rgb8(im, path) -> np.ndarray:
    """A PIL image of any mode as (H, W, 3) uint8 RGB (16-bit values keep their top 8 bits)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.asarray(im)
        if im.mode == "I":  # 32-bit container: read as 16-bit values, as a 16-bit PNG opens in old Pillows
            wide = np.clip(wide, 0, 0xFFFF)
        grey = (wide.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise ValueError(f"cannot read image {path}: 32-bit float pixels (mode F) have no standard range; "
                         "save it as an 8- or 16-bit image")
    return np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def read_label(path) -> np.ndarray:
    """A label PNG (mode L, P or I;16) as an (H, W) int64 array of the stored values (palette
    indices for mode P, never colours)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            raise ValueError(
                f"label file {path} has image mode {im.mode!r}; expected a single-channel class-id "
                "image (mode L, P or I;16), not a colour image"
            )
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"label file {path} is not a single-channel image (shape {arr.shape})")
    return arr.astype(np.int64)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 → ignore (255); every other class shifts down by one (mmseg's ``reduce_zero_label``)."""
    out = label - 1
    out[label == 0] = IGNORE_INDEX
    out[out == IGNORE_INDEX - 1] = IGNORE_INDEX  # a stored 255 stays "ignore"
    return out


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: ``name``, ``num_classes``, ``class_names``, ``ignore_index``, ``load(i)``.

    Indexing returns the raw sample, so a dataset is usable on its own."""

    name = "dataset"
    ignore_index = IGNORE_INDEX

    def __init__(self, num_classes: int, class_names=None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if num_classes > IGNORE_INDEX:
            raise ValueError(f"num_classes={num_classes} collides with the ignore index {IGNORE_INDEX}")
        self.num_classes = num_classes
        self.class_names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(num_classes))

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sample_name(self, index: int) -> str:
        return f"{index:06d}"

    def sample_source(self, index: int) -> str:
        """What a message about sample ``index`` names: its image file, or its name."""
        return self.sample_name(index)

    def __getitem__(self, index: int):
        return self.load(index)


class PairedFiles(SegmentationDataset):
    """A dataset of (image file, label file) pairs; checks that every image has its label."""

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, class_names=None,
                 reduce_zero: bool = False):
        super().__init__(num_classes, class_names)
        self.pairs = pairs
        self.reduce_zero = reduce_zero
        self.exif = True  # apply EXIF orientation to the images (build_dataset's exif=False: not)

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_name(self, index: int) -> str:
        return self.pairs[index][0].stem

    def sample_source(self, index: int) -> str:
        return str(self.pairs[index][0])

    def load(self, index: int):
        image_path, label_path = self.pairs[index]
        image = read_image(image_path, exif=self.exif)
        label = read_label(label_path)
        if label.shape != image.shape[:2]:
            hint = ""
            if self.exif and label.shape == image.shape[1::-1]:
                hint = " (after its EXIF orientation; --no-exif reads the pixels as stored)"
            raise ValueError(f"{label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                             f"{image.shape[1]}x{image.shape[0]}{hint}")
        if self.reduce_zero:
            label = reduce_zero_label(label)
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            values = sorted(set(np.unique(label[bad]).tolist()))[:8]
            raise ValueError(f"{label_path} has labels {values} outside 0..{self.num_classes - 1} "
                             f"(and not the ignore index {IGNORE_INDEX})")
        return image, label


def _files(directory: Path, suffixes, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in directory.glob(pattern) if p.is_file() and p.suffix.lower() in suffixes)


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def match_by_stem(images: list[Path], labels: list[Path], image_root: Path, label_root: Path,
                  label_stem=lambda stem: stem) -> list[tuple[Path, Path]]:
    """Pair images and labels by (relative folder, stem); raise naming whatever is unmatched."""
    def key(path: Path, root: Path, stem: str) -> str:
        return str(path.relative_to(root).parent / stem)

    by_key = {}
    for lab in labels:
        by_key.setdefault(key(lab, label_root, lab.stem), []).append(lab)
    dup = [ps for ps in by_key.values() if len(ps) > 1]
    if dup:
        raise ValueError(f"several label files share a stem: {_preview(dup[0])}")
    pairs, missing, used = [], [], set()
    for img in images:
        k = key(img, image_root, label_stem(img.stem))
        if k in by_key:
            pairs.append((img, by_key[k][0]))
            used.add(k)
        else:
            missing.append(img)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) have no label file in {label_root}: {_preview(missing)}"
        )
    orphans = [ps[0] for k, ps in by_key.items() if k not in used]
    if orphans:
        raise ValueError(f"{len(orphans)} label file(s) in {label_root} have no image in {image_root}: "
                         f"{_preview(orphans)}")
    if not pairs:
        raise FileNotFoundError(f"no images found in {image_root} (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return pairs


class ADE20K(PairedFiles):
    """ADE20K (SceneParsing, ``ADEChallengeData2016``): 150 classes after reduce_zero_label."""

    name = "ade20k"
    SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

    def __init__(self, root, split: str = "train"):
        root = Path(root)
        if split not in self.SPLITS:
            raise ValueError(f"unknown ADE20K split {split!r}; choose one of {sorted(self.SPLITS)}")
        sub = self.SPLITS[split]
        img_dir = _need_dir(root / "images" / sub, "ADE20K images")
        ann_dir = _need_dir(root / "annotations" / sub, "ADE20K annotations")
        pairs = match_by_stem(_files(img_dir, (".jpg", ".jpeg", ".png")), _files(ann_dir, (".png",)), img_dir, ann_dir)
        super().__init__(pairs, 150, ADE20K_CLASSES, reduce_zero=True)


class Cityscapes(PairedFiles):
    """Cityscapes fine annotations as train ids (19 classes, 255 ignored)."""

    name = "cityscapes"
    IMAGE_SUFFIX = "_leftImg8bit"
    LABEL_SUFFIX = "_gtFine_labelTrainIds"

    def __init__(self, root, split: str = "train"):
        root = Path(root)
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown Cityscapes split {split!r}; choose train, val or test")
        img_dir = _need_dir(root / "leftImg8bit" / split, "Cityscapes leftImg8bit")
        ann_dir = _need_dir(root / "gtFine" / split, "Cityscapes gtFine")
        images = [p for p in _files(img_dir, (".png",), recursive=True) if p.stem.endswith(self.IMAGE_SUFFIX)]
        labels = [p for p in _files(ann_dir, (".png",), recursive=True) if p.stem.endswith(self.LABEL_SUFFIX)]
        if images and not labels and any(ann_dir.rglob("*_gtFine_labelIds.png")):
            raise FileNotFoundError(
                f"{ann_dir} has *_gtFine_labelIds.png but no *_gtFine_labelTrainIds.png; create them with "
                "cityscapesscripts (csCreateTrainIdLabelImgs)"
            )
        pairs = match_by_stem(images, labels, img_dir, ann_dir,
                              label_stem=lambda s: s[: -len(self.IMAGE_SUFFIX)] + self.LABEL_SUFFIX)
        super().__init__(pairs, 19, CITYSCAPES_CLASSES)


class ImageMaskFolder(PairedFiles):
    """Any folder of image/mask pairs matched by stem: ``<root>/<images>/[<split>/]`` and
    ``<root>/<labels>/[<split>/]`` (the split level is used when it exists)."""

    name = "folder"

    def __init__(self, root, split: str | None = "train", num_classes: int | None = None,
                 images: str = "images", labels: str = "labels", reduce_zero: bool = False,
                 class_names=None):
        if num_classes is None:
            raise ValueError("the folder dataset needs num_classes (--num-classes)")
        root = Path(root)
        img_dir = _need_dir(root / images, "images")
        ann_dir = _need_dir(root / labels, "labels")
        if split and (img_dir / split).is_dir():
            img_dir, ann_dir = img_dir / split, _need_dir(ann_dir / split, f"labels ({split} split)")
        pairs = match_by_stem(_files(img_dir, IMAGE_SUFFIXES), _files(ann_dir, LABEL_SUFFIXES), img_dir, ann_dir)
        super().__init__(pairs, num_classes, class_names, reduce_zero=reduce_zero)


class SyntheticShapes(SegmentationDataset):
    """Coloured shapes on noisy backgrounds; the label is the shape's class (0 = background).

    Class ``c >= 1`` is drawn as one shape kind (disc, square, triangle, ring, cross, …) in one
    hue (jittered), 1–3 shapes per image, occluding each other. Everything is generated from
    ``(seed, split, index)``, so a sample is the same on every call, worker and machine.
    """

    name = "synthetic"
    SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")

    def __init__(self, split: str = "train", num_images: int | None = None, size: int | tuple[int, int] = 64,
                 num_classes: int = 4, seed: int = 0):
        if num_classes < 2:
            raise ValueError(f"the synthetic task needs num_classes >= 2, got {num_classes}")
        names = ["background"] + [f"{self.SHAPES[(c - 1) % len(self.SHAPES)]}_{c}" for c in range(1, num_classes)]
        super().__init__(num_classes, names)
        self.split = split
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.num_images = num_images if num_images is not None else (64 if split == "train" else 16)
        self.seed = seed
        hues = np.linspace(0, 1, num_classes, endpoint=False)
        import colorsys

        self.colours = np.array([colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in hues]) * 255

    def __len__(self) -> int:
        return self.num_images

    def sample_name(self, index: int) -> str:
        return f"{self.split}_{index:06d}"

    def load(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"sample {index} out of range for {self.num_images} synthetic images")
        split_id = {"train": 0, "val": 1, "test": 2}.get(self.split, 3)
        rng = np.random.default_rng([self.seed, split_id, index])
        H, W = self.size
        ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
        base = rng.uniform(60, 190, size=3)
        grad = rng.uniform(-40, 40, size=(2, 3))
        image = base + grad[0] * (ys / H)[..., None] + grad[1] * (xs / W)[..., None]
        image = image + rng.normal(0, 18, size=(H, W, 3))
        label = np.zeros((H, W), dtype=np.int64)
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(1, self.num_classes))
            cy, cx = rng.uniform(0.2, 0.8) * H, rng.uniform(0.2, 0.8) * W
            r = rng.uniform(0.15, 0.3) * min(H, W)
            mask = self._shape(self.SHAPES[(cls - 1) % len(self.SHAPES)], ys - cy, xs - cx, r)
            colour = self.colours[cls] + rng.uniform(-20, 20, size=3)
            image[mask] = colour + rng.normal(0, 10, size=(int(mask.sum()), 3))
            label[mask] = cls
        return np.clip(image, 0, 255).astype(np.uint8), label

    @staticmethod
    def _shape(kind, dy, dx, r):
        if kind == "disc":
            return dy ** 2 + dx ** 2 <= r ** 2
        if kind == "square":
            return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
        if kind == "triangle":
            return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        if kind == "ring":
            d = dy ** 2 + dx ** 2
            return (d <= r ** 2) & (d >= (0.55 * r) ** 2)
        if kind == "cross":
            return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))
        return np.abs(dy) + np.abs(dx) <= r  # diamond


DATASETS = ("ade20k", "cityscapes", "folder", "synthetic")


@dataclass(frozen=True)
class DatasetDefaults:
    """The recipe's sizes for a dataset: training base scale (long, short), crop (h, w), the test
    scale (long, short; None keeps the image size) and the evaluation mode."""

    scale: tuple[int, int] | None
    crop: tuple[int, int]
    test_scale: tuple[int, int] | None
    eval_mode: str = "whole"
    eval_crop: tuple[int, int] | None = None
    eval_stride: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)


def dataset_defaults(name: str, synthetic_size: int = 64) -> DatasetDefaults:
    """SegFormer recipe: ADE20K 2048×512 with 512² crops, whole-image test at 2048×512;
    Cityscapes 2048×1024 with 1024² crops, sliding-window test (1024², stride 768)."""
    if name == "ade20k":
        return DatasetDefaults((2048, 512), (512, 512), (2048, 512))
    if name == "cityscapes":
        return DatasetDefaults((2048, 1024), (1024, 1024), (2048, 1024), "slide", (1024, 1024), (768, 768))
    if name == "synthetic":
        s = synthetic_size
        return DatasetDefaults((s, s), (s, s), None)
    if name == "folder":
        return DatasetDefaults(None, (512, 512), None)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def build_dataset(name: str, split: str, root=None, *, num_classes: int | None = None,
                  image_dir: str = "images", label_dir: str = "labels", reduce_zero: bool = False,
                  synthetic_size: int = 64, synthetic_images: int | None = None, seed: int = 0,
                  exif: bool = True) -> SegmentationDataset:
    """One dataset split by name (see the module docstring). ``exif=False``: images are read
    without their EXIF orientation (:func:`read_image`)."""
    if name == "synthetic":
        return SyntheticShapes(split, synthetic_images, synthetic_size, num_classes or 4, seed)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if root is None:
        raise ValueError(f"the {name} dataset needs a root folder (--data-root)")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if name == "ade20k":
        ds = ADE20K(root, split)
    elif name == "cityscapes":
        ds = Cityscapes(root, split)
    else:
        ds = ImageMaskFolder(root, split, num_classes, image_dir, label_dir, reduce_zero)
    ds.exif = exif
    if name == "folder":
        return ds
    if num_classes is not None and num_classes != ds.num_classes:
        raise ValueError(f"{name} has {ds.num_classes} classes, but num_classes={num_classes} was given")
    return ds


# --- wrappers that apply the transforms ----------------------------------------------------------

class TrainSet(torch.utils.data.Dataset):
    """Augmented training samples. Keys are ``(index, epoch)`` pairs (what :class:`TrainSampler`
    yields) or plain indices (epoch 0); each key seeds its own generator, ``(seed, epoch, index)``.
    """

    def __init__(self, dataset: SegmentationDataset, transform, seed: int = 0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label = self.dataset.load(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.transform(image, label, rng)


class EvalSet(torch.utils.data.Dataset):
    """Test-transformed samples: (image (3, h, w) at the test scale, label (H, W) original, index)."""

    def __init__(self, dataset: SegmentationDataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset.load(index)
        x, y = self.transform(image, label)
        return x, y, index


class TrainSampler(torch.utils.data.DistributedSampler):
    """A ``DistributedSampler`` (shuffled per epoch from ``seed``, equal shares per rank, tail
    dropped) that yields ``(index, epoch)`` keys and can start mid-epoch (``start``, in samples of
    this rank), which is how a resumed run continues with exactly the data it would have seen."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(int(i), self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start
