"""SETR: a plain ViT encoder with the Naive, PUP or MLA decoder.

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers", CVPR 2021 (arXiv:2012.15840).

The reference path (``fused=False``) computes what mmsegmentation's SETR computes, op for op
(``mmseg/models/backbones/vit.py``, ``decode_heads/setr_up_head.py``, ``decode_heads/
setr_mla_head.py``, ``necks/mla_neck.py``, ``decode_heads/fcn_head.py`` and the configs
``configs/_base_/models/setr_{naive,pup,mla}.py``):

- encoder: 16×16 patch conv (bottom/right zero padding of inputs that are not multiples of 16,
  as mmseg's ``PatchEmbed(padding='corner')``), cls token, learned position embedding for the
  ``img_size/16`` grid (+1 for the cls token), bilinearly resized for other grids, dropout
  0.1 after it, pre-norm blocks (LayerNorm eps 1e-6, qkv with bias, exact GELU, dropout 0.1 after
  the attention projection, after GELU and after fc2), no final norm (``final_norm=False``).
  The features at ``out_indices`` are the raw block outputs; each head LayerNorms its own input,
  as mmseg's heads and MLA neck do. MLA configs run the encoder without the cls token
  (``with_cls_token=False``: it is added with its position embedding and dropped before the
  first block).
- Naive: LN → 1×1 conv + BN + ReLU → ×4 bilinear → 1×1 classifier: logits at 1/4 of the
  (padded) input. Auxiliary heads: the same on out_indices[0..2].
- PUP: LN → 4 × (3×3 conv + BN + ReLU → ×2 bilinear) → 1×1 classifier: full resolution.
  Auxiliary heads: LN → 3×3 conv + BN + ReLU → ×4 → classifier, on out_indices[0..2].
- MLA: neck (per input LN, 1×1 conv + BN + ReLU, top-down running sum, 3×3 conv + BN + ReLU),
  head (per input 2 × (3×3 conv + BN + ReLU) → ×4 bilinear, concat, 1×1 classifier): logits at
  1/4. Auxiliary heads: a 1×1 classifier on each neck output (1/16).
  All bilinear resizes use align_corners=False; auxiliary losses are weighted 0.4.

mmseg's ``EncoderDecoder`` then resizes the main logits bilinearly to the input size;
:meth:`SETR.predict` does that too.

The fused path (``fused=True``) keeps tokens in token layout through the encoder, sends the
attention through :func:`fastseg.ops.sr_attention` on strided views of the qkv projection, and
runs the heads on channels-last maps with BatchNorm folded into the convs in eval (folded once
per weight version), classifying before the last upsample (a 1×1 conv commutes with bilinear
resizing, whose weights sum to 1). Same parameters either way.

Parameter names::

    encoder.patch_embed.proj, encoder.cls_token, encoder.pos_embed
    encoder.blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}
    decoder.{norm, convs.{j}.{conv,bn}, classifier}                  (naive / pup)
    neck.{norms.{i}, proj.{i}.{conv,bn}, extract.{i}.{conv,bn}}      (mla)
    decoder.{branches.{i}.{0,1}.{conv,bn}, classifier}               (mla)
    aux_heads.{k}.…   (as decoder for naive / pup; ``classifier`` only for mla)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastseg import cpu_allocator, ops
from fastseg.models.segformer import DropPath, FusedSwitch, check_image_batch, folded_weights

# name: (embed dim, depth, heads). Head dim 64 throughout.
ENCODERS: dict[str, tuple[int, int, int]] = {
    "vit_small_patch16": (384, 12, 6),
    "vit_base_patch16": (768, 12, 12),
    "vit_large_patch16": (1024, 24, 16),
}
DECODERS = ("naive", "pup", "mla")

# The official SETR configs (ViT-L, 24 layers) and, for 12 layers, the indices of the SETR
# DeiT-B configs; other depths take the quarter points.
OUT_INDICES: dict[tuple[int, str], tuple[int, ...]] = {
    (24, "naive"): (9, 14, 19, 23),
    (24, "pup"): (9, 14, 19, 23),
    (24, "mla"): (5, 11, 17, 23),
    (12, "naive"): (4, 7, 9, 11),
    (12, "pup"): (4, 7, 9, 11),
    (12, "mla"): (2, 5, 8, 11),
}

# Head settings of configs/_base_/models/setr_{naive,pup,mla}.py.
HEAD_PRESETS: dict[str, dict] = {
    "naive": dict(head_num_convs=1, head_up_scale=4, head_kernel_size=1,
                  aux_in_index=(0, 1, 2), aux_num_convs=1, aux_up_scale=4, aux_kernel_size=1),
    "pup": dict(head_num_convs=4, head_up_scale=2, head_kernel_size=3,
                aux_in_index=(0, 1, 2), aux_num_convs=1, aux_up_scale=4, aux_kernel_size=3),
    "mla": dict(head_num_convs=2, head_up_scale=4, head_kernel_size=3,
                aux_in_index=(0, 1, 2, 3), aux_num_convs=0, aux_up_scale=1, aux_kernel_size=1),
}


def default_out_indices(depth: int, decoder: str) -> tuple[int, ...]:
    if (depth, decoder) in OUT_INDICES:
        return OUT_INDICES[(depth, decoder)]
    return tuple(depth * (i + 1) // 4 - 1 for i in range(4))


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(t) for t in v)
    if len(v) != 2:
        raise ValueError(f"img_size must be an int or (H, W), got {v}")
    return v


@dataclass(frozen=True)
class SETRConfig:
    """Everything that fixes a SETR's architecture (not its weights).

    Fields left ``None`` take the value of the decoder's official config (see HEAD_PRESETS,
    :func:`default_out_indices`; ``with_cls_token`` is False for MLA only).
    """

    num_classes: int = 150
    decoder: str = "pup"
    encoder: str | None = "vit_large_patch16"
    img_size: tuple[int, int] = (512, 512)
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: int = 4
    out_indices: tuple[int, ...] | None = None
    with_cls_token: bool | None = None
    norm_eps: float = 1e-6
    drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    head_channels: int = 256
    head_num_convs: int | None = None
    head_up_scale: int | None = None
    head_kernel_size: int | None = None
    neck_channels: int = 256
    mla_channels: int = 128
    aux_in_index: tuple[int, ...] | None = None
    aux_channels: int = 256
    aux_num_convs: int | None = None
    aux_up_scale: int | None = None
    aux_kernel_size: int | None = None
    aux_loss_weight: float = 0.4
    patch_bias: bool = True  # mmseg 1.x's VisionTransformer defaults to patch_bias=False

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown SETR decoder {self.decoder!r}; choose one of {list(DECODERS)}")
        if self.encoder is not None and self.encoder not in ENCODERS:
            raise ValueError(f"unknown SETR encoder {self.encoder!r}; choose one of {list(ENCODERS)} "
                             "(or encoder=None with a custom embed_dim/depth/num_heads)")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("img_size", _pair(self.img_size))
        for key, value in HEAD_PRESETS[self.decoder].items():
            if getattr(self, key) is None:
                set_(key, value)
        if self.out_indices is None:
            set_("out_indices", default_out_indices(self.depth, self.decoder))
        set_("out_indices", tuple(int(i) for i in self.out_indices))
        set_("aux_in_index", tuple(int(i) for i in self.aux_in_index))
        if self.with_cls_token is None:
            set_("with_cls_token", self.decoder != "mla")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (len(self.out_indices) != 4 or not all(0 <= i < self.depth for i in self.out_indices)
                or list(self.out_indices) != sorted(set(self.out_indices))):
            raise ValueError(f"out_indices must be 4 increasing block indices in [0, {self.depth}), "
                             f"got {self.out_indices}")
        if any(not 0 <= k < 4 for k in self.aux_in_index):
            raise ValueError(f"aux_in_index must index the 4 out_indices features, got {self.aux_in_index}")
        if min(self.img_size) < self.patch_size:
            raise ValueError(f"img_size {self.img_size} is smaller than one {self.patch_size}x{self.patch_size} patch")
        if self.head_num_convs < 1 or self.head_kernel_size not in (1, 3) or self.aux_kernel_size not in (1, 3):
            raise ValueError("SETR up heads need num_convs >= 1 and kernel_size 1 or 3 "
                             f"(got {self.head_num_convs}, {self.head_kernel_size}, aux {self.aux_kernel_size})")

    @classmethod
    def create(cls, encoder: str = "vit_large_patch16", decoder: str = "pup", **overrides) -> "SETRConfig":
        """The config of a named encoder (see ENCODERS) with a decoder, as the official configs."""
        if encoder not in ENCODERS:
            raise ValueError(f"unknown SETR encoder {encoder!r}; choose one of {list(ENCODERS)}")
        if decoder not in DECODERS:
            raise ValueError(f"unknown SETR decoder {decoder!r}; choose one of {list(DECODERS)}")
        dim, depth, heads = ENCODERS[encoder]
        base = dict(encoder=encoder, decoder=decoder, embed_dim=dim, depth=depth, num_heads=heads)
        base.update(overrides)
        return cls(**base)

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid the position embedding is stored for."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    def replace(self, **changes) -> "SETRConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("img_size", "out_indices", "aux_in_index"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SETRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SETR config fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("img_size", "out_indices", "aux_in_index"):
            if d.get(key) is not None:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d)


# --- shared pieces ----------------------------------------------------------------------------

def upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """mmseg's ``Upsample(scale_factor=s, mode='bilinear', align_corners=False)`` (by size)."""
    if scale == 1:
        return x
    return F.interpolate(x, size=(x.shape[2] * scale, x.shape[3] * scale), mode="bilinear", align_corners=False)


