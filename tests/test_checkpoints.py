"""Loading every checkpoint layout, checked against independent implementations.

- HuggingFace: the real ``transformers`` SegFormer (its module names via ``state_dict()``, its hub
  names via its own ``save_pretrained``, and a live model via ``from_hf``).
- NVlabs and mmseg layouts: modules in ``oracles.py`` built from those codebases' structure; their
  keys come from their own module trees and their forwards are independent (mmseg's attention is
  torch's ``nn.MultiheadAttention``).
"""
import pytest
import torch
from safetensors.torch import save_file

from conftest import rel_err
from fastseg import SegFormer
from fastseg.io import CheckpointError
from oracles import MMSegMiT, MMSegSegFormer, NVLabsMiT, NVLabsSegFormer, randomize_

transformers = pytest.importorskip("transformers")

B0 = dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256)
B2 = dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_dim=768)


def hf_model(spec, classes=5, cls="SegformerForSemanticSegmentation"):
    config = transformers.SegformerConfig(
        hidden_sizes=list(spec["dims"]), depths=list(spec["depths"]),
        decoder_hidden_size=spec["decoder_dim"], num_labels=classes,
    )
    return randomize_(getattr(transformers, cls)(config)).eval()


@pytest.fixture(scope="module")
def hf_b0():
    return hf_model(B0)


@torch.no_grad()
def hf_logits(model, x):
    return model(pixel_values=x).logits


# --- HuggingFace -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,variant", [(B0, "b0"), (B2, "b2")])
def test_hf_all_three_routes_match_transformers(tmp_path, images, spec, variant):
    hf = hf_model(spec)
    want = hf_logits(hf, images)

    live = SegFormer.from_hf(hf).eval()
    assert live.variant == variant and live.load_report.format == "hf"

    hf.save_pretrained(tmp_path / "hub")  # transformers writes the hub (legacy) names
    hub = SegFormer.from_pretrained(tmp_path / "hub").eval()
    assert hub.load_report.format == "hf_legacy"

    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "current.safetensors")
    current = SegFormer.from_pretrained(tmp_path / "current.safetensors").eval()
    assert current.load_report.format == "hf"

    for model in (live, hub, current):
        with torch.no_grad():
            got = model(images)
        assert got.shape == want.shape == (2, 5, 16, 12)
        assert rel_err(got, want) < 1e-4


def test_hf_bin_file_and_state_dict(tmp_path, images, hf_b0):
    want = hf_logits(hf_b0, images)
    torch.save(hf_b0.state_dict(), tmp_path / "pytorch_model.bin")
    for source in (tmp_path / "pytorch_model.bin", hf_b0.state_dict()):
        with torch.no_grad():
            assert rel_err(SegFormer.from_pretrained(source).eval()(images), want) < 1e-4


def test_hf_imagenet_backbone_is_encoder_only(tmp_path, images):
    hf = hf_model(B0, classes=1000, cls="SegformerForImageClassification")
    hf.save_pretrained(tmp_path / "mit")
    with pytest.raises(ValueError, match="num_classes"):
        SegFormer.from_pretrained(tmp_path / "mit")
    with pytest.warns(UserWarning, match="encoder-only"):
        model = SegFormer.from_pretrained(tmp_path / "mit", num_classes=19).eval()
    assert model.num_classes == 19
    assert "classifier.weight" in model.load_report.ignored
    assert any("decoder" in item for item in model.load_report.initialised)
    with torch.no_grad():
        got = model.forward_features(images)
        want = hf.segformer(pixel_values=images, output_hidden_states=True).hidden_states
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-4


def test_hf_sharded_directory(tmp_path, images, hf_b0):
    hf_b0.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    with torch.no_grad():
        assert rel_err(SegFormer.from_pretrained(tmp_path / "sharded").eval()(images), hf_logits(hf_b0, images)) < 1e-4


# --- NVlabs / mmseg-0.x ----------------------------------------------------------------------------

def test_nvlabs_checkpoint_matches_official_structure(tmp_path, images):
    import numpy as np

    ref = randomize_(NVLabsSegFormer(B0["dims"], B0["depths"], 256, 7)).eval()
    # mmcv checkpoints wrap the weights and carry numpy values in their meta.
    ckpt = {"state_dict": ref.state_dict(), "meta": {"CLASSES": ("a", "b"), "iter": 160000,
                                                    "best": np.float64(0.5), "hist": np.arange(3)}}
    torch.save(ckpt, tmp_path / "segformer.b0.512x512.ade.160k.pth")
    model = SegFormer.from_pretrained(tmp_path / "segformer.b0.512x512.ade.160k.pth").eval()
    assert model.load_report.format == "nvlabs" and model.variant == "b0" and model.num_classes == 7
    assert "decode_head.conv_seg.weight" in model.load_report.ignored
    with torch.no_grad():
        assert rel_err(model(images), ref(images)) < 1e-4


def test_nvlabs_imagenet_backbone(tmp_path, images):
    ref = randomize_(NVLabsMiT(B2["dims"], B2["depths"], with_imagenet_head=True)).eval()
    torch.save(ref.state_dict(), tmp_path / "mit_b2.pth")
    with pytest.warns(UserWarning):
        model = SegFormer.from_pretrained(tmp_path / "mit_b2.pth", num_classes=150).eval()
    assert model.variant == "b2" and model.config.decoder_dim == 768
    assert set(model.load_report.ignored) == {"head.weight", "head.bias"}
    with torch.no_grad():
        for g, w in zip(model.forward_features(images), ref(images)):
            assert rel_err(g, w) < 1e-4
        assert model(images).shape == (2, 150, 16, 12)


