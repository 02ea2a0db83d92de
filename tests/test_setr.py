"""SETR: reference vs fused (forward and backward, torch and Triton backends), position-embedding
interpolation, corner padding, loading mmseg and timm checkpoints, round trip, bad input.

The mmseg and timm layouts come from independent module trees built below from the structure of
those codebases (mmseg's ``VisionTransformer`` with mmcv's ``MultiheadAttention`` — i.e. torch's
``nn.MultiheadAttention`` with its packed ``in_proj`` — and ``FFN``, ``SETRUPHead``, ``MLANeck``,
``SETRMLAHead``, ``FCNHead``; timm's ``VisionTransformer``). Their ``state_dict()`` keys come from
their own trees, never from fastseg's mapping table, and their forwards are their own.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import rel_err
from fastseg import SETR, SETRConfig
from fastseg.io import CheckpointError
from fastseg.ops import use_backend
from oracles import randomize_

DECODERS = ["naive", "pup", "mla"]
DIM, DEPTH, HEADS = 128, 4, 2  # head dim 64, as ViT-B/L


def small(decoder, **over) -> SETRConfig:
    base = dict(decoder=decoder, encoder=None, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, out_indices=(0, 1, 2, 3),
                img_size=64, head_channels=32, aux_channels=16, neck_channels=32, mla_channels=16, num_classes=5,
                drop_rate=0.0)
    base.update(over)
    return SETRConfig(**base)


def pair(decoder, seed=0, **over):
    ref = randomize_(SETR(config=small(decoder, **over)), seed=seed)
    return ref, copy.deepcopy(ref).set_fused(True)


# --- independent mmseg construction -----------------------------------------------------------------

class MMConvModule(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class MMUpsample(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        size = [int(t * self.scale) for t in x.shape[-2:]]
        return F.interpolate(x, size, mode="bilinear", align_corners=False)


class MMAttention(nn.Module):  # mmcv MultiheadAttention(batch_first=True)
    def __init__(self, dim, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, identity):
        return identity + self.attn(x, x, x, need_weights=False)[0]


class MMFFN(nn.Module):  # mmcv FFN(num_fcs=2)
    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)),
                                    nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x, identity):
        return identity + self.layers(x)


class MMLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim, eps=1e-6), MMAttention(dim, heads)
        self.ln2, self.ffn = nn.LayerNorm(dim, eps=1e-6), MMFFN(dim, 4 * dim)

    def forward(self, x):
        x = self.attn(self.ln1(x), identity=x)
        return self.ffn(self.ln2(x), identity=x)


class MMPatchEmbed(nn.Module):
    def __init__(self, dim, bias=True):
        super().__init__()
        self.projection = nn.Conv2d(3, dim, 16, 16, bias=bias)  # mmseg 1.x default: patch_bias=False

    def forward(self, x):
        H, W = x.shape[2:]
        x = F.pad(x, [0, math.ceil(W / 16) * 16 - W, 0, math.ceil(H / 16) * 16 - H])  # padding='corner'
        x = self.projection(x)
        return x.flatten(2).transpose(1, 2), x.shape[2:]


class MMViT(nn.Module):
    def __init__(self, img, out_indices, with_cls_token, patch_bias=True):
        super().__init__()
        self.img_size, self.out_indices, self.with_cls_token = img, out_indices, with_cls_token
        self.patch_embed = MMPatchEmbed(DIM, patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // 16) ** 2 + 1, DIM))
        self.layers = nn.ModuleList(MMLayer(DIM, HEADS) for _ in range(DEPTH))

    def forward(self, inputs):
        B = inputs.shape[0]
        x, hw = self.patch_embed(inputs)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:  # mmseg resizes only when the token counts differ
            g = self.img_size // 16
            grid = pos[:, 1:].reshape(1, g, g, DIM).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=tuple(hw), mode="bilinear", align_corners=False)
            pos = torch.cat((pos[:, :1], grid.flatten(2).transpose(1, 2)), dim=1)
        x = x + pos
        if not self.with_cls_token:
            x = x[:, 1:]
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.out_indices:
                out = x[:, 1:] if self.with_cls_token else x
                outs.append(out.reshape(B, hw[0], hw[1], DIM).permute(0, 3, 1, 2).contiguous())
        return outs


class MMSETRUPHead(nn.Module):
    def __init__(self, channels, classes, num_convs, up_scale, k, in_index):
        super().__init__()
        self.in_index = in_index
        self.norm = nn.LayerNorm(DIM, eps=1e-6)
        self.up_convs = nn.ModuleList(
            nn.Sequential(MMConvModule(DIM if i == 0 else channels, channels, k), MMUpsample(up_scale))
            for i in range(num_convs))
        self.conv_seg = nn.Conv2d(channels, classes, 1)

    def forward(self, inputs):
        x = inputs[self.in_index]
        n, c, h, w = x.shape
        x = self.norm(x.reshape(n, c, h * w).transpose(2, 1)).transpose(1, 2).reshape(n, c, h, w)
        for up_conv in self.up_convs:
            x = up_conv(x)
        return self.conv_seg(x)


class MMMLAModule(nn.Module):
    def __init__(self, cout):
        super().__init__()
        self.channel_proj = nn.ModuleList(MMConvModule(DIM, cout, 1) for _ in range(4))
        self.feat_extract = nn.ModuleList(MMConvModule(cout, cout, 3) for _ in range(4))

    def forward(self, inputs):
        feats = [conv(x) for x, conv in zip(inputs, self.channel_proj)][::-1]
        mids = []
        for f in feats:
            mids.append(f if not mids else mids[-1] + f)
        return [conv(m) for m, conv in zip(mids, self.feat_extract)]


class MMMLANeck(nn.Module):
    def __init__(self, cout):
        super().__init__()
        self.norm = nn.ModuleList(nn.LayerNorm(DIM, eps=1e-6) for _ in range(4))
        self.mla = MMMLAModule(cout)

    def forward(self, inputs):
        outs = []
        for x, norm in zip(inputs, self.norm):
            n, c, h, w = x.shape
            outs.append(norm(x.reshape(n, c, h * w).transpose(2, 1)).transpose(1, 2).reshape(n, c, h, w))
        return self.mla(outs)


class MMSETRMLAHead(nn.Module):
    def __init__(self, cin, mla, classes):
        super().__init__()
        self.up_convs = nn.ModuleList(
            nn.Sequential(MMConvModule(cin, mla, 3), MMConvModule(mla, mla, 3), MMUpsample(4)) for _ in range(4))
        self.conv_seg = nn.Conv2d(4 * mla, classes, 1)

    def forward(self, inputs):
        return self.conv_seg(torch.cat([up(x) for x, up in zip(inputs, self.up_convs)], dim=1))


class MMFCNHead(nn.Module):  # num_convs=0, concat_input=False
    def __init__(self, channels, classes, in_index):
        super().__init__()
        self.in_index = in_index
        self.conv_seg = nn.Conv2d(channels, classes, 1)

    def forward(self, inputs):
        return self.conv_seg(inputs[self.in_index])


class MMSETR(nn.Module):
    """mmseg EncoderDecoder with the SETR configs' backbone / neck / heads (small sizes)."""

    def __init__(self, decoder, classes=5, img=64, patch_bias=True):
        super().__init__()
        mla = decoder == "mla"
        self.backbone = MMViT(img, (0, 1, 2, 3), with_cls_token=not mla, patch_bias=patch_bias)
        if mla:
            self.neck = MMMLANeck(32)
            self.decode_head = MMSETRMLAHead(32, 16, classes)
            self.auxiliary_head = nn.ModuleList(MMFCNHead(32, classes, k) for k in range(4))
        else:
            num_convs, up, k = (4, 2, 3) if decoder == "pup" else (1, 4, 1)
            self.decode_head = MMSETRUPHead(32, classes, num_convs, up, k, in_index=3)
            self.auxiliary_head = nn.ModuleList(
                MMSETRUPHead(16, classes, 1, 4, k, in_index=i) for i in range(3))

    def forward(self, x):
        feats = self.backbone(x)
        if hasattr(self, "neck"):
            feats = self.neck(feats)
        return self.decode_head(feats), [h(feats) for h in self.auxiliary_head]


