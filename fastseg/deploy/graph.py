"""The *fast graph*: what every export and engine runs, not a trace of the eager model.

:func:`fast_graph` builds a plain-PyTorch module from a SegFormer or SETR (fused or not, same
weights) that computes the fused path's math with stock ops only, its weights folded once:

- LayerNorm as one ``F.layer_norm`` (one ONNX ``LayerNormalization`` node each).
- Attention as MatMul / Softmax / MatMul on head views, the 1/√D scale folded into the q (qkv)
  projection.
- Mix-FFN: fc1 → depthwise (grouped) 3×3 conv → GELU → fc2, all as convs on the NCHW map (one
  transpose of C channels each way, not of 4C); the patch embedding as conv → tokens → LayerNorm.
- SegFormer decoder: the rewrite of :mod:`fastseg.ops.decoder_upsample_fuse` — per stage one
  1×1 projection with Mᵢ = Fᵢ·Lᵢ (eval BN folded in), resize, sum, ReLU, classifier. The
  4E-channel concat and the E×4E fuse weight never appear. mmseg head: the per-branch conv
  + BN + ReLU, then the fusion conv's slice Fᵢ (BN folded) before the resize.
- SETR heads: BN folded into the convs, the classifier before the last upsample (exact: a 1×1
  conv commutes with bilinear resizing, whose weights sum to 1).

fp16 (``fp16=True``) computes in half precision but keeps LayerNorm, softmax and the decoder's
folded projections + resize-sum in fp32 (Casts around them); inputs and outputs stay fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastseg.deploy.common import ExportError

# --- the fast graph ----------------------------------------------------------------------------

def _t(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(dtype).clone()


class _Weights(nn.Module):
    """Holds tensors as buffers (initializers in the ONNX file), no parameters, no autograd."""

    def keep(self, name: str, tensor: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.register_buffer(name, None if tensor is None else _t(tensor, dtype))


class _LayerNorm(_Weights):
    """LayerNorm over the last dim, computed in fp32 whatever the graph's dtype."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.keep("weight", ln.weight, torch.float32)
        self.keep("bias", ln.bias, torch.float32)
        self.eps = float(ln.eps)

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x.float(), self.weight.shape, self.weight, self.bias, self.eps).to(x.dtype)


def _softmax32(scores: torch.Tensor) -> torch.Tensor:
    if scores.dtype == torch.float32:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores.float(), dim=-1).to(scores.dtype)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _tokens_to_image(t: torch.Tensor, H, W) -> torch.Tensor:
    """(B, H·W, C) → (B, C, H, W): the one transpose ONNX's NCHW convs need."""
    B, _, C = t.shape
    # reshape, not unflatten: the TorchScript exporter traces unflatten's sizes as constants.
    return t.transpose(1, 2).reshape(B, C, H, W)


class _PatchEmbed(_Weights):
    def __init__(self, pe, dt):
        super().__init__()
        self.keep("weight", pe.proj.weight, dt)
        self.keep("bias", pe.proj.bias, dt)
        self.stride, self.padding = pe.proj.stride, pe.proj.padding
        self.norm = _LayerNorm(pe.norm)

    def forward(self, x):
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        H, W = y.shape[2], y.shape[3]
        return self.norm(y.flatten(2).transpose(1, 2)), H, W


