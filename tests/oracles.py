"""Independent constructions of the checkpoint layouts fastseg loads, for the loading tests.

These modules are written from the structure of the official NVlabs code and of mmsegmentation's
``MixVisionTransformer`` / ``SegformerHead``: their ``state_dict()`` keys come from their own module
trees (not from fastseg's mapping table), and their forward passes compute with their own ops —
mmseg's attention here is ``torch.nn.MultiheadAttention`` with its packed ``in_proj``, as in mmcv.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize_(module: nn.Module, seed: int | None = None) -> nn.Module:
    """Random, well-scaled values in every parameter and BN buffer (no 1/0 LayerNorm defaults)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module


# --- NVlabs layout ---------------------------------------------------------------------------------

class _NVAttention(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)  # plain nn.LayerNorm: eps 1e-5

    def forward(self, x, H, W):
        B, N, C = x.shape
        d = C // self.heads
        q = self.q(x).reshape(B, N, self.heads, d).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1))
        kv = self.kv(x).reshape(B, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        attn = ((q @ kv[0].transpose(-2, -1)) * d ** -0.5).softmax(-1)
        return self.proj((attn @ kv[1]).transpose(1, 2).reshape(B, N, C))


class _NVDWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).view(B, C, H, W)).flatten(2).transpose(1, 2)


class _NVMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.dwconv, self.fc2 = nn.Linear(dim, hidden), _NVDWConv(hidden), nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), H, W)))


class _NVBlock(nn.Module):
    def __init__(self, dim, heads, sr, norm):
        super().__init__()
        self.norm1, self.attn = norm(dim), _NVAttention(dim, heads, sr)
        self.norm2, self.mlp = norm(dim), _NVMlp(dim, 4 * dim)

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x), H, W)


class _NVPatchEmbed(nn.Module):
    def __init__(self, cin, dim, k, s):
        super().__init__()
        self.proj, self.norm = nn.Conv2d(cin, dim, k, s, k // 2), nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class NVLabsMiT(nn.Module):
    """``mit_b*`` of NVlabs/SegFormer: keys patch_embed{i}, block{i}.{j}, norm{i}."""

    def __init__(self, dims, depths, heads=(1, 2, 5, 8), srs=(8, 4, 2, 1), with_imagenet_head=False):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        cin = 3
        for i in range(4):
            k, s = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}", _NVPatchEmbed(cin, dims[i], k, s))
            setattr(self, f"block{i + 1}", nn.ModuleList(_NVBlock(dims[i], heads[i], srs[i], norm) for _ in range(depths[i])))
            setattr(self, f"norm{i + 1}", norm(dims[i]))
            cin = dims[i]
        if with_imagenet_head:
            self.head = nn.Linear(dims[3], 1000)

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            B = x.shape[0]
            x, H, W = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, H, W)
            x = getattr(self, f"norm{i}")(x).reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


class _ConvModule(nn.Module):
    def __init__(self, cin, cout, act=True):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.act else x


class _NVMLP(nn.Module):
    def __init__(self, cin, dim):
        super().__init__()
        self.proj = nn.Linear(cin, dim)

    def forward(self, x):
        return self.proj(x.flatten(2).transpose(1, 2))


class NVLabsHead(nn.Module):
    """NVlabs ``SegFormerHead`` incl. the unused ``conv_seg`` its BaseDecodeHead creates."""

    def __init__(self, dims, dim, classes):
        super().__init__()
        for i in range(4):
            setattr(self, f"linear_c{i + 1}", _NVMLP(dims[i], dim))
        self.linear_fuse = _ConvModule(4 * dim, dim)
        self.linear_pred = nn.Conv2d(dim, classes, 1)
        self.conv_seg = nn.Conv2d(dim, classes, 1)  # never used by forward

    def forward(self, feats):
        n, _, H, W = feats[0].shape
        outs = []
        for i in (4, 3, 2, 1):
            c = feats[i - 1]
            x = getattr(self, f"linear_c{i}")(c).permute(0, 2, 1).reshape(n, -1, *c.shape[2:])
            if i != 1:
                x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
            outs.append(x)
        return self.linear_pred(self.linear_fuse(torch.cat(outs, 1)))


class NVLabsSegFormer(nn.Module):
    def __init__(self, dims, depths, decoder_dim, classes):
        super().__init__()
        self.backbone = NVLabsMiT(dims, depths)
        self.decode_head = NVLabsHead(dims, decoder_dim, classes)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


