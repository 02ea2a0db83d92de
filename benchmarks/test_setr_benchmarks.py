"""End-to-end SETR-PUP forward (inference), eager vs fused (vs torch.compile of the eager model,
compile time excluded). Each entry first checks that the implementation agrees with eager.

Sizes by mode (see conftest.py): QUICK a small ViT (4 blocks, dim 128) at 64×64; CPU default
ViT-B at 256² batch 1; GPU ViT-L at 512² batch 1 and 8 (bf16).
"""
import copy

import pytest
import torch

from conftest import COMPILE, DEVICE, DTYPE, QUICK, check_parity, run_benchmark
from fastseg import SETR, SETRConfig
from fastseg.bench import generated_image

if QUICK:
    CASES = [("tiny", 1, 64, 64)]
elif DEVICE.type == "cuda":
    CASES = [("vit_large_patch16", 1, 512, 512), ("vit_large_patch16", 8, 512, 512)]
else:
    CASES = [("vit_base_patch16", 1, 256, 256)]

IMPLS = ["eager", "fused"] + (["compile"] if COMPILE else [])
_models: dict = {}


def config(encoder: str, size: int) -> SETRConfig:
    if encoder == "tiny":
        return SETRConfig(decoder="pup", encoder=None, embed_dim=128, depth=4, num_heads=2, out_indices=(0, 1, 2, 3),
                          img_size=size, head_channels=64, num_classes=150)
    return SETRConfig.create(encoder, "pup", num_classes=150, img_size=size)


def models(encoder: str, size: int):
    """One set of weights per encoder, shared by every implementation (eval: no dropout)."""
    key = (encoder, size)
    if key not in _models:
        torch.manual_seed(0)
        eager = SETR(config=config(encoder, size)).to(DEVICE, DTYPE).eval()
        _models[key] = {"eager": eager, "fused": copy.deepcopy(eager).set_fused(True)}
    return _models[key]


def case_name(case) -> str:
    encoder, B, H, W = case
    return f"{encoder}-{B}-{H}-{W}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_setr_pup_forward(benchmark, impl, case):
    encoder, B, H, W = case
    pair = models(encoder, H)
    model = torch.compile(pair["eager"]) if impl == "compile" else pair[impl]
    x = generated_image(H, W).repeat(B, 1, 1, 1).to(DEVICE, DTYPE)

    def fn():
        with torch.inference_mode():
            return model(x)

    err = None
    if impl != "eager":
        with torch.inference_mode():
            err = check_parity(fn(), pair["eager"](x), f"SETR-PUP {encoder} {impl}")
    run_benchmark(benchmark, fn, group=f"SETR-PUP forward {case_name(case)}", impl=impl, error=err)