# --- independent timm construction --------------------------------------------------------------------

class TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class TimmMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TimmAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), TimmMlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 16, 16)


class TimmViT(nn.Module):
    """timm ``VisionTransformer`` (e.g. ``jx_vit_large_p16_384``: pos_embed for a 24×24 grid + cls)."""

    def __init__(self, img):
        super().__init__()
        self.patch_embed = TimmPatchEmbed(DIM)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // 16) ** 2 + 1, DIM))
        self.blocks = nn.Sequential(*[TimmBlock(DIM, HEADS) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM, eps=1e-6)
        self.head = nn.Linear(DIM, 1000)

    def intermediates(self, x):
        B, _, H, W = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1) + self.pos_embed
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x[:, 1:].reshape(B, H // 16, W // 16, DIM).permute(0, 3, 1, 2))
        return outs


def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D bilinear resizing with align_corners=False, by the formula."""
    A = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        A[i, i0] += 1 - lam
        A[i, i1] += lam
    return A


def resized_pos(pos, src, dst):
    C = pos.shape[-1]
    grid = pos[0, 1:].double().reshape(src[0], src[1], C)
    grid = torch.einsum("ah,hwc,bw->abc", bilinear_matrix(src[0], dst[0]), grid, bilinear_matrix(src[1], dst[1]))
    return torch.cat([pos[0, :1].double(), grid.reshape(-1, C)])[None].to(pos.dtype)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


# --- fused vs reference -----------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", DECODERS)
def test_eval_fused_matches_reference(decoder):
    ref, fused = pair(decoder)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        want, got = ref.eval()(x), fused.eval()(x)
        for a, b in zip(ref.forward_features(x), fused.forward_features(x)):
            assert a.shape == b.shape == (2, DIM, 3, 5) and rel_err(b, a) < 1e-5
    expect = {"pup": (48, 80), "naive": (12, 20), "mla": (12, 20)}[decoder]
    assert got.shape == want.shape == (2, 5, *expect)
    assert rel_err(got, want) < 1e-4
    # the C++ kernel in inference where the extension has it, else SDPA
    assert fused.backends()["sr_attention"].backend in ("cpp", "torch")
    assert ref.backends()["sr_attention"].backend == "reference"


def _backward(model, x, grads, double=False):
    x = x.detach().clone().double() if double else x.detach().clone()
    x.requires_grad_(True)
    out = model(x)
    main, aux = out if isinstance(out, tuple) else (out, [])
    loss = (main * grads[0].to(main.dtype)).sum() + sum((a * g.to(a.dtype)).sum() for a, g in zip(aux, grads[1:]))
    loss.backward()
    return x.grad


def _check_grads(ref, fused, gold, gx_ref, gx_fused, gx_gold):
    # Each gradient against the fp64 gold, relative to its own size floored at 1% of the largest
    # gradient (biases feeding a training-mode BN have gradients that are zero up to rounding);
    # the bar is 1e-4 or twice the eager fp32 error.
    gold_p, fused_p, ref_p = dict(gold.named_parameters()), dict(fused.named_parameters()), dict(ref.named_parameters())
    floor = 1e-2 * max(p.grad.abs().max().item() for p in gold_p.values() if p.grad is not None)
    checks = [("input", gx_fused, gx_ref, gx_gold)] + [
        (n, fused_p[n].grad, ref_p[n].grad, g.grad) for n, g in gold_p.items() if g.grad is not None]
    for name, got, eager, want in checks:
        if got is None and not want.any():  # MLA's unused cls token: zero gradient on one side, none on the other
            continue
        assert got is not None, f"no gradient reached {name}"
        scale = max(want.abs().max().item(), floor)
        err = (got.double() - want).abs().max().item() / scale
        eager_err = (eager.double() - want).abs().max().item() / scale
        assert err <= max(1e-4, 2 * eager_err), f"{name}: fused {err:.2e}, eager {eager_err:.2e}"
    missing = [n for n, p in gold_p.items() if p.grad is None and n != "encoder.cls_token"
               and (gold.training or not n.startswith("aux_heads."))]  # eval runs no auxiliary head
    assert not missing, missing


@pytest.mark.parametrize("decoder", DECODERS)
def test_training_backward_matches_reference(decoder):
    ref, fused = pair(decoder)
    gold = copy.deepcopy(ref).double()
    for m in (ref, fused, gold):
        m.train()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        main, aux = copy.deepcopy(ref)(x)  # shapes only; a copy, so BN statistics stay in step
    grads = [torch.randn_like(main)] + [torch.randn_like(a) for a in aux]
    gx_ref, gx_fused = _backward(ref, x, grads), _backward(fused, x, grads)
    gx_gold = _backward(gold, x, grads, double=True)
    _check_grads(ref, fused, gold, gx_ref, gx_fused, gx_gold)
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6), name  # BN running statistics


def test_eval_backward_on_triton_backend():
    # Under Triton's interpreter on CPU: tiny (32x32 → 2x2 tokens + cls, head dim 64).
    ref, fused = pair("pup")
    gold = copy.deepcopy(ref).double()
    for m in (ref, fused, gold):
        m.eval()
    x = torch.randn(1, 3, 32, 32)
    grads = [torch.randn(1, 5, 32, 32)]
    with use_backend("triton"):
        assert fused.backends()["sr_attention"].backend == "triton"
        gx_fused = _backward(fused, x, grads)
    gx_ref, gx_gold = _backward(ref, x, grads), _backward(gold, x, grads, double=True)
    _check_grads(ref, fused, gold, gx_ref, gx_fused, gx_gold)


def test_training_returns_aux_logits_and_weights():
    for decoder, n_aux, aux_hw in (("pup", 3, (12, 20)), ("naive", 3, (12, 20)), ("mla", 4, (3, 5))):
        model = SETR(config=small(decoder)).train()
        main, aux = model(torch.randn(2, 3, 48, 80))
        assert len(aux) == n_aux and all(a.shape == (2, 5, *aux_hw) for a in aux)
        assert model.aux_weights == (0.4,) * n_aux
        assert model.eval().predict(torch.randn(1, 3, 50, 70)).shape == (1, 5, 50, 70)


def test_fold_cache_follows_weight_updates():
    _, fused = pair("pup")
    fused.eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        first = fused(x)
        assert torch.equal(fused(x), first)
    with torch.no_grad():
        fused.decoder.convs[0].bn.running_var.mul_(4.0)  # in place: bumps the version counter
    with torch.inference_mode():
        assert not torch.allclose(fused(x), first)


# --- geometry: position embeddings and padding ---------------------------------------------------------

def test_position_embedding_is_interpolated_for_other_sizes():
    for fused in (False, True):
        model = randomize_(SETR(config=small("pup")), seed=1).eval().set_fused(fused)
        # The same weights, but built for 96x80 with the embedding resized by the formula.
        other = SETR(config=small("pup", img_size=(96, 80))).eval().set_fused(fused)
        sd = dict(model.state_dict())
        sd["encoder.pos_embed"] = resized_pos(sd["encoder.pos_embed"], (4, 4), (6, 5))
        other.load_state_dict(sd)
        x = torch.randn(1, 3, 96, 80)
        with torch.no_grad():
            assert rel_err(model.encoder.pos_embed_for((6, 5)), other.encoder.pos_embed) < 1e-6
            for a, b in zip(model.forward_features(x), other.forward_features(x)):
                assert a.shape == (1, DIM, 6, 5) and rel_err(a, b) < 1e-5
            assert model(x).shape == (1, 5, 96, 80)


def test_inputs_not_multiple_of_16_are_padded_at_the_corner():
    ref, fused = pair("naive")
    x = torch.randn(1, 3, 50, 70)
    padded = F.pad(x, (0, 10, 0, 14))
    with torch.no_grad():
        for model in (ref.eval(), fused.eval()):
            out = model(x)
            assert out.shape == (1, 5, 16, 20)
            assert rel_err(out, model(padded)) < 1e-6


# --- loading --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", DECODERS)
def test_mmseg_checkpoint_matches_mmseg_structure(tmp_path, decoder):
    import numpy as np

    ref = randomize_(MMSETR(decoder), seed=2).eval()
    torch.save({"meta": {"mmseg_version": "1.2.2", "iter": np.int64(160000)}, "state_dict": ref.state_dict()},
               tmp_path / "setr.pth")
    model = SETR.from_pretrained(tmp_path / "setr.pth", out_indices=(0, 1, 2, 3))
    assert model.load_report.format == "mmseg" and model.config.decoder == decoder
    assert model.num_classes == 5 and model.config.img_size == (64, 64)
    # Not a multiple of 16 (both sides pad at the corner) and another grid (both resize the
    # position embedding).
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        want, want_aux = ref(x)
        for fused in (False, True):
            model.set_fused(fused).eval()
            assert rel_err(model(x), want) < 1e-4
        # Training mode: the auxiliary heads too (BN on batch statistics on both sides).
        ref.train(), no_dropout(model).train()
        want, want_aux = ref(x)
        got, got_aux = model(x)
    assert rel_err(got, want) < 1e-4
    assert len(got_aux) == len(want_aux) and all(rel_err(g, w) < 1e-4 for g, w in zip(got_aux, want_aux))


def test_timm_encoder_checkpoint(tmp_path):
    vit = randomize_(TimmViT(img=96), seed=3).eval()  # a 6x6 grid, like jx_vit_large_p16_384's 24x24
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="num_classes"):
        SETR.from_pretrained(tmp_path / "vit.pth")
    with pytest.warns(UserWarning, match="encoder-only"):
        model = SETR.from_pretrained(tmp_path / "vit.pth", num_classes=3, decoder="pup", out_indices=(0, 1, 2, 3))
    report = model.load_report
    assert report.format == "timm" and model.config.img_size == (96, 96) and model.config.num_heads == HEADS
    assert {"norm.weight", "norm.bias", "head.weight", "head.bias"} <= set(report.ignored)
    assert any("heads" in item for item in report.initialised)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = vit.intermediates(x)
        for fused in (False, True):
            for g, w in zip(model.set_fused(fused).eval().forward_features(x), want):
                assert rel_err(g, w) < 1e-4
        assert model(x).shape == (2, 3, 96, 96)

    with pytest.warns(UserWarning):
        small_model = SETR.from_pretrained(tmp_path / "vit.pth", num_classes=3, decoder="mla", img_size=64)
    assert small_model.config.out_indices == (0, 1, 2, 3) and small_model.config.with_cls_token is False
    want_pos = resized_pos(vit.pos_embed.detach(), (6, 6), (4, 4))
    assert rel_err(small_model.encoder.pos_embed.detach(), want_pos) < 1e-6
    assert any("resized" in n for n in small_model.load_report.notes)


def test_other_num_classes_reinitialises_the_classifiers(tmp_path):
    ref = randomize_(MMSETR("pup"), seed=4)
    with pytest.warns(UserWarning, match="re-initialised"):
        model = SETR.from_pretrained(ref.state_dict(), num_classes=7, out_indices=(0, 1, 2, 3))
    assert model.num_classes == 7 and model.decoder.classifier.weight.shape[0] == 7
    assert all(h.classifier.weight.shape[0] == 7 for h in model.aux_heads)
    assert torch.equal(model.decoder.convs[2].conv.weight, ref.decode_head.up_convs[2][0].conv.weight)
    assert torch.equal(model.encoder.blocks[1].attn.qkv.weight, ref.backbone.layers[1].attn.attn.in_proj_weight)


@pytest.mark.parametrize("decoder", ["pup", "mla"])
def test_save_pretrained_round_trip_is_bit_exact(tmp_path, decoder):
    model = randomize_(SETR(config=small(decoder, img_size=(64, 48))), seed=5).eval()
    model.save_pretrained(tmp_path / "saved")
    again = SETR.from_pretrained(tmp_path / "saved").eval()
    assert again.config == model.config and again.load_report.format == "fastseg"
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert SETR.from_pretrained(tmp_path / "saved" / "model.safetensors").config == model.config


@pytest.mark.parametrize("decoder", DECODERS)
def test_mmseg_1x_checkpoint_without_patch_bias(tmp_path, decoder):
    """mmseg 1.x's VisionTransformer defaults to patch_bias=False: load it, compute as mmseg, save it back."""
    ref = randomize_(MMSETR(decoder, patch_bias=False), seed=6).eval()
    assert "backbone.patch_embed.projection.bias" not in ref.state_dict()
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": ref.state_dict()}, tmp_path / "setr.pth")
    model = SETR.from_pretrained(tmp_path / "setr.pth", out_indices=(0, 1, 2, 3)).eval()
    assert model.config.patch_bias is False and model.encoder.patch_embed.proj.bias is None
    assert any("patch_bias=False" in n for n in model.load_report.notes)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        want = ref(x)[0]
        for fused in (False, True):
            assert rel_err(model.set_fused(fused)(x), want) < 1e-4
    model.set_fused(False)
    # back to mmseg: mmseg's module tree loads it strictly, every tensor bit for bit
    saved = model.save_pretrained(tmp_path / "back.pth", "mmseg")
    assert any("patch_bias=False" in n for n in saved.notes)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == {"meta", "state_dict"}
    again = MMSETR(decoder, patch_bias=False)
    again.load_state_dict(back["state_dict"], strict=True)
    a, b = again.state_dict(), ref.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    # and through fastseg's own format: still without a bias
    model.save_pretrained(tmp_path / "fs")
    assert SETR.from_pretrained(tmp_path / "fs").encoder.patch_embed.proj.bias is None


@pytest.mark.parametrize("patch_bias", [True, False])
def test_setr_round_trips_mmseg_fastseg_timm(tmp_path, patch_bias):
    model = randomize_(SETR(config=small("pup", patch_bias=patch_bias)), seed=7).eval()
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        want = model(x)
    for fmt, name in (("mmseg", "m.pth"), ("fastseg", "fs"), ("fastseg", "fs.safetensors")):
        model.save_pretrained(tmp_path / name, fmt)
        again = SETR.from_pretrained(tmp_path / name, out_indices=(0, 1, 2, 3)).eval()
        c = model.config
        # mmseg files hold no dropout rate, nor MLA widths for a PUP model: the rest of the config comes back
        assert again.config.replace(drop_rate=c.drop_rate, neck_channels=c.neck_channels, mla_channels=c.mla_channels) == c
        a, b = again.state_dict(), model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with torch.no_grad():
            assert torch.equal(again(x), want)
    # timm holds the encoder only: written with a warning, loadable strictly into timm's ViT built
    # with num_classes=0, final_norm=False (no norm, no head); a missing patch bias becomes zeros
    with pytest.warns(UserWarning, match="encoder only"):
        model.save_pretrained(tmp_path / "vit.pth", "timm")
    vit = TimmViT(img=64)
    del vit.norm, vit.head
    vit.load_state_dict(torch.load(tmp_path / "vit.pth", weights_only=True), strict=True)
    with pytest.warns(UserWarning, match="encoder-only"):
        enc = SETR.from_pretrained(tmp_path / "vit.pth", num_classes=5, decoder="pup", out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        for g, w in zip(enc.forward_features(x), model.forward_features(x)):
            assert torch.equal(g, w)


def test_setr_conversions_that_cannot_be_faithful_are_refused(tmp_path):
    model = SETR(config=small("naive"))
    with pytest.raises(ValueError, match="choose one of"):
        model.save_pretrained(tmp_path / "x", "hf")
    model.save_pretrained(tmp_path / "m.pth", "mmseg")
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save_pretrained(tmp_path / "m.pth", "mmseg", overwrite=False)


# --- bad input ------------------------------------------------------------------------------------------

def test_bad_images_name_the_problem():
    model = SETR(config=small("naive")).eval()
    cases = [
        ([[1.0]], TypeError, "torch.Tensor"),
        (torch.randn(3, 32, 32), ValueError, "rank 4"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), TypeError, "floating-point"),
        (torch.randn(0, 3, 32, 32), ValueError, "empty batch"),
        (torch.randn(1, 3, 0, 32), ValueError, "empty images"),
        (torch.randn(1, 4, 32, 32), ValueError, "3 input channels"),
        (torch.randn(1, 3, 32, 32, dtype=torch.float64), TypeError, "float64"),
    ]
    for x, err, match in cases:
        with pytest.raises(err, match=match):
            model(x)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="vit_base_patch16"):
        SETR(encoder="vit_huge_patch14")
    with pytest.raises(ValueError, match="'naive', 'pup', 'mla'"):
        SETR(decoder="fpn")
    with pytest.raises(ValueError, match="increasing"):
        small("pup", out_indices=(0, 1, 1, 3))


