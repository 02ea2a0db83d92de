"""The reference SegFormer: shapes, variants, the fused switch, the backends report, bad input."""
import math

import pytest
import torch

from conftest import rel_err
from fastseg import SegFormer, SegFormerConfig
from fastseg.models.config import NORM_EPS, VARIANTS
from oracles import NVLabsSegFormer, randomize_


@pytest.mark.parametrize("H,W", [(61, 47), (32, 32), (33, 95)])
def test_output_shape_is_ceil_quarter(H, W):
    model = SegFormer("b0", num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, H, W))
    assert out.shape == (1, 3, math.ceil(H / 4), math.ceil(W / 4))
    assert torch.isfinite(out).all()


def test_forward_features_are_the_four_stages(images):
    model = SegFormer("b0", num_classes=3).eval()
    with torch.no_grad():
        feats = model.forward_features(images)
    sizes = [(16, 12), (8, 6), (4, 3), (2, 2)]
    assert [tuple(f.shape) for f in feats] == [(2, c, *s) for c, s in zip(VARIANTS["b0"][0], sizes)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_builds_with_the_paper_sizes(variant):
    model = SegFormer(variant, num_classes=19)
    dims, depths, decoder_dim = VARIANTS[variant]
    assert [len(s.blocks) for s in model.encoder.stages] == list(depths)
    assert [s.patch_embed.proj.out_channels for s in model.encoder.stages] == list(dims)
    assert model.decoder.linear_fuse.out_channels == decoder_dim
    # Official eps: 1e-6 in blocks and stage norms, 1e-5 in patch embeddings and sr norms.
    stage = model.encoder.stages[0]
    assert (stage.patch_embed.norm.eps, stage.blocks[0].norm1.eps, stage.blocks[0].attn.norm.eps, stage.norm.eps) == (
        1e-5, 1e-6, 1e-5, 1e-6)


@pytest.mark.slow
def test_b5_runs_at_an_odd_size():
    model = SegFormer("b5", num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 41)).shape == (1, 2, 10, 11)


def test_reference_path_computes_the_official_math(images):
    """Weights copied by name into the NVlabs-structured oracle give the same logits."""
    model = randomize_(SegFormer("b0", num_classes=6)).eval()
    oracle = NVLabsSegFormer(VARIANTS["b0"][0], VARIANTS["b0"][1], 256, 6).eval()
    # the oracle's own names, mapped by hand here (independently of fastseg.checkpoints)
    with torch.no_grad():
        for i, stage in enumerate(model.encoder.stages, start=1):
            pe = getattr(oracle.backbone, f"patch_embed{i}")
            pe.proj.load_state_dict(stage.patch_embed.proj.state_dict())
            pe.norm.load_state_dict(stage.patch_embed.norm.state_dict())
            getattr(oracle.backbone, f"norm{i}").load_state_dict(stage.norm.state_dict())
            for ob, fb in zip(getattr(oracle.backbone, f"block{i}"), stage.blocks):
                ob.norm1.load_state_dict(fb.norm1.state_dict())
                ob.norm2.load_state_dict(fb.norm2.state_dict())
                for name in ("q", "kv", "proj", "sr", "norm")[: 5 if fb.attn.sr_ratio > 1 else 3]:
                    getattr(ob.attn, name).load_state_dict(getattr(fb.attn, name).state_dict())
                ob.mlp.fc1.load_state_dict(fb.mlp.fc1.state_dict())
                ob.mlp.fc2.load_state_dict(fb.mlp.fc2.state_dict())
                ob.mlp.dwconv.dwconv.load_state_dict(fb.mlp.dwconv.state_dict())
        head, dec = oracle.decode_head, model.decoder
        for i in range(4):
            getattr(head, f"linear_c{i + 1}").proj.load_state_dict(dec.linear_c[i].state_dict())
        head.linear_fuse.conv.load_state_dict(dec.linear_fuse.state_dict())
        head.linear_fuse.bn.load_state_dict(dec.bn.state_dict())
        head.linear_pred.load_state_dict(dec.classifier.state_dict())
        assert rel_err(model(images), oracle(images)) < 1e-5


def test_set_fused_switches_the_same_weights_and_reports_backends(images):
    model = randomize_(SegFormer("b0", num_classes=4)).eval()
    assert not model.fused
    assert {c.backend for c in model.backends().values()} == {"reference"}
    with torch.no_grad():
        ref = model(images)
        model.set_fused(True)
        assert model.fused and all(m.fused for m in model.modules() if hasattr(m, "fused") and m is not model)
        out = model(images)
    report = model.backends()
    # upsample_argmax: what predict/eval use on the model's logits (fastseg.inference.segment_labels)
    # linear: every linear of the fused path (fastseg.ops.packed_linear), oneDNN or aten
    assert set(report) == {"overlap_patch_embed", "sr_attention", "dwconv3x3_gelu", "decoder_upsample_fuse",
                           "upsample_argmax", "add_layer_norm", "linear", "mix_ffn"}
    for choice in report.values():
        # Whatever runs must be named, and a reference fallback must say why.
        assert choice.backend in ("triton", "cuda", "cpp", "torch", "reference", "onednn", "aten")
        if choice.backend == "reference":
            assert choice.skipped, choice
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


def test_mmseg_decoder_variant(images):
    model = SegFormer("b0", num_classes=5, decoder="mmseg").eval()
    assert [type(m).__name__ for m in model.decoder.convs] == ["ConvBNReLU"] * 4
    with torch.no_grad():
        assert model(images).shape == (2, 5, 16, 12)


def test_config_round_trips_through_a_dict():
    cfg = SegFormerConfig.from_variant("b2", num_classes=7, norm_eps=NORM_EPS["hf"], decoder="mmseg")
    assert SegFormerConfig.from_dict(cfg.to_dict()) == cfg


def test_train_mode_backward_reaches_every_parameter(images):
    model = SegFormer("b0", num_classes=3)
    model(images).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


# --- bad input -----------------------------------------------------------------------------------

def test_unknown_variant_lists_the_variants():
    with pytest.raises(ValueError, match=r"b7.*\['b0', 'b1', 'b2', 'b3', 'b4', 'b5'\]"):
        SegFormer("b7")


def test_bad_decoder_and_num_classes():
    with pytest.raises(ValueError, match="decoder"):
        SegFormer("b0", decoder="upernet")
    with pytest.raises(ValueError, match="num_classes"):
        SegFormer("b0", num_classes=0)


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(3, 64, 64), ValueError, "rank 4"),
    (torch.randn(1, 1, 3, 64, 64), ValueError, "rank 4"),
    (torch.randn(1, 4, 64, 64), ValueError, "3 input channels, got 4"),
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), TypeError, "floating-point"),
    (torch.randn(0, 3, 64, 64), ValueError, "empty batch"),
    (torch.randn(1, 3, 31, 64), ValueError, ">= 32"),
    (torch.randn(1, 3, 64, 64, dtype=torch.float64), TypeError, "float64.*float32"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_images_are_named(x, error, match):
    model = SegFormer("b0", num_classes=2)
    with pytest.raises(error, match=match):
        model(x)