# --- mmsegmentation layout --------------------------------------------------------------------------

class _MMPatchEmbed(nn.Module):
    def __init__(self, cin, dim, k, s):
        super().__init__()
        self.projection, self.norm = nn.Conv2d(cin, dim, k, s, k // 2), nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.projection(x)
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)


class _MMEfficientAttention(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.sr_ratio = sr
        if sr > 1:
            self.sr, self.norm = nn.Conv2d(dim, dim, sr, sr), nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, hw, identity):
        kv = x
        if self.sr_ratio > 1:
            B, N, C = x.shape
            kv = self.norm(self.sr(x.transpose(1, 2).reshape(B, C, *hw)).flatten(2).transpose(1, 2))
        return identity + self.attn(x, kv, kv, need_weights=False)[0]


class _MMMixFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden), nn.GELU(),
            nn.Dropout(0.0), nn.Conv2d(hidden, dim, 1), nn.Dropout(0.0),
        )

    def forward(self, x, hw, identity):
        B, N, C = x.shape
        out = self.layers(x.transpose(1, 2).reshape(B, C, *hw))
        return identity + out.flatten(2).transpose(1, 2)


class _MMLayer(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _MMEfficientAttention(dim, heads, sr)
        self.norm2, self.ffn = nn.LayerNorm(dim, eps=1e-6), _MMMixFFN(dim, 4 * dim)

    def forward(self, x, hw):
        x = self.attn(self.norm1(x), hw, identity=x)
        return self.ffn(self.norm2(x), hw, identity=x)


class MMSegMiT(nn.Module):
    """mmseg ``MixVisionTransformer``: layers.{i} = [PatchEmbed, [layers], LayerNorm]."""

    def __init__(self, dims, depths, heads=(1, 2, 5, 8), srs=(8, 4, 2, 1)):
        super().__init__()
        self.layers = nn.ModuleList()
        cin = 3
        for i in range(4):
            k, s = (7, 4) if i == 0 else (3, 2)
            self.layers.append(nn.ModuleList([
                _MMPatchEmbed(cin, dims[i], k, s),
                nn.ModuleList(_MMLayer(dims[i], heads[i], srs[i]) for _ in range(depths[i])),
                nn.LayerNorm(dims[i], eps=1e-6),
            ]))
            cin = dims[i]

    def forward(self, x):
        outs = []
        for embed, blocks, norm in self.layers:
            x, hw = embed(x)
            for blk in blocks:
                x = blk(x, hw)
            x = norm(x).transpose(1, 2).reshape(x.shape[0], -1, *hw)
            outs.append(x)
        return outs


class MMSegHead(nn.Module):
    """mmseg ``SegformerHead``: convs (ConvModule), fusion_conv, conv_seg."""

    def __init__(self, dims, dim, classes):
        super().__init__()
        self.convs = nn.ModuleList(_ConvModule(c, dim) for c in dims)
        self.fusion_conv = _ConvModule(4 * dim, dim)
        self.conv_seg = nn.Conv2d(dim, classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        outs = [F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                for f, conv in zip(feats, self.convs)]
        return self.conv_seg(self.fusion_conv(torch.cat(outs, 1)))


class MMSegSegFormer(nn.Module):
    def __init__(self, dims, depths, decoder_dim, classes):
        super().__init__()
        self.backbone = MMSegMiT(dims, depths)
        self.decode_head = MMSegHead(dims, decoder_dim, classes)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


# --- segmentation_models_pytorch (smp >= 0.4) Segformer layout ----------------------------------------
# Built from smp's published structure (encoders/mix_transformer.py, decoders/segformer/, base/heads.py):
# the MiT blocks there take and return NCHW maps and its LayerNorm accepts NCHW input; the decoder
# reverses the stage list, so mlp_stage.0 projects the deepest stage; fuse_stage is Conv2dReLU (conv
# without bias, BN, ReLU); the segmentation head is a 1x1 conv then nn.Upsample(x4, bilinear,
# align_corners=True). smp itself is not installed (it replaces a CPU torch).

class _SMPLayerNorm(nn.LayerNorm):
    """smp's LayerNorm: normalises over channels for (B, N, C) tokens and for (B, C, H, W) maps."""

    def forward(self, x):
        if x.ndim == 4:
            B, C, H, W = x.shape
            y = F.layer_norm(x.reshape(B, C, H * W).transpose(1, 2), self.normalized_shape, self.weight, self.bias,
                             self.eps)
            return y.transpose(1, 2).reshape(B, C, H, W)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class _SMPAttention(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        if sr > 1:
            self.sr, self.norm = nn.Conv2d(dim, dim, sr, sr), _SMPLayerNorm(dim)  # eps 1e-5
        else:
            self.sr, self.norm = nn.Identity(), nn.Identity()

    def forward(self, x, H, W):
        B, N, C = x.shape
        h = self.heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.norm(self.sr(x.transpose(1, 2).reshape(B, C, H, W)).reshape(B, C, -1).transpose(1, 2))
        k, v = self.kv(src).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-2, -1) * (C // h) ** -0.5, dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(B, N, C))


class _SMPDWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)


class _SMPMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.dwconv, self.fc2 = nn.Linear(dim, hidden), _SMPDWConv(hidden), nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), H, W)))


