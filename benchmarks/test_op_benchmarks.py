"""Per-op benchmarks: eager reference vs fused op (vs torch.compile of the reference), same inputs.

Shapes are SegFormer's at the image sizes of the run mode (see conftest.py); every entry first
checks that the fused output agrees with the eager one.
"""
import pytest
import torch

from conftest import COMPILE, DEVICE, DTYPE, OP_IMAGE_SIZES, case_id, check_parity, run_benchmark
from fastseg import ops
from fastseg.models.segformer import AllMLPDecoder
from fastseg.ops.sr_attention import sr_attention_torch
from fastseg.timing import attention_cost, decoder_cost, dwconv_gelu_cost, patch_embed_cost

IMPLS = ["eager", "fused"] + (["compile"] if COMPILE else [])
# fwd+bwd cost: the forward's bytes/FLOPs, plus the backward's (about 2x the bytes: q, k, v, o,
# do read, dq, dkv written; and 2.5x the FLOPs: recomputed scores, dV, dP, dQ, dK) — a floor.
ITEM = torch.tensor([], dtype=DTYPE).element_size()


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _pick(impl, eager, fused):
    return {"eager": eager, "fused": fused, "compile": _compiled(eager) if impl == "compile" else None}[impl]


# (stage, channels, heads, sr) of B0 and B2 stage 1 and 2
ATTENTION_STAGES = [("b0-s1", 32, 1, 8, 4), ("b0-s2", 64, 2, 4, 8), ("b2-s1", 64, 1, 8, 4)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stage", ATTENTION_STAGES, ids=lambda s: s[0])
@pytest.mark.parametrize("size", OP_IMAGE_SIZES, ids=case_id)
def test_sr_attention(benchmark, impl, stage, size):
    name, C, heads, sr, stride = stage
    B, H, W = size
    h, w = H // stride, W // stride
    N, Nkv = h * w, (h // sr) * (w // sr)
    q = torch.randn(B, N, C, device=DEVICE, dtype=DTYPE)
    kv = torch.randn(B, Nkv, 2 * C, device=DEVICE, dtype=DTYPE)
    scale = (C // heads) ** -0.5
    eager = lambda: ops.sr_attention_reference(q, kv, heads, scale)  # noqa: E731
    fused = lambda: ops.sr_attention(q, kv, heads, scale)  # noqa: E731
    fn = _pick(impl, eager, fused)
    err = check_parity(fn(), eager(), f"sr_attention {impl}") if impl != "eager" else None
    run_benchmark(benchmark, fn, group=f"sr_attention {name} {case_id(size)}", impl=impl,
                  cost=attention_cost(B, N, Nkv, C, heads, ITEM), error=err)


@pytest.mark.parametrize("impl", ["eager", "fused", "sdpa"])
@pytest.mark.parametrize("stage", ATTENTION_STAGES[:2], ids=lambda s: s[0])
@pytest.mark.parametrize("size", OP_IMAGE_SIZES, ids=case_id)
def test_sr_attention_forward_backward(benchmark, impl, stage, size):
    """Forward + backward: the fused op keeps no N x Nkv scores (compare peak memory)."""
    name, C, heads, sr, stride = stage
    B, H, W = size
    h, w = H // stride, W // stride
    N, Nkv = h * w, (h // sr) * (w // sr)
    q = torch.randn(B, N, C, device=DEVICE, dtype=DTYPE, requires_grad=True)
    kv = torch.randn(B, Nkv, 2 * C, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad = torch.randn(B, N, C, device=DEVICE, dtype=DTYPE)
    scale = (C // heads) ** -0.5
    op = {"eager": ops.sr_attention_reference, "fused": ops.sr_attention,
          "sdpa": sr_attention_torch}[impl]

    def fn():
        q.grad = kv.grad = None
        out = op(q, kv, heads, scale)
        out.backward(grad)
        return out

    err = None
    if impl != "eager":
        got, dq = fn().detach(), q.grad.clone()
        want = fn_eager = ops.sr_attention_reference(q, kv, heads, scale)
        q.grad = None
        fn_eager.backward(grad)
        err = check_parity(got, want.detach(), f"sr_attention fwd {impl}")
        check_parity(dq, q.grad, f"sr_attention dq {impl}")
    cost = attention_cost(B, N, Nkv, C, heads, ITEM)
    run_benchmark(benchmark, fn, group=f"sr_attention fwd+bwd {name} {case_id(size)}", impl=impl,
                  cost=type(cost)(cost.bytes * 3, cost.flops * 3.5), error=err)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dim", [32, 64], ids=lambda c: f"hidden{4 * c}")
@pytest.mark.parametrize("size", OP_IMAGE_SIZES, ids=case_id)
def test_dwconv3x3_gelu(benchmark, impl, dim, size):
    B, H, W = size
    h, w, C = H // 4, W // 4, 4 * dim
    x = torch.randn(B, h * w, C, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(C, 1, 3, 3, device=DEVICE, dtype=DTYPE) / 3
    bias = torch.randn(C, device=DEVICE, dtype=DTYPE)
    eager = lambda: ops.dwconv3x3_gelu_reference(x, h, w, weight, bias)  # noqa: E731
    fused = lambda: ops.dwconv3x3_gelu(x, h, w, weight, bias)  # noqa: E731
    fn = _pick(impl, eager, fused)
    err = check_parity(fn(), eager(), f"dwconv3x3_gelu {impl}") if impl != "eager" else None
    run_benchmark(benchmark, fn, group=f"dwconv3x3_gelu {C}ch {case_id(size)}", impl=impl,
                  cost=dwconv_gelu_cost(B, h * w, C, ITEM), error=err)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dim", [32, 64], ids=lambda c: f"hidden{4 * c}")
@pytest.mark.parametrize("size", OP_IMAGE_SIZES, ids=case_id)
def test_dwconv3x3_gelu_backends(benchmark, backend, dim, size):
    """The Mix-FFN middle step per backend, fc1 included: ``torch`` runs fc1 with its bias (addmm
    copies it into the output first) then the stock conv + GELU; ``cpp`` runs fc1 without bias and
    the C++ kernel adds it to the conv's input taps."""
    backend_obj = next(b for b in ops.dispatch.backends_of("dwconv3x3_gelu") if b.name == backend)
    why = backend_obj.not_supported_reasons(device=torch.device(DEVICE), dtype=DTYPE)
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    B, H, W = size
    h, w, C = H // 4, W // 4, 4 * dim
    tokens = torch.randn(B, h * w, dim, device=DEVICE, dtype=DTYPE)
    w1 = torch.randn(C, dim, device=DEVICE, dtype=DTYPE) / dim ** 0.5
    b1 = torch.randn(C, device=DEVICE, dtype=DTYPE) / 4
    weight = torch.randn(C, 1, 3, 3, device=DEVICE, dtype=DTYPE) / 3
    bias = torch.randn(C, device=DEVICE, dtype=DTYPE)

    def eager():
        return ops.dwconv3x3_gelu_reference(torch.nn.functional.linear(tokens, w1, b1), h, w, weight, bias)

    def fn():
        with ops.use_backend(backend):
            if backend == "torch":
                return ops.dwconv3x3_gelu(torch.nn.functional.linear(tokens, w1, b1), h, w, weight, bias)
            return ops.dwconv3x3_gelu(torch.nn.functional.linear(tokens, w1), h, w, weight, bias, in_bias=b1)

    with torch.inference_mode():
        err = check_parity(fn(), eager(), f"dwconv3x3_gelu {backend}")
        run_benchmark(benchmark, fn, group=f"fc1 + dwconv3x3_gelu {C}ch {case_id(size)}", impl=backend,
                      cost=dwconv_gelu_cost(B, h * w, C, ITEM), error=err)


DECODERS = [("b0", (32, 64, 160, 256), 256), ("b2", (64, 128, 320, 512), 768)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", DECODERS, ids=lambda d: d[0])
@pytest.mark.parametrize("size", OP_IMAGE_SIZES, ids=case_id)
def test_decoder(benchmark, impl, head, size):
    """The whole All-MLP head in eval (ADE20K's 150 classes): eager concat vs the fused rewrite."""
    name, dims, E = head
    B, H, W = size
    K = 150
    decoder = AllMLPDecoder(dims, E, K, 0.1).to(DEVICE, DTYPE).eval()
    feats = [torch.randn(B, H // s, W // s, c, device=DEVICE, dtype=DTYPE).permute(0, 3, 1, 2)
             for c, s in zip(dims, (4, 8, 16, 32))]

    def run(fused):
        decoder.fused = fused
        with torch.inference_mode():
            return decoder(feats)

    eager, fused = (lambda: run(False)), (lambda: run(True))
    fn = _pick(impl, eager, fused)
    err = check_parity(fn(), eager(), f"decoder {impl}") if impl != "eager" else None
    small = sum((H // s) * (W // s) for s in (8, 16, 32))
    run_benchmark(benchmark, fn, group=f"decoder {name} {case_id(size)}", impl=impl,
                  cost=decoder_cost(B, H // 4, W // 4, E, K, small, ITEM), error=err)


# name, Cin, C, kernel, stride, input stride: B0's stages 1 and 2, B2's stage 4 (the widest)
EMBEDS = [("s1", 3, 32, 7, 4, 1), ("s2", 32, 64, 3, 2, 4), ("b2-s4", 320, 512, 3, 2, 16)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("embed", EMBEDS, ids=lambda e: e[0])
@pytest.mark.parametrize("size", OP_IMAGE_SIZES, ids=case_id)
def test_overlap_patch_embed(benchmark, impl, embed, size):
    name, Cin, C, k, s, in_stride = embed
    B, H, W = size
    Hi, Wi = H // in_stride, W // in_stride
    x = torch.randn(B, Cin, Hi, Wi, device=DEVICE, dtype=DTYPE)
    if in_stride > 1:  # stages 2-4 read the previous stage's tokens: a channels-last image
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(C, Cin, k, k, device=DEVICE, dtype=DTYPE) / (Cin * k * k) ** 0.5
    bias, lnw, lnb = (torch.randn(C, device=DEVICE, dtype=DTYPE) for _ in range(3))
    eager = lambda: ops.overlap_patch_embed_reference(x, weight, bias, s, lnw, lnb, 1e-5)[0]  # noqa: E731
    fused = lambda: ops.overlap_patch_embed(x, weight, bias, s, lnw, lnb, 1e-5)[0]  # noqa: E731
    fn = _pick(impl, eager, fused)
    err = check_parity(fn(), eager(), f"overlap_patch_embed {impl}") if impl != "eager" else None
    Ho, Wo = (Hi + 2 * (k // 2) - k) // s + 1, (Wi + 2 * (k // 2) - k) // s + 1
    run_benchmark(benchmark, fn, group=f"overlap_patch_embed {name} {case_id(size)}", impl=impl,
                  cost=patch_embed_cost(B, Hi, Wi, Cin, Ho, Wo, C, k, ITEM), error=err)