def test_foreign_and_damaged_checkpoints(tmp_path):
    resnet_like = {"conv1.weight": torch.randn(64, 3, 7, 7), "fc.weight": torch.randn(10, 64)}
    with pytest.raises(CheckpointError) as info:
        SETR.from_pretrained(resnet_like)
    msg = str(info.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "conv1.weight" in msg and "patch_embed" in msg

    sd = dict(randomize_(MMSETR("mla")).state_dict())
    del sd["neck.mla.feat_extract.2.conv.weight"]
    sd["neck.mla.extra.weight"] = torch.randn(3)
    with pytest.raises(CheckpointError) as info:
        SETR.from_pretrained(sd, out_indices=(0, 1, 2, 3))
    assert "neck.extract.2.conv.weight" in str(info.value) and "neck.mla.extra.weight" in str(info.value)
    model = SETR.from_pretrained(sd, out_indices=(0, 1, 2, 3), strict=False)
    assert any("missing keys" in n for n in model.load_report.notes)

    with pytest.raises(CheckpointError, match="decoder"):
        SETR.from_pretrained(randomize_(MMSETR("naive")).state_dict(), decoder="pup")
    torch.save(sd, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        SETR.from_pretrained(tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError):
        SETR.from_pretrained(tmp_path / "nope.pth")


def test_bf16_fused_error_is_within_twice_the_eager_error():
    ref, _ = pair("pup")
    ref.eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        gold = ref(x)
        eager = copy.deepcopy(ref).to(torch.bfloat16)(x.bfloat16())
        fused = copy.deepcopy(ref).set_fused(True).to(torch.bfloat16)(x.bfloat16())
    assert rel_err(fused, gold) <= max(2 * rel_err(eager, gold), 1e-3)
    assert (fused.argmax(1) == gold.argmax(1)).float().mean() >= 0.98  # bf16 on a random net
