"""SegFormer: MiT encoder + All-MLP decoder.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021 (arXiv:2105.15203).

The reference path (``fused=False``) computes exactly what the official NVlabs code computes,
op for op; the fused path (``fused=True``) sends the hot spots through :mod:`fastseg.ops`, whose
dispatcher picks a kernel backend. Both paths use the same parameters.

Parameter names follow the official code (``patch_embed``, ``attn.q``/``attn.kv``, ``mlp.fc1``,
``linear_c``, ``linear_fuse``) inside a stage-by-stage layout:

    encoder.stages.{i}.patch_embed.{proj,norm}
    encoder.stages.{i}.blocks.{j}.{norm1, attn.{q,kv,sr,norm,proj}, norm2, mlp.{fc1,dwconv,fc2}}
    encoder.stages.{i}.norm
    decoder.…   (see AllMLPDecoder and MMSegDecoder)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastseg import checkpoints, cpu_allocator, ops
from fastseg.models.config import VARIANTS, SegFormerConfig
from fastseg.ops.packed_linear import choice as packed_choice, linear as packed_linear, state_key

# The stage-1 spatial-reduction conv has an 8×8 kernel over the 1/4-resolution map.
MIN_IMAGE_SIZE = 32


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval or at rate 0), as timm's DropPath."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv (k7 s4 p3 or k3 s2 p1) → tokens (B, N, C) → LayerNorm."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int, eps: float):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fused = False

    def forward(self, x: torch.Tensor):
        """x: (B, Cin, H, W) → tokens (B, Ho·Wo, C), Ho, Wo."""
        fn = ops.overlap_patch_embed if self.fused else ops.overlap_patch_embed_reference
        return fn(x, self.proj.weight, self.proj.bias, self.stride, self.norm.weight, self.norm.bias, self.norm.eps)


class SRAttention(nn.Module):
    """Efficient self-attention: keys/values from a spatially reduced (sr×sr conv) map."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, sr_eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=sr_eps)
        self.fused = False

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sr×sr conv, (B, C, H, W) → (B, C, H/sr, W/sr), guarded against oneDNN's bf16 bug."""
        return ops.conv2d(x, self.sr.weight, self.sr.bias, self.sr_ratio)

    def forward(self, x: torch.Tensor, H: int, W: int, proj_bias: bool = True) -> torch.Tensor:
        """x: (B, N, C) tokens of an H×W map → (B, N, C). ``proj_bias=False`` (fused path): the
        output projection without its bias, which the fused Block adds in ``add_layer_norm``."""
        B, N, C = x.shape
        if not self.fused:
            q = self.q(x)
            if self.sr_ratio > 1:
                x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
                x_ = self._reduce(x_).reshape(B, C, -1).permute(0, 2, 1)
                x = self.norm(x_)
            return self.proj(ops.sr_attention_reference(q, self.kv(x), self.num_heads, self.scale))
        # Every linear of the fused path: oneDNN with packed weights for CPU inference, else aten.
        q = packed_linear(x, self.q.weight, self.q.bias)
        if self.sr_ratio > 1:
            # Tokens are a channels-last image: view them as NCHW without a copy; the conv keeps
            # channels-last, so its output flattens back to tokens as a view too.
            x_ = self._reduce(x.reshape(B, H, W, C).permute(0, 3, 1, 2))
            x = self.norm(x_.flatten(2).transpose(1, 2))
        out = ops.sr_attention(q, packed_linear(x, self.kv.weight, self.kv.bias), self.num_heads, self.scale)
        return packed_linear(out, self.proj.weight, self.proj.bias if proj_bias else None)


