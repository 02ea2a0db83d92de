"""Deployment export: ONNX (ONNX Runtime, OpenVINO, TensorRT) and torch.export programs.

What is exported is the *fast graph*, not a trace of the eager model: :func:`fast_graph` builds a
plain-PyTorch module from a SegFormer or SETR (fused or not, same weights) that computes the
fused path's math with stock ops only, its weights folded once at export time:

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

The ONNX file has one input ``images`` (B, 3, H, W) float32 and one output ``logits`` with the
shape ``model(images)`` gives; batch, height and width are symbolic unless ``dynamic=False``.
Files are written atomically (a temporary file in the target folder, then renamed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# LayerNormalization entered the ONNX standard in opset 17.
MIN_OPSET = 17
DEFAULT_OPSET = 18
MIN_SIZE = 32
FORMATS = ("onnx", "pt2", "aoti")


class ExportError(ValueError):
    """An export that cannot be done as asked (bad option, unwritable output, missing package)."""


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


# --- writing files -----------------------------------------------------------------------------

@dataclasses.dataclass
class ExportReport:
    """What an export wrote: the file, its format and shapes, the ops it uses, its size, and
    (when checked) the max relative error against the PyTorch model per runtime and size."""

    path: str
    format: str
    model: str
    opset: int | None
    dynamic: bool
    input_shape: tuple
    output_shape: tuple
    fp16: bool
    exporter: str | None = None
    ops: dict = dataclasses.field(default_factory=dict)
    size_bytes: int = 0
    seconds: float = 0.0
    parity: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        dims = "x".join(str(d) for d in self.input_shape)
        lines = [f"wrote {self.path} ({self.format}, {self.size_bytes / 2**20:.1f} MiB, {self.seconds:.1f} s): "
                 f"{self.model}, images {dims} -> logits {'x'.join(str(d) for d in self.output_shape)}"
                 f"{', fp16 compute' if self.fp16 else ''}{f', opset {self.opset}' if self.opset else ''}"]
        if self.ops:
            lines.append("ops: " + ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items(), key=lambda kv: -kv[1])))
        for where, err in self.parity.items():
            lines.append(f"parity {where}: max relative error {err:.2e}")
        lines += self.notes
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, str):
        parts = size.lower().replace("×", "x").split("x")
        if len(parts) == 1:
            parts = parts * 2
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            raise ExportError(f"size must be HxW (e.g. 512x512), got {size!r}") from None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ExportError(f"size must be (H, W), got {size!r}")
    if min(size) < MIN_SIZE:
        raise ExportError(f"image size {size[0]}x{size[1]} is too small: H and W must be >= {MIN_SIZE}")
    return size


def _check_output(path) -> Path:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ExportError(f"output {path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    if not folder.is_dir():
        raise ExportError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {folder} is not writable")
    return path


@contextlib.contextmanager
def _atomic_path(path: Path):
    """A temporary path in ``path``'s folder; renamed onto ``path`` if the block succeeds, removed
    otherwise, so a failed export never leaves a half-written file."""
    from fastseg.io import file_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # mkstemp's 0600 would survive the rename: give what open() gives
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is not None and (e.filename is None or str(e.filename) == str(tmp)):
            e.filename = str(path)  # name the user's path (e.g. a full disk), not our temporary one
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def max_opset() -> int | None:
    """The newest ONNX opset the installed ``onnx`` knows (None without onnx)."""
    try:
        import onnx.defs
    except ImportError:
        return None
    return int(onnx.defs.onnx_opset_version())


def _check_opset(opset) -> None:
    """Refuse, before any tracing, an opset outside [MIN_OPSET, the installed onnx's newest]."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"opset must be an integer, got {opset!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    newest = max_opset()
    if newest is not None and opset > newest:
        raise ExportError(f"opset {opset} is newer than the installed onnx knows (newest: {newest}); "
                          f"choose {MIN_OPSET}..{newest}")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ExportError(f"{module} is needed for this export: pip install 'fastseg[export]' ({e})") from None


def _dynamic_shapes():
    from torch.export import Dim

    # Dim.DYNAMIC lets torch.export refine the ranges from the model's own size guards (a stage's
    # map must not shrink to 1×1 for some views), where named Dims with bounds would fail.
    dyn = getattr(Dim, "DYNAMIC", None) or Dim("size", min=MIN_SIZE)
    return {"images": {0: getattr(Dim, "DYNAMIC", None) or Dim("batch"), 2: dyn, 3: dyn}}


@contextlib.contextmanager
def _size_oblivious():
    """Size-oblivious reasoning where this torch has it: fewer 0/1 guards, wider dynamic ranges."""
    try:
        from torch.fx.experimental import _config
    except ImportError:
        _config = None
    if _config is None or not hasattr(_config, "backed_size_oblivious"):
        yield
        return
    with _config.patch(backed_size_oblivious=True):
        yield


def _example(model, batch: int, size, dynamic: bool) -> torch.Tensor:
    device = next(model.parameters()).device
    # torch.export specialises dims that are 1 in the example, so a dynamic export traces batch 2.
    b = max(batch, 2) if dynamic else batch
    return torch.randn(b, model.config.in_channels, *size, device=device)


def _progress(progress: Callable | None, text: str) -> None:
    if progress is not None:
        progress(text)


def count_ops(onnx_model) -> dict[str, int]:
    """{op_type: count} over the graph (and any local functions)."""
    counts = Counter(n.op_type for n in onnx_model.graph.node)
    for fn in onnx_model.functions:
        counts.update(n.op_type for n in fn.node)
    return dict(counts)


EXPORTERS = ("auto", "torchscript", "dynamo")


def _torchscript_max_opset() -> int:
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 0


def _pick_exporter(exporter: str, opset: int) -> str:
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {list(EXPORTERS)}")
    if exporter != "auto":
        return exporter
    return "torchscript" if opset <= _torchscript_max_opset() else "dynamo"


def _trace_torchscript(graph, x, opset: int, dynamic: bool):
    """torch.onnx's TorchScript exporter: a plain trace (seconds, where torch.export's symbolic
    shapes take tens of seconds), then onnxscript's optimizer folds the trace's constants."""
    import io

    import onnx
    import onnxscript

    buf = io.BytesIO()
    axes = {"images": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "logits_height", 3: "logits_width"}} if dynamic else None
    torch.onnx.export(graph, (x,), buf, dynamo=False, opset_version=opset, input_names=["images"],
                      output_names=["logits"], dynamic_axes=axes, do_constant_folding=True)
    return onnxscript.optimizer.optimize(onnx.load_from_string(buf.getvalue()))


