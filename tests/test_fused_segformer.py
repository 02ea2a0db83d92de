"""The fused SegFormer (CPU `torch` backends here; Triton where forced / on GPU) against the
reference path on the same weights: decoder rewrite in eval and training, every variant."""
import copy

import pytest
import torch

from conftest import rel_err
from fastseg import SegFormer, SegFormerConfig
from fastseg.models.config import VARIANTS
from fastseg.ops import upsample_sum, upsample_sum_reference, use_backend
from oracles import randomize_

# Triton runs real kernels on CUDA; without a GPU, CPU tensors go through its interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def pair(variant="b0", decoder="mlp", classes=7, **cfg):
    config = SegFormerConfig.from_variant(variant, num_classes=classes, decoder=decoder, **cfg)
    ref = randomize_(SegFormer(config=config))
    fused = copy.deepcopy(ref).set_fused(True)
    return ref, fused


def assert_grads_match(fused, ref, gold):
    """Parameter gradients of the fused fp32 model against an fp64 gold model.

    Each gradient is judged relative to its own magnitude, floored at 1% of the model's largest
    gradient: the biases feeding a training-mode BN, and q where Nkv = 1, have gradients that are
    zero up to rounding. Deep in a random network fp32 rounding is amplified, so the bar is 1e-4
    or twice the eager fp32 model's error, whichever is larger.
    """
    gold_params = dict(gold.named_parameters())
    fused_params, ref_params = dict(fused.named_parameters()), dict(ref.named_parameters())
    floor = 1e-2 * max(p.grad.abs().max().item() for p in gold_params.values())
    for name, g in gold_params.items():
        q = fused_params[name]
        assert q.grad is not None, f"no gradient reached {name}"
        scale = max(g.grad.abs().max().item(), floor)
        err = (q.grad.double() - g.grad).abs().max().item() / scale
        eager_err = (ref_params[name].grad.double() - g.grad).abs().max().item() / scale
        assert err <= max(1e-4, 2 * eager_err), f"{name}: fused {err:.2e}, eager {eager_err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoder", ["mlp", "mmseg"])