class MixFFN(nn.Module):
    """fc1 → depthwise 3×3 conv → GELU → fc2 (the conv supplies positional information)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.fused = False

    def hidden(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The reference fc1 → depthwise 3×3 → GELU: (B, N, C) → (B, N, 4C). The fused path runs the
        whole block through ``ops.mix_ffn`` (:meth:`fused_forward`) instead."""
        return ops.dwconv3x3_gelu_reference(self.fc1(x), H, W, self.dwconv.weight, self.dwconv.bias)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if self.fused:
            return self.fused_forward(x, H, W, self.fc2.bias)
        return self.fc2(self.hidden(x, H, W))

    def forward_pre_bias(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``forward`` without fc2's bias (the fused Block adds it in ``add_layer_norm``): (B, N, C)."""
        if self.fused:
            return self.fused_forward(x, H, W, None)
        return F.linear(self.hidden(x, H, W), self.fc2.weight)

    def fused_forward(self, x: torch.Tensor, H: int, W: int, fc2_bias: torch.Tensor | None) -> torch.Tensor:
        """``ops.mix_ffn``: on CPU inference the C++ kernel in row tiles (the 4C hidden tensor stays in
        L2), elsewhere fc1 → ``ops.dwconv3x3_gelu`` → fc2 as :meth:`hidden` does."""
        return ops.mix_ffn(x, H, W, self.fc1.weight, self.fc1.bias, self.dwconv.weight, self.dwconv.bias,
                           self.fc2.weight, fc2_bias)


class Block(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio, mlp_ratio, drop_path, eps: float, sr_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SRAttention(dim, num_heads, sr_ratio, sr_eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W))
        return x

    def forward_fused(self, x, y, H, W, next_norm: nn.LayerNorm, last: bool):
        """The fused path: x (B, N, C) the residual stream, y = norm1(x) (computed by the previous
        block's add_layer_norm, or by the stage) → (x', next_norm(x')), with each residual add,
        GEMM bias and following LayerNorm in one ``ops.add_layer_norm``: after the attention it
        computes norm2, after the Mix-FFN ``next_norm`` (the next block's norm1, or the stage's
        norm when ``last``). With DropPath active (training, p > 0) the branch is the eager expression, bias
        included, dropped before the add, so the random mask applies exactly as in eager."""
        drop = self.drop_path.training and self.drop_path.p > 0
        # Under autocast every consumer of the block norms' output (q/kv/fc1 linears, the sr
        # conv) casts it to the autocast dtype anyway: produce it in that dtype directly.
        mid = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if drop:
            x, y = ops.add_layer_norm(x, self.drop_path(self.attn(y, H, W)), None, self.norm2.weight,
                                      self.norm2.bias, self.norm2.eps, mid)
        else:
            x, y = ops.add_layer_norm(x, self.attn(y, H, W, proj_bias=False), self.attn.proj.bias, self.norm2.weight,
                                      self.norm2.bias, self.norm2.eps, mid, reuse_h=True)
        # The stage's norm feeds the decoder and the next patch embedding: keep eager's dtype there.
        out = None if last else mid
        if drop:
            return ops.add_layer_norm(x, self.drop_path(self.mlp(y, H, W)), None, next_norm.weight, next_norm.bias,
                                      next_norm.eps, out)
        return ops.add_layer_norm(x, self.mlp.forward_pre_bias(y, H, W), self.mlp.fc2.bias, next_norm.weight,
                                  next_norm.bias, next_norm.eps, out, reuse_h=True)


class Stage(nn.Module):
    def __init__(self, in_channels, dim, depth, num_heads, sr_ratio, mlp_ratio, kernel, stride, drop_paths, eps):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, kernel, stride, eps.patch_embed)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, sr_ratio, mlp_ratio, drop_paths[j], eps.block, eps.sr) for j in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps.stage)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, Cin, H, W) → (B, C, H', W')."""
        B = x.shape[0]
        x, H, W = self.patch_embed(x)
        if self.fused and len(self.blocks):
            # (residual, its next LayerNorm) flow from block to block; each add_layer_norm also
            # computes the LayerNorm that follows it, the last one the stage's norm.
            y = self.blocks[0].norm1(x)
            for j, block in enumerate(self.blocks):
                last = j + 1 == len(self.blocks)
                x, y = block.forward_fused(x, y, H, W, self.norm if last else self.blocks[j + 1].norm1, last)
            x = y
        else:
            for block in self.blocks:
                x = block(x, H, W)
            x = self.norm(x)
        x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2)
        # The fused path keeps tokens: the feature map is their channels-last view, not a copy.
        return x if self.patch_embed.fused else x.contiguous()


class MiTEncoder(nn.Module):
    """Mix Transformer: four stages at strides 4, 8, 16, 32."""

    def __init__(self, cfg: SegFormerConfig):
        super().__init__()
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, start, in_ch = [], 0, cfg.in_channels
        for i, (dim, depth) in enumerate(zip(cfg.embed_dims, cfg.depths)):
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            stages.append(
                Stage(in_ch, dim, depth, cfg.num_heads[i], cfg.sr_ratios[i], cfg.mlp_ratio, kernel, stride,
                      rates[start:start + depth], cfg.norm_eps)
            )
            start += depth
            in_ch = dim
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class AllMLPDecoder(nn.Module):
    """The NVlabs / HuggingFace All-MLP head.

    Each stage's features go through a Linear to E channels, are bilinearly upsampled
    (align_corners=False) to 1/4 resolution, concatenated in the order [c4, c3, c2, c1], fused by a
    1×1 conv (no bias) + BN + ReLU, and classified by a 1×1 conv after Dropout2d.
    """

    def __init__(self, in_dims, dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(c, dim) for c in in_dims)
        self.linear_fuse = nn.Conv2d(dim * len(in_dims), dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)
        self.fused = False

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.fused:
            Ms, b = folded_weights(self, lambda: ops.fold_mlp_head(
                self.linear_c, self.linear_fuse.weight, None if self.training else self.bn))
            cl = [f.permute(0, 2, 3, 1) for f in feats]
            # Stage 1 is already at output size: its projection joins the sum inside the op
            # (which may build it one band at a time); the others are projected here, small.
            maps = [packed_linear(f, M) for f, M in zip(cl[1:], Ms[1:])]
            return finish_fused_head(self, maps, b, feats[0].shape[2:], project=(cl[0], Ms[0]))
        B, _, H, W = feats[0].shape
        outs = []
        for f, linear in zip(feats, self.linear_c):
            h, w = f.shape[2:]
            x = linear(f.flatten(2).transpose(1, 2)).permute(0, 2, 1).reshape(B, -1, h, w)
            if (h, w) != (H, W):
                x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
            outs.append(x)
        x = self.linear_fuse(torch.cat(outs[::-1], dim=1))
        x = F.relu(self.bn(x))
        return self.classifier(self.dropout(x))


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule with a 1×1 conv: conv (no bias) → BN → ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class MMSegDecoder(nn.Module):
    """mmsegmentation-1.x's ``SegformerHead`` — a different architecture from the NVlabs head.

    Per stage a 1×1 conv + BN + ReLU (not a Linear), upsampled to 1/4 resolution and concatenated
    in the order [c1, c2, c3, c4]; then a 1×1 conv + BN + ReLU and the classifier after Dropout2d.
    """

    def __init__(self, in_dims, dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.convs = nn.ModuleList(ConvBNReLU(c, dim) for c in in_dims)
        self.fusion_conv = ConvBNReLU(dim * len(in_dims), dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)
        self.fused = False

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self.fusion_conv.bn

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.fused:
            Fs, b = folded_weights(self, lambda: ops.fold_mmseg_head(
                self.convs, self.fusion_conv.conv.weight, None if self.training else self.bn))
            maps = [packed_linear(conv(f).permute(0, 2, 3, 1), Fi) for f, conv, Fi in zip(feats, self.convs, Fs)]
            return finish_fused_head(self, maps, b, feats[0].shape[2:])
        H, W = feats[0].shape[2:]
        outs = []
        for f, conv in zip(feats, self.convs):
            x = conv(f)
            if x.shape[2:] != (H, W):
                x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
            outs.append(x)
        x = self.fusion_conv(torch.cat(outs, dim=1))
        return self.classifier(self.dropout(x))


def folded_weights(head: nn.Module, fold):
    """``fold()``, cached for inference: the fold is a few E×E×Cᵢ GEMMs that cost more than the
    whole head at small inputs. The cache is keyed on every parameter's and buffer's version
    counter (bumped by optimiser steps, ``load_state_dict`` and any in-place change) and a probe
    of its values (which catches writes through ``.data``: :func:`fastseg.ops.packed_linear.state_key`),
    so it cannot serve stale weights; with autograd on, or while compiling, it folds afresh, and so it
    does for inference tensors (weights made under ``torch.inference_mode``), which have no
    version counter. Autocast changes the fold's dtype, so its state is part of the key."""
    if head.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return fold()
    state = list(head.parameters()) + list(head.buffers())
    if any(t.is_inference() for t in state):
        return fold()
    autocast = tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))
    key = (autocast,) + tuple((id(t), t.device, state_key(t)) for t in state)
    cached = getattr(head, "_fold_cache", None)
    if cached is None or cached[0] != key:
        # Normal tensors (not inference-mode ones), so that the packed-weight cache of the
        # projections (fastseg.ops.packed_linear) can key on their version counters.
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, fold())
        head._fold_cache = cached
    return cached[1]