# --- mmsegmentation (MixVisionTransformer + SegformerHead) -----------------------------------------

def test_mmseg_checkpoint_with_its_own_head(tmp_path, images):
    ref = randomize_(MMSegSegFormer(B0["dims"], B0["depths"], 256, 4)).eval()
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": ref.state_dict()}, tmp_path / "mmseg.pth")
    model = SegFormer.from_pretrained(tmp_path / "mmseg.pth").eval()
    assert model.load_report.format == "mmseg" and model.config.decoder == "mmseg"
    with torch.no_grad():
        assert rel_err(model(images), ref(images)) < 1e-4
    with pytest.raises(CheckpointError, match="decoder"):
        SegFormer.from_pretrained(tmp_path / "mmseg.pth", decoder="mlp")


def test_mmseg_imagenet_backbone(tmp_path, images):
    ref = randomize_(MMSegMiT(B0["dims"], B0["depths"])).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "mit_b0_mmseg.safetensors")
    with pytest.warns(UserWarning):
        model = SegFormer.from_pretrained(tmp_path / "mit_b0_mmseg.safetensors", num_classes=3, decoder="mmseg").eval()
    assert model.config.decoder == "mmseg" and model.config.norm_eps.patch_embed == 1e-6
    with torch.no_grad():
        for g, w in zip(model.forward_features(images), ref(images)):
            assert rel_err(g, w) < 1e-4


# --- num_classes, round trip ------------------------------------------------------------------------

def test_other_num_classes_reinitialises_the_classifier(images, hf_b0):
    with pytest.warns(UserWarning, match="re-initialised"):
        model = SegFormer.from_pretrained(hf_b0.state_dict(), num_classes=3)
    assert model.num_classes == 3 and model.load_report.initialised == ["decoder.classifier"]
    assert torch.equal(model.decoder.linear_fuse.weight, hf_b0.decode_head.linear_fuse.weight)


@pytest.mark.parametrize("source", ["hf", "mmseg"])
def test_save_pretrained_round_trip_is_bit_exact(tmp_path, images, hf_b0, source):
    if source == "hf":
        model = SegFormer.from_hf(hf_b0)
    else:
        model = SegFormer("b0", num_classes=4, decoder="mmseg")
        randomize_(model)
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    again = SegFormer.from_pretrained(tmp_path / "saved").eval()
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(images), again(images))
    # The weights file alone carries the config too.
    alone = SegFormer.from_pretrained(tmp_path / "saved" / "model.safetensors")
    assert alone.config == model.config


def test_save_is_atomic_and_keeps_the_old_files_on_failure(tmp_path, monkeypatch):
    model = SegFormer("b0", num_classes=2)
    model.save_pretrained(tmp_path / "saved")
    before = (tmp_path / "saved" / "model.safetensors").read_bytes()
    import fastseg.io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fastseg.io.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        SegFormer("b0", num_classes=3).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["fastseg_config.json", "model.safetensors"]


# --- bad checkpoints -------------------------------------------------------------------------------

def test_corrupt_and_truncated_files(tmp_path, hf_b0):
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save(hf_b0.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    save_file({k: v.contiguous() for k, v in hf_b0.state_dict().items()}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    for name in ("junk.pth", "cut.pth", "cut.safetensors"):
        with pytest.raises(CheckpointError, match="corrupt|truncated|not a valid"):
            SegFormer.from_pretrained(tmp_path / name)


def test_missing_paths_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError):
        SegFormer.from_pretrained(tmp_path / "nope.pth")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint file type"):
        SegFormer.from_pretrained(tmp_path / "weights.onnx")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SegFormer.from_pretrained(tmp_path / "empty_dir")


def test_other_architecture_lists_missing_and_unexpected_keys():
    resnet_like = {"conv1.weight": torch.randn(64, 3, 7, 7), "bn1.weight": torch.randn(64),
                   "layer1.0.conv1.weight": torch.randn(64, 64, 3, 3), "fc.weight": torch.randn(1000, 2048)}
    with pytest.raises(CheckpointError) as info:
        SegFormer.from_pretrained(resnet_like)
    msg = str(info.value)
    assert "missing keys" in msg and "unexpected keys" in msg
    assert "conv1.weight" in msg and "patch_embed" in msg


def test_damaged_segformer_checkpoint_names_its_keys(hf_b0):
    sd = dict(hf_b0.state_dict())
    del sd["segformer.stages.1.blocks.0.mlp.fc2.weight"]
    sd["segformer.stages.1.blocks.0.mlp.extra.weight"] = torch.randn(3)
    with pytest.raises(CheckpointError) as info:
        SegFormer.from_pretrained(sd)
    assert "encoder.stages.1.blocks.0.mlp.fc2.weight" in str(info.value)
    assert "segformer.stages.1.blocks.0.mlp.extra.weight" in str(info.value)
    model = SegFormer.from_pretrained(sd, strict=False)
    assert any("missing keys" in n for n in model.load_report.notes)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_that_would_run_code_is_refused(tmp_path, hf_b0):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": dict(hf_b0.state_dict()), "payload": _Exploit(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        SegFormer.from_pretrained(tmp_path / "evil.pth")
    assert not marker.exists()