class _SRAttention(_Weights):
    sdpa = False

    def __init__(self, attn, dt):
        super().__init__()
        C = attn.q.weight.shape[0]
        self.heads, self.dim = attn.num_heads, C
        s = attn.scale
        self.keep("q_weight", attn.q.weight.float() * s, dt)
        self.keep("q_bias", attn.q.bias.float() * s, dt)
        kw, vw = attn.kv.weight.split(C)
        kb, vb = attn.kv.bias.split(C)
        self.keep("k_weight", kw, dt)
        self.keep("k_bias", kb, dt)
        self.keep("v_weight", vw, dt)
        self.keep("v_bias", vb, dt)
        self.keep("proj_weight", attn.proj.weight, dt)
        self.keep("proj_bias", attn.proj.bias, dt)
        self.sr_ratio = attn.sr_ratio
        if self.sr_ratio > 1:
            self.keep("sr_weight", attn.sr.weight, dt)
            self.keep("sr_bias", attn.sr.bias, dt)
            self.norm = _LayerNorm(attn.norm)

    def forward(self, x, H, W):
        h = self.heads
        q = F.linear(x, self.q_weight, self.q_bias)
        if self.sr_ratio > 1:
            y = F.conv2d(_tokens_to_image(x, H, W), self.sr_weight, self.sr_bias, self.sr_ratio)
            x = self.norm(y.flatten(2).transpose(1, 2))
        k = F.linear(x, self.k_weight, self.k_bias)
        v = F.linear(x, self.v_weight, self.v_bias)
        return F.linear(_attention(q, k, v, h, self.sdpa), self.proj_weight, self.proj_bias)


ATTENTIONS = ("matmul", "op")


def _attention(q, k, v, heads: int, sdpa: bool = False) -> torch.Tensor:
    """softmax(q kᵀ) v per head (the scale is folded into q). q: (B, N, C), k, v: (B, Nkv, C) →
    (B, N, C). One head needs no head views at all. ``sdpa``: one scaled_dot_product_attention
    call (the dynamo exporter writes it as opset 23's ``Attention`` node)."""
    if sdpa:
        D = q.shape[-1] // heads
        qh, kh, vh = (t.unflatten(-1, (heads, D)).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh, scale=1.0).transpose(1, 2).flatten(2)
    if heads == 1:
        return _softmax32(q @ k.transpose(1, 2)) @ v
    D = q.shape[-1] // heads
    qh = q.unflatten(-1, (heads, D)).transpose(1, 2)                 # (B, h, N, D)
    kt = k.unflatten(-1, (heads, D)).permute(0, 2, 3, 1)             # (B, h, D, Nkv)
    vh = v.unflatten(-1, (heads, D)).transpose(1, 2)                 # (B, h, Nkv, D)
    return (_softmax32(qh @ kt) @ vh).transpose(1, 2).flatten(2)


class _MixFFN(_Weights):
    def __init__(self, mlp, dt):
        super().__init__()
        for name in ("fc1", "dwconv", "fc2"):
            m = getattr(mlp, name)
            self.keep(f"{name}_weight", m.weight, dt)
            self.keep(f"{name}_bias", m.bias, dt)

    def forward(self, x, H, W):
        # fc1 and fc2 as 1×1 convs on the NCHW map: the transposes to and from tokens move C
        # channels instead of 4C, and the three convs chain in the runtime's blocked layout
        # (b0 at 512²: ONNX Runtime 1.2x, OpenVINO 1.5x faster than Linear on tokens around the conv).
        y = F.conv2d(_tokens_to_image(x, H, W), self.fc1_weight[:, :, None, None], self.fc1_bias)
        y = F.gelu(F.conv2d(y, self.dwconv_weight, self.dwconv_bias, padding=1, groups=y.shape[1]))
        y = F.conv2d(y, self.fc2_weight[:, :, None, None], self.fc2_bias)
        return y.flatten(2).transpose(1, 2)


class _MiTBlock(nn.Module):
    def __init__(self, block, dt):
        super().__init__()
        self.norm1, self.norm2 = _LayerNorm(block.norm1), _LayerNorm(block.norm2)
        self.attn, self.mlp = _SRAttention(block.attn, dt), _MixFFN(block.mlp, dt)

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x), H, W)