def finish_fused_head(head: nn.Module, maps, bias, out_hw, project=None) -> torch.Tensor:
    """Resize-and-sum the projected maps (B, hᵢ, wᵢ, E) and ``project``'s projection (see
    :func:`fastseg.ops.upsample_sum`); then BN + ReLU + classifier.

    Eval: BN is already folded into the maps and ``bias``, so ReLU and the classifier run inside
    the fused op. Training: BN needs the batch statistics of the sum, so it runs after it (the
    running statistics update exactly as in eager), then Dropout2d and the classifier.
    Returns logits (B, K, H, W) as a channels-last view.
    """
    cls = head.classifier
    if head.training:
        y = ops.upsample_sum(maps, out_hw, bias, project=project).permute(0, 3, 1, 2)
        return cls(head.dropout(F.relu(head.bn(y))))
    if torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters()):
        # Eval with autograd on (e.g. explaining a model): ReLU and classifier as stock ops after
        # the differentiable resize-sum, since the all-in-one kernel has no backward.
        y = F.relu(ops.upsample_sum(maps, out_hw, bias, project=project))
        return F.linear(y, cls.weight.flatten(1), cls.bias).permute(0, 3, 1, 2)
    logits = ops.upsample_sum(maps, out_hw, bias, relu=True, project=project,
                              classifier_weight=cls.weight.flatten(1), classifier_bias=cls.bias)
    return logits.permute(0, 3, 1, 2)