def resize_pos_embed(pos_embed: torch.Tensor, src_grid, dst_grid) -> torch.Tensor:
    """(1, 1 + h·w, C) for the ``src_grid`` → (1, 1 + h'·w', C) for ``dst_grid``: the cls entry
    kept, the grid part resized bilinearly (align_corners=False), as mmseg's ``resize_pos_embed``
    with the SETR configs' ``interpolate_mode='bilinear'``."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    h, w = src_grid
    C = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, h, w, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BN folded into the preceding bias-free conv: (weight, bias), computed in fp32 (bf16
    running statistics would lose the fold's precision) and cast to the conv's dtype."""
    dtype = conv.weight.dtype
    scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
    weight = conv.weight.float() * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias.float() - bn.running_mean.float() * scale
    return weight.to(dtype), bias.to(dtype)


class ConvBNReLU(nn.Module):
    """mmcv's ``ConvModule``: conv (no bias) → BN → ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

    def fused_forward(self, x: torch.Tensor, folded) -> torch.Tensor:
        """x: channels-last (B, C, H, W). ``folded`` = (weight, bias) in eval, None in training."""
        if folded is None:
            return F.relu(self.bn(self.conv(x)))
        return torch.relu_(F.conv2d(x, folded[0], folded[1], padding=self.conv.padding))


# --- encoder -----------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """16×16 stride-16 conv → tokens (B, N, C), after zero padding H, W up to multiples of 16
    at the bottom/right (mmseg ``AdaptivePadding(padding='corner')``)."""

    def __init__(self, in_channels: int, dim: int, patch: int, bias: bool = True):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, patch, patch, bias=bias)
        self.fused = False

    def forward(self, x: torch.Tensor):
        p = self.patch
        B, C, H, W = x.shape
        ph, pw = -H % p, -W % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        h, w = (H + ph) // p, (W + pw) // p
        if not self.fused:
            return ops.conv2d(x, self.proj.weight, self.proj.bias, p).flatten(2).transpose(1, 2), (h, w)
        # A stride-p p×p conv is a GEMM over non-overlapping patches: one reorder of the (small,
        # 3-channel) image, then the tokens come out of the GEMM already in token layout.
        patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias), (h, w)


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (q, k, v = thirds of its output)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) → (B, N, C)."""
        C = x.shape[-1]
        t = self.qkv(x)  # (B, N, 3C); q, kv are strided views of it, never copied
        fn = ops.sr_attention if self.fused else ops.sr_attention_reference
        return self.proj_drop(self.proj(fn(t[..., :C], t[..., C:], self.num_heads, self.scale)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop, drop_path, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * mlp_ratio, drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTEncoder(nn.Module):
    """mmseg's ``VisionTransformer`` as the SETR configs build it; returns the raw block outputs
    at ``out_indices`` as (B, C, ceil(H/16), ceil(W/16)) maps."""

    def __init__(self, cfg: SETRConfig):
        super().__init__()
        C = cfg.embed_dim
        self.grid = cfg.grid
        self.with_cls_token = cfg.with_cls_token
        self.out_indices = tuple(cfg.out_indices)
        self.patch_embed = PatchEmbed(cfg.in_channels, C, cfg.patch_size, cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], C))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.drop_rate, rates[i], cfg.norm_eps) for i in range(cfg.depth)
        )
        self.fused = False

    def pos_embed_for(self, grid) -> torch.Tensor:
        """The position embedding (1, 1 + h·w, C) for a ``grid`` = (h, w) of tokens."""
        return resize_pos_embed(self.pos_embed, self.grid, grid)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B = x.shape[0]
        tokens, (h, w) = self.patch_embed(x)
        pos = self.pos_embed_for((h, w))
        if self.fused:
            body = tokens + pos[:, 1:]
            if self.with_cls_token:
                body = torch.cat([(self.cls_token + pos[:, :1]).expand(B, -1, -1), body], dim=1)
            x = self.pos_drop(body)
        else:
            x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
            x = self.pos_drop(x + pos)
            if not self.with_cls_token:
                x = x[:, 1:]
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_indices:
                out = x[:, 1:] if self.with_cls_token else x
                out = out.reshape(B, h, w, -1).permute(0, 3, 1, 2)
                # Fused: a channels-last view of the tokens, no copy; reference: as mmseg.
                feats.append(out if self.fused else out.contiguous())
        return feats


