"""Datasets on disk (ADE20K, Cityscapes, folders), the synthetic task, augmentations, sampling."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastseg.data import (
    ADE20K,
    Cityscapes,
    ImageMaskFolder,
    PhotoMetricDistortion,
    SyntheticShapes,
    TestTransform,
    TrainSampler,
    TrainSet,
    TrainTransform,
    build_dataset,
)
from fastseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    hsv_to_rgb,
    random_crop,
    rescale_size,
    resize_label,
    rgb_to_hsv,
)


def write_pair(image_path, label_path, label, seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    h, w = label.shape
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_path, format=fmt)
    Image.fromarray(label.astype(np.uint8)).save(label_path)


def ade_tree(root, names=("a", "b"), split="training", size=(37, 45)):
    labels = {}
    for i, name in enumerate(names):
        label = np.random.default_rng(i).integers(0, 151, size)
        label[0, 0], label[0, 1], label[0, 2] = 0, 1, 150
        write_pair(root / "images" / split / f"{name}.jpg", root / "annotations" / split / f"{name}.png", label, i)
        labels[name] = label
    return labels


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    labels = ade_tree(tmp_path)
    ds = ADE20K(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 150 and ds.class_names[0] == "wall"
    image, label = ds.load(0)
    assert image.shape == (37, 45, 3) and image.dtype == np.uint8
    raw = labels["a"]
    assert label[0, 0] == 255 and label[0, 1] == 0 and label[0, 2] == 149
    np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw - 1))
    assert label.max() <= 255 and (label[label != 255] < 150).all()
    with pytest.raises(FileNotFoundError, match="validation"):
        ADE20K(tmp_path, "val")


def test_ade20k_missing_and_unmatched_files_are_named(tmp_path):
    ade_tree(tmp_path)
    (tmp_path / "annotations" / "training" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.jpg"):
        ADE20K(tmp_path, "train")
    (tmp_path / "images" / "training" / "b.jpg").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "annotations" / "training" / "orphan.png")
    with pytest.raises(ValueError, match="orphan.png"):
        ADE20K(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        build_dataset("ade20k", "train", tmp_path / "nowhere")


def test_cityscapes_layout_keeps_train_ids(tmp_path):
    for city, stem in [("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")]:
        label = np.full((33, 65), 7, dtype=np.uint8)
        label[:, :5], label[0, :] = 255, 18
        write_pair(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
                   tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", label)
        # Other gtFine files next to the train ids are not labels.
        Image.fromarray(label).save(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
    ds = build_dataset("cityscapes", "val", tmp_path)
    assert isinstance(ds, Cityscapes) and len(ds) == 2 and ds.num_classes == 19
    assert ds.sample_name(0) == "aachen_000000_000019_leftImg8bit"
    _, label = ds.load(1)
    assert set(np.unique(label)) == {7, 18, 255}
    with pytest.raises(ValueError, match="19 classes"):
        build_dataset("cityscapes", "val", tmp_path, num_classes=5)


def test_cityscapes_without_train_ids_says_how_to_make_them(tmp_path):
    label = np.zeros((8, 8), np.uint8)
    write_pair(tmp_path / "leftImg8bit" / "train" / "ulm" / "ulm_1_leftImg8bit.png",
               tmp_path / "gtFine" / "train" / "ulm" / "ulm_1_gtFine_labelIds.png", label)
    with pytest.raises(FileNotFoundError, match="labelTrainIds"):
        Cityscapes(tmp_path, "train")


def test_folder_dataset_matches_by_stem(tmp_path):
    for i, stem in enumerate(["x1", "x2", "x3"]):
        label = np.full((20, 24), i, dtype=np.uint8)
        write_pair(tmp_path / "imgs" / "val" / f"{stem}.png", tmp_path / "masks" / "val" / f"{stem}.png", label, i)
    ds = ImageMaskFolder(tmp_path, "val", num_classes=3, images="imgs", labels="masks")
    assert [ds.sample_name(i) for i in range(3)] == ["x1", "x2", "x3"]
    assert (ds.load(2)[1] == 2).all()
    shifted = ImageMaskFolder(tmp_path, "val", num_classes=2, images="imgs", labels="masks", reduce_zero=True)
    assert (shifted.load(0)[1] == 255).all() and (shifted.load(2)[1] == 1).all()
    with pytest.raises(ValueError, match="num_classes"):
        build_dataset("folder", "val", tmp_path)
    (tmp_path / "masks" / "val" / "x2.png").unlink()
    with pytest.raises(FileNotFoundError, match="x2"):
        ImageMaskFolder(tmp_path, "val", num_classes=3, images="imgs", labels="masks")


def test_colour_label_images_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "labels" / "a.png")
    ds = ImageMaskFolder(tmp_path, None, num_classes=2)
    with pytest.raises(ValueError, match="mode 'RGB'"):
        ds.load(0)


def test_synthetic_task_is_deterministic_and_covers_every_class():
    a, b = SyntheticShapes("train", 24, 48, 5, seed=3), SyntheticShapes("train", 24, 48, 5, seed=3)
    for i in (0, 7, 23):
        np.testing.assert_array_equal(a.load(i)[0], b.load(i)[0])
        np.testing.assert_array_equal(a.load(i)[1], b.load(i)[1])
    assert not np.array_equal(a.load(0)[0], SyntheticShapes("val", 24, 48, 5, seed=3).load(0)[0])
    seen = set()
    for i in range(24):
        image, label = a.load(i)
        assert image.shape == (48, 48, 3) and label.shape == (48, 48)
        seen |= set(np.unique(label).tolist())
    assert seen == set(range(5))


def test_train_transform_shapes_padding_and_determinism():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (30, 50))
    t = TrainTransform(crop=(40, 64), scale=None, ratio_range=(1.0, 1.0), photometric=None, flip_prob=0.0)
    x, y = t(image, label, np.random.default_rng(1))
    assert x.shape == (3, 40, 64) and x.dtype == torch.float32 and y.shape == (40, 64) and y.dtype == torch.int64
    # Image fits inside the crop: it is only padded (image 0 after normalisation, label 255).
    assert (x[:, 30:] == 0).all() and (x[:, :, 50:] == 0).all()
    assert (y[30:] == 255).all() and (y[:, 50:] == 255).all()
    torch.testing.assert_close(y[:30, :50], torch.from_numpy(label))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x[:, :30, :50], (torch.from_numpy(image).permute(2, 0, 1).float() - mean) / std)

    full = TrainTransform(crop=(32, 32), scale=(64, 48))
    out1 = full(image, label, np.random.default_rng(5))
    out2 = full(image, label, np.random.default_rng(5))
    out3 = full(image, label, np.random.default_rng(6))
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    assert not torch.equal(out1[0], out3[0])
    assert set(out1[1].unique().tolist()) <= set(range(4)) | {255}


def test_random_resize_follows_the_recipe_scale():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(1024, 2048, (1024, 512)) == (512, 1024)
    assert rescale_size(300, 400, (2048, 512)) == (512, 683)
    sizes = set()
    t = TrainTransform(crop=(8, 8), scale=(200, 100), ratio_range=(0.5, 2.0), photometric=None, cat_max_ratio=1.0)
    image, label = np.zeros((50, 100, 3), np.uint8), np.zeros((50, 100), np.int64)
    from fastseg.data.transforms import random_rescale

    for s in range(20):
        im, lab = random_rescale(image, label, t.scale, t.ratio_range, np.random.default_rng(s))
        assert im.shape[:2] == lab.shape and abs(im.shape[1] / im.shape[0] - 2.0) < 0.05
        sizes.add(im.shape[0])
    assert min(sizes) >= 50 and max(sizes) <= 200 and len(sizes) > 5


def test_labels_are_resized_with_nearest():
    label = np.random.default_rng(0).choice([3, 9, 255], size=(17, 23))
    out = resize_label(label, (40, 51))
    assert set(np.unique(out)) <= {3, 9, 255}
    np.testing.assert_array_equal(resize_label(label, (34, 46))[::2, ::2], label)


def test_cat_max_ratio_rejects_crops_dominated_by_one_class():
    label = np.zeros((100, 100), np.int64)
    label[:60, :60] = 1  # a single crop is balanced with p ≈ 0.37; 11 draws: ≈ 0.99
    label[90:, :] = 255  # ignored pixels do not count
    image = np.zeros((100, 100, 3), np.uint8)

    def balanced(cat_max_ratio, seed):
        _, crop = random_crop(image, label, (40, 40), cat_max_ratio, np.random.default_rng(seed))
        _, counts = np.unique(crop[crop != 255], return_counts=True)
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    with_ratio = sum(balanced(0.75, s) for s in range(40))
    without = sum(balanced(1.0, s) for s in range(40))
    assert with_ratio >= 36 and without <= 26, (with_ratio, without)
    # Never more than 10 retries: a label of one class gives up and returns a crop of the right size.
    one = np.zeros((50, 50), np.int64)
    im, lab = random_crop(np.zeros((50, 50, 3), np.uint8), one, (20, 30), 0.75, np.random.default_rng(0))
    assert im.shape == (20, 30, 3) and lab.shape == (20, 30)


def test_photometric_distortion():
    image = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    pmd = PhotoMetricDistortion()
    outs = [pmd(image, np.random.default_rng(s)) for s in range(8)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
    assert any(not np.array_equal(o, image) for o in outs)
    np.testing.assert_array_equal(pmd(image, np.random.default_rng(3)), outs[3])
    # OpenCV-convention HSV round trip is exact up to the 8-bit quantisation of hue.
    assert np.abs(hsv_to_rgb(rgb_to_hsv(image)).astype(int) - image).max() <= 4
    grey = np.full((4, 4, 3), 77, np.uint8)
    hsv = rgb_to_hsv(grey)
    assert (hsv[..., 1] == 0).all() and (hsv[..., 2] == 77).all()
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert rgb_to_hsv(red).tolist() == [[[0, 255, 255]]]


def test_test_transform_keeps_the_label_size():
    image = np.zeros((100, 300, 3), np.uint8)
    label = np.ones((100, 300), np.int64)
    x, y = TestTransform((2048, 512))(image, label)
    assert x.shape == (3, 512, 1536) and y.shape == (100, 300)  # short edge 100 → 512 bounds it
    x, _ = TestTransform((2048, 512))(np.zeros((500, 4000, 3), np.uint8), None)
    assert x.shape == (3, 256, 2048)
    x, y = TestTransform(None)(image, None)
    assert x.shape == (3, 100, 300) and y is None


def test_sampler_shards_and_resumes_mid_epoch():
    ds = SyntheticShapes("train", 10, 32)
    r0, r1 = TrainSampler(ds, 2, 0, seed=1), TrainSampler(ds, 2, 1, seed=1)
    a, b = list(r0), list(r1)
    assert len(a) == len(b) == 5 and not {i for i, _ in a} & {i for i, _ in b}
    assert all(e == 0 for _, e in a)
    r0.set_position(3, 2)
    tail = list(r0)
    r0.set_position(3, 0)
    assert tail == list(r0)[2:] and tail[0][1] == 3 and len(TrainSampler(ds, 1, 0)) == 10


def test_loader_output_does_not_depend_on_workers():
    ds = SyntheticShapes("train", 8, 32)
    t = TrainTransform(crop=(32, 32), scale=(32, 32))

    def first_batch(workers):
        sampler = TrainSampler(ds, 1, 0, seed=0)
        sampler.set_position(2, 0)
        loader = torch.utils.data.DataLoader(TrainSet(ds, t, seed=0), batch_size=4, sampler=sampler,
                                             num_workers=workers)
        return next(iter(loader))

    (x0, y0), (x2, y2) = first_batch(0), first_batch(2)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_bad_files_are_named(tmp_path):
    """An unreadable image, a mask of another size, labels out of range: each error names the file."""
    for stem in ("ok", "broken", "small", "range"):
        label = np.full((12, 16), 1, dtype=np.uint8)
        if stem == "range":
            label[3, 4] = 7  # num_classes is 3; 255 elsewhere would be fine
            label[0, 0] = 255
        write_pair(tmp_path / "img" / f"{stem}.png", tmp_path / "ann" / f"{stem}.png", label)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(np.zeros((5, 6), dtype=np.uint8)).save(tmp_path / "ann" / "small.png")
    ds = ImageMaskFolder(tmp_path, None, num_classes=3, images="img", labels="ann")
    names = [ds.sample_name(i) for i in range(len(ds))]
    ds.load(names.index("ok"))
    with pytest.raises(ValueError, match=r"broken\.png"):
        ds.load(names.index("broken"))
    with pytest.raises(ValueError, match=r"small\.png.*6x5"):
        ds.load(names.index("small"))
    with pytest.raises(ValueError, match=r"range\.png has labels \[7\]"):
        ds.load(names.index("range"))