@pytest.mark.parametrize("H,W", [(61, 47), (33, 95)])
def test_eval_logits_match_the_reference(backend, decoder, H, W):
    ref, fused = pair(decoder=decoder)
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    x = torch.randn(2, 3, H, W, device=DEVICE)
    with torch.no_grad(), use_backend(backend):
        want, got = ref.eval()(x), fused.eval()(x)
        assert fused.backends()["decoder_upsample_fuse"].backend == backend
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.999


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoder", ["mlp", "mmseg"])
def test_training_step_matches_grads_and_bn_statistics(backend, decoder):
    # No stochastic layers, so every path computes the same function; gold is the reference in fp64.
    # Smaller under the Triton interpreter (slow): one block per stage (every kernel still runs in
    # each stage), and at 37x41 stage 1 has Nkv = 1, so dq is zero up to rounding.
    interpreted = backend == "triton" and DEVICE == "cpu"
    ref, fused = pair(decoder=decoder, drop_path_rate=0.0, decoder_dropout=0.0,
                      **({"depths": (1, 1, 1, 1)} if interpreted else {}))
    gold = copy.deepcopy(ref).double()
    for model in (ref, fused, gold):
        model.train().to(DEVICE)
    H, W = (37, 41) if interpreted else (69, 75)
    x = torch.randn(2, 3, H, W, device=DEVICE)
    grad = torch.randn(2, 7, (H + 3) // 4, (W + 3) // 4, device=DEVICE)
    with use_backend(backend):
        fused(x).backward(grad)
    ref(x).backward(grad)
    gold(x.double()).backward(grad.double())
    assert_grads_match(fused, ref, gold)
    # BN running statistics update as in eager (momentum, unbiased variance, batch counter).
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_fused_matches(variant):
    ref, fused = pair(variant, classes=19)
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    x = torch.randn(1, 3, 67, 53, device=DEVICE)
    with torch.no_grad():
        want, got = ref.eval()(x), fused.eval()(x)
    assert rel_err(got, want) < 1e-4
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.999


def test_features_are_channels_last_views_on_the_fused_path():
    ref, fused = pair()
    with torch.no_grad():
        feats = fused.eval().forward_features(torch.randn(1, 3, 64, 48))
    for f in feats:
        assert f.is_contiguous(memory_format=torch.channels_last)
        assert not f.is_contiguous() or f.shape[2] * f.shape[3] == 1


# --- the upsample_sum op -------------------------------------------------------------------------

def pyramid(B, E, sizes, dtype=torch.float32, requires_grad=False):
    return [torch.randn(B, h, w, E, dtype=dtype, requires_grad=requires_grad) for h, w in sizes]


@pytest.mark.parametrize("sizes,out", [
    ([(16, 12), (8, 6), (4, 3), (2, 2)], (16, 12)),
    ([(15, 11), (8, 6), (4, 3), (2, 2)], (15, 11)),
    ([(25, 33), (13, 17), (7, 9), (4, 5)], (25, 33)),  # the stages of a 97x131 image: no ratio divides
    ([(5, 7), (9, 3)], (6, 4)),  # a downsampling resize too
    ([(1, 1)], (3, 5)),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_upsample_sum_forward_and_backward(sizes, out, backend):
    E, K = 24, 5
    maps = [m.to(DEVICE).requires_grad_() for m in pyramid(2, E, sizes)]
    bias = torch.randn(E, device=DEVICE, requires_grad=True)
    w, b = torch.randn(K, E, device=DEVICE), torch.randn(K, device=DEVICE)
    gold_maps = [m.detach().double().requires_grad_() for m in maps]
    gold_bias = bias.detach().double().requires_grad_()
    with torch.no_grad(), use_backend(backend):  # inference form: ReLU + classifier inside
        got = upsample_sum([m.detach() for m in maps], out, bias.detach(), True, w, b)
    want = upsample_sum_reference(gold_maps, out, gold_bias, True, w.double(), b.double())
    assert got.shape == (2, *out, K) and rel_err(got, want.detach()) < 1e-5
    with use_backend(backend):  # training form, differentiable
        s = upsample_sum(maps, out, bias)
    s_gold = upsample_sum_reference(gold_maps, out, gold_bias)
    assert rel_err(s, s_gold.detach()) < 1e-5
    g = torch.randn_like(s_gold)
    s.backward(g.float())
    s_gold.backward(g)
    for m, gm in zip(maps, gold_maps):
        assert rel_err(m.grad, gm.grad) < 1e-5
    assert rel_err(bias.grad, gold_bias.grad) < 1e-5


def test_upsample_sum_bad_input():
    with pytest.raises(ValueError, match="1 to 4"):
        upsample_sum([], (4, 4))
    with pytest.raises(ValueError, match="channels"):
        upsample_sum([torch.randn(1, 4, 4, 8), torch.randn(1, 2, 2, 6)], (4, 4))
    with pytest.raises(TypeError, match="float64"):
        upsample_sum([torch.randn(1, 4, 4, 8), torch.randn(1, 2, 2, 8, dtype=torch.float64)], (4, 4))


def test_inference_fold_cache_never_serves_stale_weights():
    ref, fused = pair()
    ref.eval(), fused.eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.inference_mode():
        fused(x)  # fills the cache
    with torch.no_grad():
        for model in (ref, fused):  # an in-place update, like an optimiser step
            model.decoder.linear_fuse.weight.mul_(1.5)
            model.decoder.bn.running_var.add_(0.5)
        assert rel_err(fused(x), ref(x)) < 1e-4
    fused.load_state_dict(SegFormer("b0", num_classes=7).state_dict())
    ref.load_state_dict(fused.state_dict())
    with torch.inference_mode():
        assert rel_err(fused(x), ref(x)) < 1e-4


@pytest.mark.parametrize("training", [False, True])
def test_odd_image_97x131_train_and_eval(training):
    """Stages of 25x33, 13x17, 7x9, 4x5: bilinear source and destination never divide. In fp64
    (the CPU fused path runs it), so the rewrite must reproduce the reference to ~1e-10: a check
    of the math itself, free of fp32 rounding noise."""
    ref, fused = pair(drop_path_rate=0.0, decoder_dropout=0.0)
    ref, fused = ref.double().train(training), fused.double().train(training)
    x = torch.randn(2, 3, 97, 131, dtype=torch.float64)
    with torch.set_grad_enabled(training):
        want, got = ref(x), fused(x)
    assert got.shape == (2, 7, 25, 33)
    assert rel_err(got.detach(), want.detach()) < 1e-10
    if training:
        target = torch.randint(0, 7, (2, 25, 33))
        loss_ref = torch.nn.functional.cross_entropy(want, target)
        loss_fused = torch.nn.functional.cross_entropy(got, target)
        assert abs(loss_fused.item() - loss_ref.item()) < 1e-10 * loss_ref.item()
        loss_ref.backward()
        loss_fused.backward()
        floor = 1e-6 * max(p.grad.abs().max().item() for p in ref.parameters())
        for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
            scale = max(p.grad.abs().max().item(), floor)
            assert (q.grad - p.grad).abs().max().item() / scale < 1e-8, name