# --- heads ---------------------------------------------------------------------------------------

class UpHead(nn.Module):
    """mmseg's ``SETRUPHead`` (Naive and PUP heads and their auxiliary heads).

    LayerNorm over channels, ``num_convs`` × (k×k conv + BN + ReLU → ×``up_scale`` bilinear),
    1×1 classifier. (B, C, h, w) → (B, K, h·s^n, w·s^n).
    """

    def __init__(self, in_dim, channels, num_classes, num_convs, up_scale, kernel_size, eps):
        super().__init__()
        self.up_scale = up_scale
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.convs = nn.ModuleList(
            ConvBNReLU(in_dim if j == 0 else channels, channels, kernel_size) for j in range(num_convs)
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.fused_forward(x)
        n, c, h, w = x.shape
        x = self.norm(x.reshape(n, c, h * w).transpose(2, 1)).transpose(1, 2).reshape(n, c, h, w)
        for conv in self.convs:
            x = upsample(conv(x), self.up_scale)
        return self.classifier(x)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = None if self.training else folded_weights(
            self, lambda: [fold_conv_bn(m.conv, m.bn) for m in self.convs])
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                         self.norm.eps).permute(0, 3, 1, 2)  # channels-last (B, C, h, w)
        last = len(self.convs) - 1
        for j, conv in enumerate(self.convs):
            y = conv.fused_forward(y, None if folded is None else folded[j])
            if j < last:
                y = upsample(y, self.up_scale)
        # The 1×1 classifier commutes with the last bilinear upsample: classify K channels at
        # the lower resolution, then upsample the logits.
        logits = F.linear(y.permute(0, 2, 3, 1), self.classifier.weight.flatten(1), self.classifier.bias)
        return upsample(logits.permute(0, 3, 1, 2), self.up_scale)