def check_image_batch(x, model: nn.Module | None = None) -> None:
    """Checks every model's images need: a floating (B, C, H, W) tensor with B > 0, the model's
    channel count, and its device and dtype. Each model adds its own size rule."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected images as a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W) (rank 4), got rank {x.ndim} with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images (float32/float16/bfloat16), got {x.dtype}")
    B, C = x.shape[:2]
    if B == 0:
        raise ValueError(f"empty batch: got images of shape {tuple(x.shape)}")
    if model is not None:
        want = model.config.in_channels
        if C != want:
            raise ValueError(f"expected {want} input channels, got {C} (images of shape {tuple(x.shape)})")
        param = next(model.parameters())
        if x.device != param.device:
            raise ValueError(f"images are on {x.device} but the model is on {param.device}; move one of them")
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"images are {x.dtype} but the model's weights are {param.dtype}; cast one of them "
                f"(e.g. model.to({x.dtype})) or run under torch.autocast"
            )


def check_images(x, model: nn.Module | None = None) -> None:
    """Reject input SegFormer cannot take, naming the problem (never a deep kernel error)."""
    check_image_batch(x, model)
    H, W = x.shape[2:]
    if H < MIN_IMAGE_SIZE or W < MIN_IMAGE_SIZE:
        raise ValueError(
            f"SegFormer needs H and W >= {MIN_IMAGE_SIZE} (its stage-1 spatial reduction is an 8x8 conv "
            f"on the 1/4-resolution map); got {H}x{W}"
        )


def init_weights(model: nn.Module, cfg: SegFormerConfig) -> None:
    """Initialise as the official code does.

    Encoder (NVlabs ``MixVisionTransformer._init_weights``, the same in mmseg-1.x): Linear
    trunc-normal(0.02) with zero bias, LayerNorm 1/0, Conv2d normal(0, sqrt(2 / fan_out)).
    Decoder: mmcv ``ConvModule`` convs get Kaiming-normal (fan_out, ReLU) with BN 1/0; the NVlabs
    head keeps PyTorch's default init for its Linears and ``linear_pred``; mmseg's ``conv_seg``
    gets normal(0, 0.01).
    """
    for m in model.encoder.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(m.bias)
    init_decoder(model.decoder)


def init_decoder(decoder: nn.Module) -> None:
    for m in decoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not decoder.classifier and m.bias is None:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
            m.reset_running_stats()
    init_classifier(decoder)


def init_classifier(decoder: nn.Module) -> None:
    if isinstance(decoder, MMSegDecoder):
        nn.init.normal_(decoder.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(decoder.classifier.bias)
    else:
        decoder.classifier.reset_parameters()


class FusedSwitch:
    """``model.fused`` / ``model.set_fused(bool)`` for a model whose submodules carry a ``fused``
    flag: one switch moves every fused op between the fused and the reference path."""

    @property
    def fused(self) -> bool:
        return self._fused

    def set_fused(self, fused: bool = True):
        """Switch every fused op between the fused path and the reference path (same weights)."""
        self._fused = bool(fused)
        for m in self.modules():
            if hasattr(m, "fused") and m is not self:
                m.fused = self._fused
        return self


class SegFormer(FusedSwitch, nn.Module):
    """SegFormer-B0…B5 for semantic segmentation.

    Args:
        variant: "b0" … "b5" (ignored when ``config`` is given).
        num_classes: number of output classes.
        fused: run the hot spots through fastseg's fused ops (same weights either way).
        decoder: "mlp" (the NVlabs / HuggingFace All-MLP head) or "mmseg" (mmsegmentation-1.x's
            ``SegformerHead``: conv + BN + ReLU branches).
        config: a full :class:`SegFormerConfig` (custom dims, LayerNorm eps of a source, …).

    ``model(x)`` takes images ``x: (B, 3, H, W)`` (H, W ≥ 32, any parity) and returns logits
    ``(B, num_classes, ceil(H/4), ceil(W/4))``.
    """

    def __init__(self, variant: str = "b0", num_classes: int = 150, fused: bool = False,
                 decoder: str = "mlp", config: SegFormerConfig | None = None):
        super().__init__()
        if config is None:
            config = SegFormerConfig.from_variant(variant, num_classes=num_classes, decoder=decoder)
        self.config = config
        self.encoder = MiTEncoder(config)
        head = AllMLPDecoder if config.decoder == "mlp" else MMSegDecoder
        self.decoder = head(config.embed_dims, config.decoder_dim, config.num_classes, config.decoder_dropout)
        init_weights(self, config)
        # Set by from_pretrained: what was loaded, from which format, and what was initialised.
        self.load_report = None
        self.set_fused(fused)

    # -- running -----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) → the four stage features (B, Cᵢ, H/4ᵢ, W/4ᵢ) at strides 4, 8, 16, 32."""
        check_images(x, self)
        if self.fused and x.device.type == "cpu" and not torch.compiler.is_compiling():
            cpu_allocator.ensure()  # once per process: large activations reuse freed memory
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) → logits (B, num_classes, ceil(H/4), ceil(W/4))."""
        return self.decoder(self.forward_features(x))

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def variant(self) -> str | None:
        return self.config.variant

    # -- fused / reference -------------------------------------------------------------------

    def backends(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> dict:
        """For each fused op, the :class:`fastseg.ops.dispatch.Choice` this model would use now;
        ``"linear"``: where its linears run and the bytes their cached packed weights take."""
        from fastseg.ops import dispatch

        param = next(self.parameters())
        dtype = dtype or param.dtype
        device = torch.device(device) if device is not None else param.device
        report = {}
        for op in dispatch.FUSED_OPS:
            if not self._fused:
                report[op] = dispatch.Choice(op, dispatch.REFERENCE, {"fused": ["model.fused is False"]})
                continue
            facts = dict(device=device, dtype=dtype)
            if op == "sr_attention":
                facts["head_dim"] = min(d // h for d, h in zip(self.config.embed_dims, self.config.num_heads))
            report[op] = dispatch.choose(op, **facts)
        # Every linear of the fused path (fastseg.ops.packed_linear), with its packed copies' memory.
        report["linear"] = (packed_choice(device, dtype) if self._fused else
                            dispatch.Choice("linear", dispatch.REFERENCE, {"fused": ["model.fused is False"]}))
        return report

    # -- checkpoints -------------------------------------------------------------------------
    # What fastseg.checkpoints needs to know about this architecture: it never imports the models,
    # the models call it (one-way dependency).
    checkpoint_family = "segformer"
    config_class = SegFormerConfig
    variants = VARIANTS

    @classmethod
    def from_pretrained(cls, source, num_classes: int | None = None, *, fused: bool = False,
                        decoder: str | None = None, strict: bool = True) -> "SegFormer":
        """Load a SegFormer from any supported checkpoint: a file, a directory (fastseg, HuggingFace,
        smp), a HuggingFace repo id in the local cache, or a state dict; see :mod:`fastseg.checkpoints`."""
        return checkpoints.load_pretrained(cls, source, num_classes=num_classes, fused=fused, decoder=decoder,
                                           strict=strict)

    @classmethod
    def from_hf(cls, hf_model, num_classes: int | None = None, *, fused: bool = False) -> "SegFormer":
        """Convert a live HuggingFace ``Segformer*`` model (weights and config)."""
        return checkpoints.load_from_hf(cls, hf_model, num_classes=num_classes, fused=fused)

    def save_pretrained(self, path, format: str = "fastseg", *, overwrite: bool = True,
                        allow_eps_change: bool = False):
        """Write the weights atomically in ``format``'s own layout: "fastseg" (a directory with
        ``model.safetensors`` + ``fastseg_config.json``, or one ``.safetensors``), "hf" (a directory
        transformers loads), "nvlabs" / "mmseg" (``.pth``), "smp" (a state dict file, or smp's
        directory). Refuses, with the reason, what the format cannot represent faithfully."""
        return checkpoints.save_pretrained(self, path, format, overwrite=overwrite,
                                           allow_eps_change=allow_eps_change)