class _MiTStage(nn.Module):
    def __init__(self, stage, dt):
        super().__init__()
        self.patch_embed = _PatchEmbed(stage.patch_embed, dt)
        self.blocks = nn.ModuleList(_MiTBlock(b, dt) for b in stage.blocks)
        self.norm = _LayerNorm(stage.norm)

    def forward(self, x):
        """x: (B, Cin, H, W) → (B, C, H', W')."""
        t, H, W = self.patch_embed(x)
        for block in self.blocks:
            t = block(t, H, W)
        return _tokens_to_image(self.norm(t), H, W)


class _MLPHead(_Weights):
    """Σᵢ resize(conv1x1(cᵢ, Mᵢ)) + b → ReLU → classifier; Mᵢ, b with eval BN folded (fp32)."""

    def __init__(self, head, dt):
        super().__init__()
        from fastseg.ops import fold_mlp_head

        with torch.no_grad():
            Ms, b = fold_mlp_head(head.linear_c, head.linear_fuse.weight.float(), head.bn)
        for i, M in enumerate(Ms):
            self.keep(f"M{i}", M[:, :, None, None], torch.float32)
        self.keep("bias", b, torch.float32)
        self.keep("classifier_weight", head.classifier.weight, dt)
        self.keep("classifier_bias", head.classifier.bias, dt)

    def forward(self, feats):
        H, W = feats[0].shape[2], feats[0].shape[3]
        y = F.conv2d(_f32(feats[0]), self.M0, self.bias)
        for i in range(1, len(feats)):
            m = F.conv2d(_f32(feats[i]), getattr(self, f"M{i}"))
            y = y + F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
        y = _as(torch.relu(y), feats[0].dtype)
        return F.conv2d(y, self.classifier_weight, self.classifier_bias)


def _fold_conv_bn(m) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias-free conv + eval BN as one conv (weight, bias), in fp32."""
    conv, bn = m.conv, m.bn
    s = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
    return conv.weight.float() * s.reshape(-1, 1, 1, 1), bn.bias.float() - bn.running_mean.float() * s


class _ConvReLU(_Weights):
    """ConvBNReLU with BN folded: conv + bias + ReLU."""

    def __init__(self, m, dt):
        super().__init__()
        w, b = _fold_conv_bn(m)
        self.keep("weight", w, dt)
        self.keep("bias", b, dt)
        self.padding = m.conv.padding

    def forward(self, x):
        return torch.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))


class _MMSegHead(_Weights):
    """relu(BN(conv(cᵢ))) per branch, then Σᵢ resize(Fᵢ ·) + b (fusion BN folded, fp32) → ReLU →
    classifier: the fusion conv's slices move before the resize, the 4E concat never exists."""

    def __init__(self, head, dt):
        super().__init__()
        from fastseg.ops import fold_mmseg_head

        self.branches = nn.ModuleList(_ConvReLU(c, dt) for c in head.convs)
        with torch.no_grad():
            Fs, b = fold_mmseg_head(head.convs, head.fusion_conv.conv.weight.float(), head.bn)
        for i, Fi in enumerate(Fs):
            self.keep(f"F{i}", Fi[:, :, None, None], torch.float32)
        self.keep("bias", b, torch.float32)
        self.keep("classifier_weight", head.classifier.weight, dt)
        self.keep("classifier_bias", head.classifier.bias, dt)

    def forward(self, feats):
        H, W = feats[0].shape[2], feats[0].shape[3]
        y = None
        for i, (f, branch) in enumerate(zip(feats, self.branches)):
            m = F.conv2d(_f32(branch(f)), getattr(self, f"F{i}"), self.bias if i == 0 else None)
            y = m if i == 0 else y + F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
        y = _as(torch.relu(y), feats[0].dtype)
        return F.conv2d(y, self.classifier_weight, self.classifier_bias)