class MLANeck(nn.Module):
    """mmseg's ``MLANeck``: per input LayerNorm and 1×1 conv + BN + ReLU; a top-down running sum
    starting from the deepest input; a 3×3 conv + BN + ReLU on each sum.

    Output k is ``extract[k](p₃ + … + p₃₋ₖ)``: output 0 sees the deepest feature only.
    """

    def __init__(self, in_dim: int, channels: int, eps: float, num_inputs: int = 4):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(in_dim, eps=eps) for _ in range(num_inputs))
        self.proj = nn.ModuleList(ConvBNReLU(in_dim, channels, 1) for _ in range(num_inputs))
        self.extract = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in range(num_inputs))
        self.fused = False

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.fused:
            return self.fused_forward(feats)
        normed = []
        for x, norm in zip(feats, self.norms):
            n, c, h, w = x.shape
            x = norm(x.reshape(n, c, h * w).transpose(2, 1).contiguous())
            normed.append(x.transpose(1, 2).reshape(n, c, h, w).contiguous())
        projected = [conv(x) for x, conv in zip(normed, self.proj)]
        mids = []
        for p in projected[::-1]:
            mids.append(p if not mids else mids[-1] + p)
        return [conv(m) for m, conv in zip(mids, self.extract)]

    def fused_forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        folded = None if self.training else folded_weights(self, lambda: (
            [fold_conv_bn(m.conv, m.bn) for m in self.proj], [fold_conv_bn(m.conv, m.bn) for m in self.extract]))
        projected = []
        for i, (x, norm, proj) in enumerate(zip(feats, self.norms, self.proj)):
            t = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            if folded is None:  # training: BN batch statistics on the conv output, as eager
                y = F.linear(t, proj.conv.weight.flatten(1)).permute(0, 3, 1, 2)
                y = F.relu(proj.bn(y))
            else:  # 1×1 conv with BN folded = a Linear on tokens
                W, b = folded[0][i]
                y = torch.relu_(F.linear(t, W.flatten(1), b)).permute(0, 3, 1, 2)
            projected.append(y)
        mids = []
        for p in projected[::-1]:
            mids.append(p if not mids else mids[-1] + p)
        return [conv.fused_forward(m, None if folded is None else folded[1][k])
                for k, (m, conv) in enumerate(zip(mids, self.extract))]


