"""The fused CPU path in bf16 — under autocast and with bf16 weights — held to the DESIGN rule:
its error against an fp32 gold is at most 2x the eager bf16 error; and fused weights made under
inference_mode (inference tensors, no version counter) still run."""
import copy

import pytest
import torch

from fastseg import SegFormer, SegFormerConfig, parity
from oracles import randomize_


def _models(decoder):
    config = SegFormerConfig.from_variant("b0", num_classes=19, decoder=decoder)
    ref = randomize_(SegFormer(config=config)).eval()
    return ref, copy.deepcopy(ref).set_fused(True)


def _check(fused_out, eager_out, gold):
    mine, eager = parity.errors(fused_out, gold), parity.errors(eager_out, gold)
    assert eager["rms_rel_err"] > 1e-4, "eager bf16 should differ from the fp32 gold"
    ok, why = parity.judge(mine, eager, low_precision=True)
    assert ok, why


@pytest.mark.parametrize("decoder", ["mlp", "mmseg"])
def test_fused_under_bf16_autocast(decoder):
    ref, fused = _models(decoder)
    x = torch.randn(2, 3, 61, 47)
    with torch.inference_mode():
        gold = ref(x)
        with torch.autocast("cpu", torch.bfloat16):
            eager_out, fused_out = ref(x), fused(x)
            again = fused(x)  # the folded-weight cache is keyed on the autocast state
        fp32_again = fused(x)
    assert fused_out.dtype == torch.bfloat16 and fp32_again.dtype == torch.float32
    assert torch.equal(again, fused_out)
    _check(fused_out, eager_out, gold)
    assert parity.errors(fp32_again, gold)["max_rel_err"] < 1e-4


def test_fused_with_bf16_weights():
    ref, fused = _models("mlp")
    x = torch.randn(1, 3, 45, 77)
    with torch.inference_mode():
        gold = ref(x)
        eager_out = ref.to(torch.bfloat16)(x.bfloat16())
        fused_out = fused.to(torch.bfloat16)(x.bfloat16())
    assert fused_out.dtype == torch.bfloat16
    _check(fused_out, eager_out, gold)


def test_fused_model_built_under_inference_mode():
    ref, _ = _models("mlp")
    x = torch.randn(1, 3, 40, 36)
    with torch.inference_mode():
        fused = copy.deepcopy(ref).set_fused(True)  # every weight is an inference tensor
        assert next(fused.parameters()).is_inference()
        got, want = fused(x), ref(x)
        again = fused(x)
    assert torch.equal(got, again)
    assert parity.errors(got, want)["max_rel_err"] < 1e-4


@pytest.mark.parametrize("cin,cout,k,s,p,B,H,W", [
    (160, 160, 2, 2, 0, 2, 4, 3),   # SegFormer stage-3 spatial reduction, a one-column output
    (32, 64, 3, 2, 1, 3, 9, 1),     # stage-2 patch embedding of a one-column map
    (64, 64, 4, 4, 0, 2, 9, 5),
])
def test_conv2d_guards_the_bf16_one_column_bug(cin, cout, k, s, p, B, H, W):
    """oneDNN's bf16 conv returns garbage when Wo == 1 (torch 2.13 CPU); ops.conv2d must not,
    in the forward and in both gradients, with bf16 tensors and under autocast."""
    from fastseg.ops import conv2d

    x = torch.randn(B, cin, H, W).bfloat16()
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).bfloat16()
    b = torch.randn(cout).bfloat16()
    gold_x, gold_w, gold_b = (t.double().requires_grad_() for t in (x, w, b))
    gold = torch.nn.functional.conv2d(gold_x, gold_w, gold_b, s, p)
    assert gold.shape[-1] == 1
    grad = torch.randn_like(gold)
    gold.backward(grad)
    for autocast in (False, True):
        xi, wi, bi = ((t.float() if autocast else t).clone().requires_grad_() for t in (x, w, b))
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = conv2d(xi, wi, bi, s, p)
        assert y.dtype == torch.bfloat16
        y.backward(grad.to(y.dtype))
        for got, want in ((y, gold), (xi.grad, gold_x.grad), (wi.grad, gold_w.grad), (bi.grad, gold_b.grad)):
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert err < 2e-2, err


def test_conv2d_is_plain_conv2d_elsewhere():
    from fastseg.ops import conv2d

    x, w = torch.randn(2, 16, 9, 8).bfloat16(), torch.randn(16, 16, 2, 2).bfloat16()
    assert torch.equal(conv2d(x, w, None, 2), torch.nn.functional.conv2d(x, w, None, 2))
    x, w = torch.randn(2, 16, 9, 3), torch.randn(16, 16, 2, 2)  # fp32 with one column: untouched
    assert torch.equal(conv2d(x, w, None, 2), torch.nn.functional.conv2d(x, w, None, 2))