def _trace_dynamo(graph, x, opset: int, dynamic: bool):
    """torch.onnx's dynamo exporter (torch.export + onnxscript translation)."""
    program = torch.onnx.export(
        graph, (x,), dynamo=True, opset_version=opset, input_names=["images"], output_names=["logits"],
        dynamic_shapes=_dynamic_shapes() if dynamic else None, optimize=True, verbose=False)
    proto = program.model_proto
    if dynamic:
        _name_dims(proto)
    return proto


def export_onnx(model, path, *, dynamic: bool = True, example_size=(512, 512), opset: int = DEFAULT_OPSET,
                fp16: bool = False, batch: int = 1, check: bool = False, exporter: str = "auto",
                attention: str = "matmul", progress: Callable[[str], None] | None = None) -> ExportReport:
    """Write ``model``'s fast graph (see :func:`fast_graph`) as an ONNX file at ``path``.

    model: a fastseg SegFormer or SETR (fused or not). dynamic: symbolic batch, height and width
    (``False``: fixed ``batch`` × 3 × ``example_size``, which TensorRT builds fastest from).
    example_size: (H, W) to trace at (and the static size), each >= 32. opset: >= 17.
    fp16: half-precision compute (LayerNorm, softmax, folded decoder sums in fp32; fp32 I/O).
    check: run the file in ONNX Runtime against the PyTorch model and record the error.
    exporter: "torchscript" (torch.onnx's tracing exporter; opset <= 20), "dynamo" (torch.export
    based; any opset, slower to export) or "auto" (torchscript where it covers the opset).
    attention: "matmul" (MatMul / Softmax / MatMul on head views) or "op" (one ``Attention`` node
    per layer; needs opset >= 23 and the dynamo exporter).
    Returns an :class:`ExportReport`; raises :class:`ExportError` on bad options.
    """
    model_kind(model)  # refuses anything but a SegFormer or SETR before any work
    _check_opset(opset)
    size = _parse_size(example_size)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive integer, got {batch!r}")
    if attention not in ATTENTIONS:
        raise ExportError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    if attention == "op" and opset < 23:
        raise ExportError(f"attention='op' writes ONNX's Attention operator, which needs opset >= 23 (got {opset})")
    exporter = _pick_exporter(exporter, opset)
    if attention == "op" and exporter != "dynamo":
        raise ExportError("attention='op' needs the dynamo exporter (the TorchScript exporter has no Attention)")
    path = _check_output(path)
    onnx = _require("onnx")
    _require("onnxscript")
    start = time.perf_counter()
    _progress(progress, f"[1/4] building the fast graph of {_describe(model)}{' (fp16 compute)' if fp16 else ''}")
    graph = fast_graph(model, fp16=fp16, attention=attention)
    x = _example(model, batch, size, dynamic and exporter == "dynamo")
    _progress(progress, f"[2/4] tracing with torch.onnx's {exporter} exporter, opset {opset}, "
                        f"{'dynamic batch/height/width' if dynamic else 'static ' + 'x'.join(map(str, x.shape))}")
    with torch.no_grad(), _quiet():
        proto = (_trace_dynamo if exporter == "dynamo" else _trace_torchscript)(graph, x, opset, dynamic)
    _progress(progress, "[3/4] checking the graph (onnx.checker) and writing it atomically")
    onnx.checker.check_model(proto)
    with _atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    with torch.no_grad():
        out_shape = tuple(graph(x).shape)
    in_shape = ("batch", 3, "height", "width") if dynamic else tuple(x.shape)
    if dynamic:
        out_shape = ("batch", out_shape[1], "logits_height", "logits_width")
    report = ExportReport(str(path), "onnx", _describe(model), opset, dynamic, in_shape, out_shape, fp16,
                          ops=count_ops(proto), size_bytes=path.stat().st_size, exporter=exporter)
    if check:
        _progress(progress, "[4/4] checking parity in ONNX Runtime against PyTorch")
        sizes = [size] if not dynamic else [size, _odd_size(size)]
        b = batch if not dynamic else 2
        report.parity.update(check_parity(model, path, sizes=sizes, batch=b, runtimes=("onnxruntime",)))
    else:
        _progress(progress, "[4/4] done (no parity check: pass check=True / --check)")
    report.seconds = time.perf_counter() - start
    return report