class MLAHead(nn.Module):
    """mmseg's ``SETRMLAHead``: per input 2 × (3×3 conv + BN + ReLU) → ×4 bilinear; concat;
    1×1 classifier."""

    def __init__(self, in_dim: int, channels: int, num_classes: int, up_scale: int = 4, num_inputs: int = 4):
        super().__init__()
        self.up_scale = up_scale
        self.branches = nn.ModuleList(
            nn.Sequential(ConvBNReLU(in_dim, channels, 3), ConvBNReLU(channels, channels, 3)) for _ in range(num_inputs)
        )
        self.classifier = nn.Conv2d(num_inputs * channels, num_classes, 1)
        self.fused = False

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.fused:
            return self.fused_forward(feats)
        outs = [upsample(branch(x), self.up_scale) for x, branch in zip(feats, self.branches)]
        return self.classifier(torch.cat(outs, dim=1))

    def fused_forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        folded = None if self.training else folded_weights(
            self, lambda: [[fold_conv_bn(m.conv, m.bn) for m in branch] for branch in self.branches])
        outs = []
        for i, (x, branch) in enumerate(zip(feats, self.branches)):
            for j, conv in enumerate(branch):
                x = conv.fused_forward(x, None if folded is None else folded[i][j])
            outs.append(x.permute(0, 2, 3, 1))
        # All branches share one resolution, so classify(concat(up(bᵢ))) = up(classify(concat(bᵢ))):
        # one K-channel upsample instead of four 128-channel ones and a full-resolution GEMM.
        logits = F.linear(torch.cat(outs, dim=-1), self.classifier.weight.flatten(1), self.classifier.bias)
        return upsample(logits.permute(0, 3, 1, 2), self.up_scale)