class SegFormerGraph(nn.Module):
    """The fast graph of a :class:`fastseg.SegFormer` with stock ops (see the module docstring)."""

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.stages = nn.ModuleList(_MiTStage(s, dtype) for s in model.encoder.stages)
        head = model.decoder
        self.decoder = _MLPHead(head, dtype) if hasattr(head, "linear_fuse") else _MMSegHead(head, dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _as(images, self.dtype)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return _f32(self.decoder(feats))


# --- SETR --------------------------------------------------------------------------------------

class _ViTBlock(_Weights):
    sdpa = False

    def __init__(self, block, dt):
        super().__init__()
        self.norm1, self.norm2 = _LayerNorm(block.norm1), _LayerNorm(block.norm2)
        a = block.attn
        C = a.proj.weight.shape[0]
        self.heads = a.num_heads
        w, b = a.qkv.weight.float().clone(), a.qkv.bias.float().clone()
        w[:C] *= a.scale
        b[:C] *= a.scale
        self.keep("qkv_weight", w, dt)
        self.keep("qkv_bias", b, dt)
        self.keep("proj_weight", a.proj.weight, dt)
        self.keep("proj_bias", a.proj.bias, dt)
        for name in ("fc1", "fc2"):
            m = getattr(block.mlp, name)
            self.keep(f"{name}_weight", m.weight, dt)
            self.keep(f"{name}_bias", m.bias, dt)

    def forward(self, x):
        q, k, v = F.linear(self.norm1(x), self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        out = _attention(q, k, v, self.heads, self.sdpa)
        x = x + F.linear(out, self.proj_weight, self.proj_bias)
        y = F.gelu(F.linear(self.norm2(x), self.fc1_weight, self.fc1_bias))
        return x + F.linear(y, self.fc2_weight, self.fc2_bias)


def _up(x: torch.Tensor, scale: int) -> torch.Tensor:
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=float(scale), mode="bilinear", align_corners=False)


class _UpHead(_Weights):
    """Naive / PUP: LayerNorm on tokens → (conv + BN + ReLU → ×s) × n with BN folded, the 1×1
    classifier before the last ×s."""

    def __init__(self, head, dt):
        super().__init__()
        self.norm = _LayerNorm(head.norm)
        self.convs = nn.ModuleList(_ConvReLU(c, dt) for c in head.convs)
        self.up_scale = head.up_scale
        self.keep("classifier_weight", head.classifier.weight, dt)
        self.keep("classifier_bias", head.classifier.bias, dt)

    def forward(self, t, h, w):
        y = _tokens_to_image(self.norm(t), h, w)
        for j, conv in enumerate(self.convs):
            y = conv(y)
            if j < len(self.convs) - 1:
                y = _up(y, self.up_scale)
        return _up(F.conv2d(y, self.classifier_weight, self.classifier_bias), self.up_scale)


class _MLA(_Weights):
    """MLA neck (LN, 1×1 conv + BN + ReLU as a Linear on tokens, top-down sums, 3×3 conv) and head
    (2 × 3×3 conv per branch, concat, classifier before the ×4)."""

    def __init__(self, neck, head, dt):
        super().__init__()
        self.norms = nn.ModuleList(_LayerNorm(n) for n in neck.norms)
        for i, m in enumerate(neck.proj):
            w, b = _fold_conv_bn(m)
            self.keep(f"proj{i}_weight", w.flatten(1), dt)
            self.keep(f"proj{i}_bias", b, dt)
        self.extract = nn.ModuleList(_ConvReLU(m, dt) for m in neck.extract)
        self.branches = nn.ModuleList(nn.Sequential(*(_ConvReLU(m, dt) for m in br)) for br in head.branches)
        self.up_scale = head.up_scale
        self.keep("classifier_weight", head.classifier.weight, dt)
        self.keep("classifier_bias", head.classifier.bias, dt)

    def forward(self, feats, h, w):
        projected = []
        for i, (t, norm) in enumerate(zip(feats, self.norms)):
            y = torch.relu(F.linear(norm(t), getattr(self, f"proj{i}_weight"), getattr(self, f"proj{i}_bias")))
            projected.append(_tokens_to_image(y, h, w))
        mids = []
        for p in projected[::-1]:
            mids.append(p if not mids else mids[-1] + p)
        outs = [branch(conv(m)) for m, conv, branch in zip(mids, self.extract, self.branches)]
        logits = F.conv2d(torch.cat(outs, dim=1), self.classifier_weight, self.classifier_bias)
        return _up(logits, self.up_scale)


class SETRGraph(_Weights):
    """The fast graph of a :class:`fastseg.SETR` (eval: main head only) with stock ops."""

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        super().__init__()
        enc, cfg = model.encoder, model.config
        self.dtype = dtype
        self.patch = cfg.patch_size
        self.with_cls_token = cfg.with_cls_token
        self.out_indices = tuple(cfg.out_indices)
        self.keep("patch_weight", enc.patch_embed.proj.weight, dtype)
        self.keep("patch_bias", enc.patch_embed.proj.bias, dtype)
        gh, gw = cfg.grid
        C = cfg.embed_dim
        pos = enc.pos_embed.detach()
        self.keep("pos_grid", pos[:, 1:].reshape(1, gh, gw, C).permute(0, 3, 1, 2), dtype)
        self.keep("cls", enc.cls_token.detach() + pos[:, :1], dtype)
        self.blocks = nn.ModuleList(_ViTBlock(b, dtype) for b in enc.blocks[:max(self.out_indices) + 1])
        if model.neck is not None:
            self.mla = _MLA(model.neck, model.decoder, dtype)
        else:
            self.up = _UpHead(model.decoder, dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _as(images, self.dtype)
        p = self.patch
        H, W = x.shape[2], x.shape[3]
        # mmseg's corner padding: zeros at the bottom/right up to multiples of the patch size.
        x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        y = F.conv2d(x, self.patch_weight, self.patch_bias, stride=p)
        B, C, h, w = y.shape
        pos = F.interpolate(self.pos_grid, size=(h, w), mode="bilinear", align_corners=False)
        t = (y + pos).flatten(2).transpose(1, 2)
        if self.with_cls_token:
            t = torch.cat([self.cls.expand(B, -1, -1), t], dim=1)
        feats = []
        for i, block in enumerate(self.blocks):
            t = block(t)
            if i in self.out_indices:
                feats.append(t[:, 1:] if self.with_cls_token else t)
        if hasattr(self, "mla"):
            out = self.mla(feats, h, w)
        else:
            out = self.up(feats[-1], h, w)
        return _f32(out)


def model_kind(model) -> str:
    from fastseg.models.segformer import SegFormer
    from fastseg.models.setr import SETR

    if isinstance(model, SegFormer):
        return "segformer"
    if isinstance(model, SETR):
        return "setr"
    raise ExportError(f"export takes a fastseg SegFormer or SETR model, got {type(model).__name__}")


def fast_graph(model, fp16: bool = False, attention: str = "matmul") -> nn.Module:
    """The export module of ``model`` (SegFormer or SETR, fused or not): stock ops only, weights
    folded, eval semantics (no dropout, BN running statistics). ``fp16``: half-precision compute
    with LayerNorm, softmax and the decoder's folded sums in fp32; fp32 in and out.
    ``attention``: "matmul" (MatMul / Softmax / MatMul) or "op" (scaled_dot_product_attention,
    for opset 23's ``Attention``; its softmax precision is then the runtime's)."""
    kind = model_kind(model)
    if attention not in ATTENTIONS:
        raise ExportError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    dtype = torch.float16 if fp16 else torch.float32
    with torch.no_grad():
        graph = SegFormerGraph(model, dtype) if kind == "segformer" else SETRGraph(model, dtype)
    for m in graph.modules():
        if isinstance(m, (_SRAttention, _ViTBlock)):
            m.sdpa = attention == "op"
    graph.kind = kind
    graph.num_classes = model.num_classes
    graph.to(next(model.parameters()).device)
    return graph.eval()
