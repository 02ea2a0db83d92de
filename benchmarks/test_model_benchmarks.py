"""End-to-end benchmarks: SegFormer forward (inference) and forward + backward (a training
step), eager vs fused (vs torch.compile of the eager model, compile time excluded)."""
import copy

import pytest
import torch

from conftest import COMPILE, DEVICE, DTYPE, MODEL_CASES, case_id, check_parity, run_benchmark
from fastseg import SegFormer
from fastseg.bench import generated_image
from fastseg.models.segformer import DropPath

IMPLS = ["eager", "fused"] + (["compile"] if COMPILE else [])
_models: dict = {}


def models(variant):
    """One set of weights per variant, shared by every implementation."""
    if variant not in _models:
        torch.manual_seed(0)
        eager = SegFormer(variant, num_classes=150).to(DEVICE, DTYPE)
        for m in eager.modules():  # no stochastic layers: every implementation computes the same
            if isinstance(m, (DropPath, torch.nn.Dropout2d)):
                m.p = 0.0
        _models[variant] = {"eager": eager, "fused": copy.deepcopy(eager).set_fused(True)}
        if DTYPE != torch.float32:  # low precision is judged against an fp32 gold (fastseg.parity)
            _models[variant]["gold"] = copy.deepcopy(eager).float()
    return _models[variant]


def gold_output(variant, x, train=False):
    """The eager model's fp32 output on ``x``, or None when the suite itself runs in fp32."""
    gold = models(variant).get("gold")
    if gold is None:
        return None
    with torch.inference_mode():
        return gold.train(train)(x.float())


def model_for(variant, impl):
    pair = models(variant)
    if impl == "compile":
        return torch.compile(pair["eager"])
    return pair[impl]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", MODEL_CASES, ids=case_id)
def test_forward(benchmark, impl, case):
    variant, B, H, W = case
    x = generated_image(H, W).repeat(B, 1, 1, 1).to(DEVICE, DTYPE)
    model = model_for(variant, impl).eval()

    def fn():
        with torch.inference_mode():
            return model(x)

    err = None
    if impl != "eager":
        ref_model = models(variant)["eager"].eval()
        with torch.inference_mode():
            err = check_parity(fn(), ref_model(x), f"SegFormer-{variant} {impl}", gold=gold_output(variant, x))
    run_benchmark(benchmark, fn, group=f"SegFormer forward {case_id(case)}", impl=impl, error=err)


@pytest.mark.parametrize("impl", ["eager", "fused"] + (["compile"] if COMPILE and DEVICE.type == "cuda" else []))
@pytest.mark.parametrize("case", MODEL_CASES[:2], ids=case_id)
def test_training_step(benchmark, impl, case):
    variant, B, H, W = case
    B = max(B, 2)  # training-mode BatchNorm needs more than one value per channel
    x = generated_image(H, W).repeat(B, 1, 1, 1).to(DEVICE, DTYPE)
    model = model_for(variant, impl).train()

    def fn():
        for p in model.parameters():
            p.grad = None
        out = model(x)
        out.float().square().mean().backward()
        return out

    err = None
    if impl != "eager":
        ref_model = models(variant)["eager"].train()
        err = check_parity(fn().detach(), ref_model(x).detach(), f"SegFormer-{variant} train {impl}",
                           gold=gold_output(variant, x, train=True))
    run_benchmark(benchmark, fn, group=f"SegFormer forward+backward {case_id((variant, B, H, W))}", impl=impl, error=err)