class AuxClassifier(nn.Module):
    """mmseg's ``FCNHead(num_convs=0, concat_input=False)``: a 1×1 classifier only (MLA's aux heads)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(in_dim, num_classes, 1)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.classifier(x)
        y = F.linear(x.permute(0, 2, 3, 1), self.classifier.weight.flatten(1), self.classifier.bias)
        return y.permute(0, 3, 1, 2)


# --- initialisation ---------------------------------------------------------------------------------

def init_weights(model: "SETR") -> None:
    """As mmseg: ``VisionTransformer.init_weights`` (trunc-normal 0.02 for the position
    embedding, the cls token and Linears, bias 0 except the FFN's normal(1e-6), kaiming fan_in
    for the patch conv, LayerNorm 1/0; nn.MultiheadAttention's own xavier-uniform in_proj with zero
    bias), mmcv ``ConvModule`` (kaiming-normal fan_out for ReLU, BN 1/0), classifiers normal(0.01)."""
    enc = model.encoder
    nn.init.trunc_normal_(enc.pos_embed, std=0.02)
    nn.init.trunc_normal_(enc.cls_token, std=0.02)
    for name, m in enc.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("attn.qkv"):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
                continue
            nn.init.trunc_normal_(m.weight, std=0.02)
            if name.split(".")[-2] == "mlp":
                nn.init.normal_(m.bias, std=1e-6)
            else:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for head in model.heads():
        init_head(head)


def init_head(head: nn.Module) -> None:
    for m in head.modules():
        if isinstance(m, ConvBNReLU):
            nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
            m.bn.reset_parameters()
            m.bn.reset_running_stats()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    init_classifier(head)


def init_classifier(head: nn.Module) -> None:
    if hasattr(head, "classifier"):
        nn.init.normal_(head.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(head.classifier.bias)


# --- input checks ----------------------------------------------------------------------------------

def check_images(x, model: "SETR") -> None:
    """Reject input the model cannot take, naming the problem (never a deep kernel error).
    Any H, W >= 1 works: sizes that are not multiples of 16 are corner-padded."""
    check_image_batch(x, model)
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"empty images: got shape {tuple(x.shape)}")


# --- the model ------------------------------------------------------------------------------------------

class SETR(FusedSwitch, nn.Module):
    """SETR (ViT encoder + Naive / PUP / MLA decoder) for semantic segmentation.

    Args:
        encoder: one of ENCODERS ("vit_large_patch16", "vit_base_patch16", "vit_small_patch16");
            ignored when ``config`` is given.
        decoder: "naive", "pup" or "mla".
        num_classes: number of output classes.
        img_size: the training size (int or (H, W)); fixes the position-embedding grid
            (img_size/16). Other input sizes interpolate it.
        fused: run the hot spots through fastseg's fused ops (same weights either way).
        config: a full :class:`SETRConfig` (custom sizes, e.g. a small ViT for tests).

    ``model(x)``, x: (B, 3, H, W), any H, W (padded at the bottom/right to multiples of 16, as
    mmseg's patch embedding does; h, w = ceil(H/16), ceil(W/16)) returns the main head's logits
    at the resolution it produces: PUP (B, K, 16h, 16w), Naive and MLA (B, K, 4h, 4w). In
    training mode it returns ``(main_logits, [aux_logits, …])``; weight the auxiliary losses with
    :attr:`aux_weights` (0.4 each). :meth:`predict` resizes the main logits to (H, W) as mmseg's
    ``EncoderDecoder`` does.
    """

    def __init__(self, encoder: str = "vit_large_patch16", decoder: str = "pup", num_classes: int = 150,
                 img_size=512, fused: bool = False, config: SETRConfig | None = None):
        super().__init__()
        if config is None:
            config = SETRConfig.create(encoder, decoder, num_classes=num_classes, img_size=img_size)
        self.config = config
        c = config
        self.encoder = ViTEncoder(c)
        if c.decoder == "mla":
            self.neck = MLANeck(c.embed_dim, c.neck_channels, c.norm_eps)
            self.decoder = MLAHead(c.neck_channels, c.mla_channels, c.num_classes, c.head_up_scale)
            self.aux_heads = nn.ModuleList(AuxClassifier(c.neck_channels, c.num_classes) for _ in c.aux_in_index)
        else:
            self.neck = None
            self.decoder = UpHead(c.embed_dim, c.head_channels, c.num_classes, c.head_num_convs, c.head_up_scale,
                                  c.head_kernel_size, c.norm_eps)
            self.aux_heads = nn.ModuleList(
                UpHead(c.embed_dim, c.aux_channels, c.num_classes, c.aux_num_convs, c.aux_up_scale,
                       c.aux_kernel_size, c.norm_eps) for _ in c.aux_in_index
            )
        init_weights(self)
        # Set by from_pretrained: what was loaded, from which format, and what was initialised.
        self.load_report = None
        self.set_fused(fused)

    def heads(self) -> list[nn.Module]:
        """Neck (MLA), main head and auxiliary heads."""
        return ([self.neck] if self.neck is not None else []) + [self.decoder, *self.aux_heads]

    # -- running -----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) → the raw block outputs at ``out_indices``: 4 × (B, C, ceil(H/16), ceil(W/16))."""
        check_images(x, self)
        if self.fused and x.device.type == "cpu" and not torch.compiler.is_compiling():
            cpu_allocator.ensure()  # once per process: large activations reuse freed memory
        return self.encoder(x)

    def forward(self, x: torch.Tensor):
        """Eval: main logits. Training: (main logits, [auxiliary logits])."""
        feats = self.forward_features(x)
        if self.neck is not None:
            feats = self.neck(feats)
            main = self.decoder(feats)
        else:
            main = self.decoder(feats[-1])
        if not self.training:
            return main
        return main, [head(feats[k]) for head, k in zip(self.aux_heads, self.config.aux_in_index)]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Main logits resized (bilinear, align_corners=False) to the input's H×W, as mmseg's
        ``EncoderDecoder.encode_decode``: (B, K, H, W). Runs without autograd."""
        out = self(x)
        main = out[0] if isinstance(out, tuple) else out
        return F.interpolate(main, size=x.shape[2:], mode="bilinear", align_corners=False)

    @property
    def aux_weights(self) -> tuple[float, ...]:
        """Loss weight of each auxiliary head (0.4 in the official configs)."""
        return tuple(self.config.aux_loss_weight for _ in self.aux_heads)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    # -- fused / reference (set_fused from FusedSwitch) ------------------------------------------
    def backends(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> dict:
        """For each fused op SETR uses, the :class:`fastseg.ops.dispatch.Choice` it would use now."""
        from fastseg.ops import dispatch

        param = self.encoder.pos_embed
        dtype = dtype or param.dtype
        device = torch.device(device) if device is not None else param.device
        if not self._fused:
            off = {"fused": ["model.fused is False"]}
            return {"sr_attention": dispatch.Choice("sr_attention", dispatch.REFERENCE, off),
                    "setr_heads": dispatch.Choice("setr_heads", dispatch.REFERENCE, off)}
        head_dim = self.config.embed_dim // self.config.num_heads
        return {
            "sr_attention": dispatch.choose("sr_attention", device=device, dtype=dtype, head_dim=head_dim),
            "setr_heads": dispatch.Choice("setr_heads", "torch", {
                "triton": ["no kernel for the SETR heads: stock ops on channels-last maps, BN folded in eval"]}),
        }

    # -- checkpoints -------------------------------------------------------------------------
    # What fastseg.checkpoints needs to know about this architecture (it never imports the models).
    checkpoint_family = "setr"
    config_class = SETRConfig
    encoders = ENCODERS
    decoders = DECODERS
    resize_pos_embed = staticmethod(resize_pos_embed)

    @classmethod
    def from_pretrained(cls, source, num_classes: int | None = None, *, decoder: str | None = None,
                        img_size=None, num_heads: int | None = None, out_indices=None, fused: bool = False,
                        strict: bool = True) -> "SETR":
        """Load mmseg SETR checkpoints (with or without the patch-embedding bias), timm / mmseg ImageNet
        ViT encoders or fastseg saves; see :mod:`fastseg.checkpoints`."""
        from fastseg import checkpoints

        return checkpoints.load_pretrained(cls, source, num_classes=num_classes, decoder=decoder, img_size=img_size,
                                           num_heads=num_heads, out_indices=out_indices, fused=fused, strict=strict)

    def save_pretrained(self, path, format: str = "fastseg", *, overwrite: bool = True):
        """Write the weights atomically as "fastseg" (directory or ``.safetensors``), "mmseg" (``.pth``) or
        "timm" (the ViT encoder only, ``.pth`` / ``.safetensors``)."""
        from fastseg import checkpoints

        return checkpoints.save_pretrained(self, path, format, overwrite=overwrite)