class _SMPBlock(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.norm1, self.attn = _SMPLayerNorm(dim, eps=1e-6), _SMPAttention(dim, heads, sr)
        self.norm2, self.mlp = _SMPLayerNorm(dim, eps=1e-6), _SMPMlp(dim, 4 * dim)

    def forward(self, x):  # (B, C, H, W) in and out, as smp's Block
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t), H, W)
        t = t + self.mlp(self.norm2(t), H, W)
        return t.transpose(1, 2).reshape(B, C, H, W)


class _SMPPatchEmbed(nn.Module):
    def __init__(self, cin, dim, k, s):
        super().__init__()
        self.proj, self.norm = nn.Conv2d(cin, dim, k, s, k // 2), _SMPLayerNorm(dim)  # eps 1e-5

    def forward(self, x):
        return self.norm(self.proj(x))


class SMPMiTEncoder(nn.Module):
    """smp's ``MixVisionTransformerEncoder``: [input, an empty 1/2 map, stage 1…4] as its features."""

    def __init__(self, dims, depths, heads=(1, 2, 5, 8), srs=(8, 4, 2, 1)):
        super().__init__()
        cin = 3
        for i in range(4):
            k, s = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}", _SMPPatchEmbed(cin, dims[i], k, s))
            setattr(self, f"block{i + 1}", nn.Sequential(*[_SMPBlock(dims[i], heads[i], srs[i]) for _ in range(depths[i])]))
            setattr(self, f"norm{i + 1}", _SMPLayerNorm(dims[i], eps=1e-6))
            cin = dims[i]

    def forward(self, x):
        B, _, H, W = x.shape
        feats = [x, x.new_empty(B, 0, H // 2, W // 2)]
        for i in range(1, 5):
            x = getattr(self, f"norm{i}")(getattr(self, f"block{i}")(getattr(self, f"patch_embed{i}")(x)))
            feats.append(x)
        return feats


class _SMPMLP(nn.Module):
    def __init__(self, cin, dim):
        super().__init__()
        self.linear = nn.Linear(cin, dim)

    def forward(self, x):
        B, _, H, W = x.shape
        return self.linear(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, -1, H, W)


class SMPSegformerDecoder(nn.Module):
    def __init__(self, dims, dim):
        super().__init__()
        self.mlp_stage = nn.ModuleList(_SMPMLP(c, dim) for c in reversed(dims))
        self.fuse_stage = nn.Sequential(nn.Conv2d(4 * dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU())

    def forward(self, feats):
        size = [s // 4 for s in feats[0].shape[2:]]
        stages = feats[2:][::-1]
        outs = [F.interpolate(mlp(f), size=size, mode="bilinear", align_corners=False)
                for f, mlp in zip(stages, self.mlp_stage)]
        return self.fuse_stage(torch.cat(outs, dim=1))


class SMPSegformer(nn.Module):
    """``smp.Segformer(encoder_name="mit_b*", classes=K)``: keys encoder.*, decoder.*, segmentation_head.0."""

    def __init__(self, dims, depths, decoder_dim, classes, upsampling=4):
        super().__init__()
        self.encoder = SMPMiTEncoder(dims, depths)
        self.decoder = SMPSegformerDecoder(dims, decoder_dim)
        self.segmentation_head = nn.Sequential(
            nn.Conv2d(decoder_dim, classes, 1),
            nn.Upsample(scale_factor=upsampling, mode="bilinear", align_corners=True), nn.Identity())

    def forward(self, x):
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise RuntimeError(f"smp needs H, W divisible by 32, got {tuple(x.shape[2:])}")
        return self.segmentation_head(self.decoder(self.encoder(x)))