def _odd_size(size) -> tuple[int, int]:
    return (max(MIN_SIZE + 1, size[0] * 3 // 4) | 1, max(MIN_SIZE + 1, size[1] * 5 // 8) | 1)


def _name_dims(proto) -> None:
    """Readable symbolic dims: images (batch, 3, height, width); logits (batch, K, h, w)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims, ("batch", None, "height", "width")):
        if name and not d.HasField("dim_value"):
            d.dim_param = name
    out = proto.graph.output[0].type.tensor_type.shape.dim
    for d, name in zip(out, ("batch", None, "logits_height", "logits_width")):
        if name and not d.HasField("dim_value"):
            d.dim_param = name


def _describe(model) -> str:
    kind = model_kind(model)
    cfg = model.config
    if kind == "segformer":
        return f"SegFormer-{cfg.variant or 'custom'} ({cfg.decoder} head, {cfg.num_classes} classes)"
    return f"SETR-{cfg.decoder} ({cfg.encoder or 'custom ViT'}, {cfg.num_classes} classes)"


@contextlib.contextmanager
def _quiet():
    """torch.onnx's dynamo exporter prints progress lines of its own; ours replace them."""
    import io
    import warnings
    from contextlib import redirect_stdout

    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# --- running exported files ----------------------------------------------------------------------

def onnx_session(path, runtime: str = "onnxruntime", threads: int | None = None):
    """A callable ``images (numpy, float32) → logits (numpy)`` for the file in ``runtime``
    ("onnxruntime" or "openvino"), on CPU."""
    if runtime == "onnxruntime":
        ort = _require("onnxruntime")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda images: sess.run(None, {name: images})[0]
    if runtime == "openvino":
        ov = _require("openvino")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()

        def run(images):
            request.infer({0: images})
            return request.get_output_tensor(0).data.copy()

        return run
    raise ExportError(f"unknown runtime {runtime!r}; choose onnxruntime or openvino")


def relative_error(got, want) -> float:
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != PyTorch's {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def check_parity(model, path, *, sizes, batch: int = 1, runtimes=("onnxruntime",), seed: int = 0) -> dict:
    """Max relative error of the ONNX file against ``model``'s fp32 PyTorch output, per runtime
    and size: {"onnxruntime 2x3x97x131": err, …}."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for rt in runtimes:
            run = onnx_session(path, rt)
            for s in sizes:
                x = torch.randn(batch, model.config.in_channels, *s, generator=gen)
                with torch.no_grad():
                    want = model(x.to(device)).float().cpu()
                got = run(x.numpy())
                results[f"{rt} {'x'.join(map(str, x.shape))}"] = relative_error(got, want)
    finally:
        model.train(was_training)
    return results


# --- torch.export / AOTInductor -------------------------------------------------------------------

def _ranges(ep) -> str:
    """The input dims' ranges torch.export settled on, e.g. "batch >= 1, height >= 33, width >= 33"."""
    sizes = ep.graph_signature.user_inputs
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == sizes[0])
    parts = []
    for name, d in zip(("batch", "channels", "height", "width"), node.meta["val"].shape):
        if isinstance(d, torch.SymInt):
            vr = ep.range_constraints.get(d.node.expr)
            if vr is not None:
                hi = "" if str(vr.upper) in ("int_oo", "oo") else f" <= {vr.upper}"
                parts.append(f"{name} >= {vr.lower}{hi}")
    return ", ".join(parts)


def export_program(model, path, *, dynamic: bool = True, example_size=(512, 512), batch: int = 1,
                   fp16: bool = False, aoti: bool = False, check: bool = False,
                   progress: Callable[[str], None] | None = None) -> ExportReport:
    """Write the fast graph as a ``torch.export`` ExportedProgram (``.pt2``; read it back with
    ``torch.export.load(path).module()``), or with ``aoti=True`` as an AOTInductor package
    compiled for this machine (``torch._inductor.aoti_load_package``).

    The batch is fixed at ``batch``; with ``dynamic`` the height and width are symbolic. torch.export
    cannot keep the batch symbolic down to 1: its conv shape rule guards ``batch > 1``. It also
    guards that no map shrinks to one token (H, W >= 33, and stage 1's spatial-reduction grid
    more than 1×1, e.g. not both H, W < 61 for SegFormer); the report lists the ranges it kept.
    """
    model_kind(model)  # refuses anything but a SegFormer or SETR before any work
    size = _parse_size(example_size)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive integer, got {batch!r}")
    path = _check_output(path)
    start = time.perf_counter()
    _progress(progress, f"[1/3] building the fast graph of {_describe(model)}{' (fp16 compute)' if fp16 else ''}")
    graph = fast_graph(model, fp16=fp16)
    x = _example(model, batch, size, False)
    _progress(progress, f"[2/3] torch.export ({'dynamic height/width, batch ' + str(batch) if dynamic else 'static'}"
                        f", traced at {'x'.join(map(str, x.shape))})")
    from torch.export import Dim

    dims = {"images": {2: Dim.DYNAMIC, 3: Dim.DYNAMIC}} if dynamic and hasattr(Dim, "DYNAMIC") else (
        {"images": {2: Dim("height", min=64), 3: Dim("width", min=64)}} if dynamic else None)
    with torch.no_grad(), _size_oblivious():
        ep = torch.export.export(graph, (x,), dynamic_shapes=dims)
    notes = []
    if dynamic:
        notes.append(f"dynamic ranges: {_ranges(ep) or 'none'} (batch fixed at {batch})")
        _progress(progress, "      " + notes[-1])
    with _atomic_path(path) as tmp:
        if aoti:
            _progress(progress, "[3/3] compiling an AOTInductor package (a C++ build; minutes)")
            from torch._inductor import aoti_compile_and_package

            aoti_compile_and_package(ep, package_path=str(tmp))
            notes.append("load with torch._inductor.aoti_load_package(path); compiled for this machine's "
                         f"{'CUDA' if x.is_cuda else 'CPU'} and torch {torch.__version__}")
        else:
            _progress(progress, "[3/3] writing the ExportedProgram atomically")
            torch.export.save(ep, str(tmp))
            notes.append("load with torch.export.load(path).module()")
    with torch.no_grad():
        out = tuple(graph(x).shape)
    report = ExportReport(str(path), "aoti" if aoti else "pt2", _describe(model), None, dynamic,
                          (batch, 3, "height", "width") if dynamic else tuple(x.shape),
                          (batch, out[1], "logits_height", "logits_width") if dynamic else out,
                          fp16, size_bytes=path.stat().st_size, notes=notes)
    ops = Counter(str(n.target).split(".")[1] if str(n.target).startswith("aten.") else str(n.target)
                  for n in ep.graph.nodes if n.op == "call_function")
    report.ops = dict(ops)
    if check:
        if aoti:
            from torch._inductor import aoti_load_package

            loaded = aoti_load_package(str(path))
        else:
            loaded = torch.export.load(str(path)).module()
        sizes = [size] if not dynamic else [size, _odd_size(size)]
        gen = torch.Generator().manual_seed(0)
        was_training = model.training
        model.eval()
        for s in sizes:
            xi = torch.randn(batch, model.config.in_channels, *s, generator=gen).to(x.device)
            with torch.no_grad():
                report.parity[f"{report.format} {'x'.join(map(str, xi.shape))}"] = relative_error(
                    loaded(xi).cpu(), model(xi).float().cpu())
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


# --- command line ------------------------------------------------------------------------------------

def load_source(source, model: str | None = None):
    """A model from anything ``SegFormer.from_pretrained`` or ``SETR.from_pretrained`` reads (a
    file, an HF directory, a fastseg directory) or a ``fastseg train`` checkpoint. ``model``:
    "segformer[-bX]" or "setr[-naive|-pup|-mla]" picks the loader; otherwise SegFormer is tried
    first, then SETR."""
    from fastseg import SETR, SegFormer

    path = Path(source)
    if not path.exists():
        raise ExportError(f"SOURCE {source} does not exist (give a checkpoint file, an HF model folder "
                          "or a fastseg save_pretrained folder)")
    if model is not None and not (model.startswith("segformer") or model.startswith("setr")):
        raise ExportError(f"--model must be segformer[-b0..b5] or setr[-naive|-pup|-mla], got {model!r}")
    if model is not None and model.startswith("setr"):
        decoder = model.split("-")[1] if "-" in model else None
        return SETR.from_pretrained(path, decoder=decoder)
    if path.is_file() and path.suffix.lower() in (".pth", ".pt", ".ckpt"):
        from fastseg.inference import is_train_checkpoint, load_model
        from fastseg.io import load_weights_file

        obj, _ = load_weights_file(path)
        if is_train_checkpoint(obj):
            return load_model(path)[0]
    if model is not None:
        loaded = SegFormer.from_pretrained(path)
        want = model[len("segformer-"):] if model.startswith("segformer-") else None
        if want and loaded.variant and loaded.variant != want:
            raise ExportError(f"{source} holds a SegFormer-{loaded.variant}, but --model is {model}")
        return loaded
    errors = []
    for cls in (SegFormer, SETR):
        try:
            return cls.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - each loader's own message goes into the error
            errors.append(f"as {cls.__name__}: {str(e).splitlines()[0][:300]}")
    raise ExportError(f"cannot load {source} as a SegFormer or SETR checkpoint; pass --model to pick the kind.\n  "
                      + "\n  ".join(errors))


def add_arguments(p) -> None:
    p.add_argument("source", metavar="SOURCE", help="a checkpoint file, an HF model folder or a fastseg folder")
    p.add_argument("--out", required=True, help="the file to write (.onnx, or .pt2 for --format pt2/aoti)")
    p.add_argument("--model", default=None, help="segformer[-bX] or setr[-naive|pup|mla]: skip detection")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (default), pt2 (torch.export ExportedProgram) or aoti (AOTInductor package)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (>= {MIN_OPSET}; default {DEFAULT_OPSET})")
    p.add_argument("--static", metavar="HxW", default=None,
                   help="a fixed-shape graph for this size (TensorRT builds engines faster from one)")
    p.add_argument("--batch", type=int, default=1, help="the batch size of a --static graph, and of any pt2/aoti "
                                                        "program (default 1)")
    p.add_argument("--size", metavar="HxW", default="512x512", help="trace size of a dynamic export (default 512x512)")
    p.add_argument("--fp16", action="store_true", help="fp16 compute (LayerNorm, softmax, decoder sums in fp32)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto", help="torch.onnx exporter (default auto)")
    p.add_argument("--attention", choices=ATTENTIONS, default="matmul",
                   help="matmul: MatMul/Softmax/MatMul (default); op: opset 23's Attention node (--opset 23)")
    p.add_argument("--check", action="store_true", help="run the file (ONNX Runtime for onnx) against PyTorch and "
                                                        "print the error")


def main(args) -> int:
    import sys

    def say(text):
        print(text, flush=True)

    try:
        size = _parse_size(args.static if args.static else args.size)
        if args.batch < 1:
            raise ExportError(f"--batch must be >= 1, got {args.batch}")
        if args.static is None and args.batch != 1 and args.format == "onnx":
            raise ExportError("--batch fixes the batch of a --static graph; a dynamic ONNX graph takes any batch")
        _check_output(args.out)
        if args.format == "onnx":
            _check_opset(args.opset)  # before loading and tracing, which take a while
        say(f"loading {args.source}")
        model = load_source(args.source, args.model).eval()
        dynamic = args.static is None
        if args.format == "onnx":
            report = export_onnx(model, args.out, dynamic=dynamic, example_size=size, opset=args.opset,
                                 fp16=args.fp16, batch=args.batch, check=args.check, exporter=args.exporter,
                                 attention=args.attention, progress=say)
        else:
            report = export_program(model, args.out, dynamic=dynamic, example_size=size, batch=args.batch,
                                    fp16=args.fp16, aoti=args.format == "aoti", check=args.check, progress=say)
    except (ExportError, FileNotFoundError) as e:
        print(f"fastseg export: error: {e}", file=sys.stderr)
        return 2
    say(report.summary())
    return 0
