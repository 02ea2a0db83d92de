"""The decoder head's C++ kernel (upsample_sum's ``cpp`` backend, inference form) and the
``project`` argument on every CPU backend: against the fp64 reference over odd sizes, bf16
against an fp32 gold, autocast, dispatch, banding of the torch backend, bad input."""
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from fastseg import SegFormer, parity
from fastseg.ops import decoder_upsample_fuse as duf
from fastseg.ops import dispatch, upsample_sum, upsample_sum_reference, use_backend

needs_cpp = pytest.mark.skipif(not duf._has_cpp_op(), reason="the compiled extension (with decoder_head) is not built")


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Deterministic mode fills every torch.empty with NaN: a pixel the kernel never writes fails."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous)


def head_case(B, out_hw, sizes, E, C1, K, seed=0):
    """Stage 1 as (x, M) at output size plus resized maps at ``sizes``, bias, classifier."""
    g = torch.Generator().manual_seed(seed)
    H, W = out_hw
    x = torch.randn(B, H, W, C1, generator=g)
    M = torch.randn(E, C1, generator=g) / C1 ** 0.5
    maps = [torch.randn(B, h, w, E, generator=g) for h, w in sizes]
    bias = torch.randn(E, generator=g)
    cw, cb = torch.randn(K, E, generator=g) / E ** 0.5, torch.randn(K, generator=g)
    return x, M, maps, bias, cw, cb


def gold(x, M, maps, bias, cw, cb, out_hw, relu=True, classify=True):
    d = torch.float64
    return upsample_sum_reference([m.to(d) for m in maps], out_hw, None if bias is None else bias.to(d), relu,
                                  cw.to(d) if classify else None, cb.to(d) if classify and cb is not None else None,
                                  project=None if x is None else (x.to(d), M.to(d)))


CASES = [  # (B, out size, map sizes): the pyramid of a 97x131 image, tiny maps, a downsample, one row
    (2, (25, 33), [(13, 17), (7, 9), (4, 5)]),
    (1, (16, 12), [(8, 6), (4, 3), (2, 2)]),
    (2, (3, 5), [(1, 1)]),
    (1, (6, 4), [(9, 3)]),
    (1, (1, 7), [(1, 2)]),
    (3, (40, 1), []),
]


@needs_cpp
@pytest.mark.parametrize("B,out_hw,sizes", CASES)
@pytest.mark.parametrize("E,C1,K", [(24, 8, 5), (33, 3, 150)])
def test_cpp_head_matches_fp64_reference(B, out_hw, sizes, E, C1, K):
    x, M, maps, bias, cw, cb = head_case(B, out_hw, sizes, E, C1, K)
    with torch.no_grad(), use_backend("cpp"):
        got = upsample_sum(maps, out_hw, bias, True, cw, cb, project=(x, M))
    assert got.shape == (B, *out_hw, K) and got.dtype == torch.float32
    assert rel_err(got, gold(x, M, maps, bias, cw, cb, out_hw)) < 1e-5


@needs_cpp
@pytest.mark.parametrize("relu,classify,with_bias,with_project", [
    (False, False, True, True), (True, False, False, True), (False, True, True, False), (True, True, False, False)])
def test_cpp_head_optional_parts(relu, classify, with_bias, with_project):
    out_hw, sizes = (25, 33), [(25, 33), (13, 17), (4, 5)]  # a map already at output size too
    x, M, maps, bias, cw, cb = head_case(2, out_hw, sizes, 20, 7, 6)
    bias = bias if with_bias else None
    x, M = (x, M) if with_project else (None, None)
    with torch.no_grad(), use_backend("cpp"):
        got = upsample_sum(maps, out_hw, bias, relu, cw if classify else None, cb if classify else None,
                           project=None if x is None else (x, M))
    want = gold(x, M, maps, bias, cw, cb, out_hw, relu, classify)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5


@needs_cpp
def test_cpp_head_without_classifier_bias():
    x, M, maps, bias, cw, _ = head_case(1, (25, 33), [(13, 17)], 16, 5, 4)
    with torch.no_grad(), use_backend("cpp"):
        got = upsample_sum(maps, (25, 33), bias, True, cw, None, project=(x, M))
    assert rel_err(got, gold(x, M, maps, bias, cw, None, (25, 33))) < 1e-5


@needs_cpp
@pytest.mark.parametrize("B,out_hw,sizes", CASES[:3])
def test_cpp_head_bf16_within_2x_eager(B, out_hw, sizes):
    """bf16 judged against an fp32 gold: the kernel's error is at most twice eager bf16's own."""
    x, M, maps, bias, cw, cb = head_case(B, out_hw, sizes, 64, 16, 19, seed=3)
    want = gold(x, M, maps, bias, cw, cb, out_hw).float()
    lp = torch.bfloat16
    args = ([m.to(lp) for m in maps], out_hw, bias.to(lp), True, cw.to(lp), cb.to(lp))
    with torch.no_grad():
        eager = upsample_sum_reference(*args, project=(x.to(lp), M.to(lp)))
        with use_backend("cpp"):
            got = upsample_sum(*args, project=(x.to(lp), M.to(lp)))
    assert got.dtype == lp
    ok, why = parity.judge(parity.errors(got, want), parity.errors(eager, want), low_precision=True)
    assert ok, why


@needs_cpp
def test_cpp_head_under_autocast_takes_fp32_stage1():
    """Under CPU autocast the encoder's stage-1 features are fp32 and the maps bf16, as in a model."""
    out_hw = (25, 33)
    x, M, maps, bias, cw, cb = head_case(2, out_hw, [(13, 17), (7, 9)], 32, 8, 7, seed=5)
    want = gold(x, M, maps, bias, cw, cb, out_hw).float()
    lp_maps = [m.bfloat16() for m in maps]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        eager = upsample_sum_reference(lp_maps, out_hw, bias, True, cw, cb, project=(x, M))
        with use_backend("cpp"):
            got = upsample_sum(lp_maps, out_hw, bias, True, cw, cb, project=(x, M))
    assert got.dtype == torch.bfloat16
    ok, why = parity.judge(parity.errors(got, want), parity.errors(eager, want), low_precision=True)
    assert ok, why


def test_torch_backend_project_banded_and_whole(monkeypatch):
    """The torch backend builds the projection band by band in inference, whole with autograd."""
    out_hw = (25, 33)
    x, M, maps, bias, cw, cb = head_case(2, out_hw, [(13, 17), (7, 9), (4, 5)], 24, 8, 5)
    monkeypatch.setattr(duf, "BAND_ELEMENTS", 2 * 33 * 24 * 3)  # 3 rows per band: 9 bands
    with torch.no_grad(), use_backend("torch"):
        got = upsample_sum(maps, out_hw, bias, True, cw, cb, project=(x, M))
    assert rel_err(got, gold(x, M, maps, bias, cw, cb, out_hw)) < 1e-5
    xg, Mg = x.double().requires_grad_(), M.double().requires_grad_()
    with use_backend("torch"):
        s = upsample_sum([m.double() for m in maps], out_hw, bias.double(), project=(xg, Mg))
    s_gold = upsample_sum_reference([m.double() for m in maps], out_hw, bias.double(), project=(x.double(), M.double()))
    assert rel_err(s, s_gold) < 1e-12
    s.backward(torch.ones_like(s))
    assert rel_err(Mg.grad, torch.ones_like(s).flatten(0, 2).t() @ x.double().flatten(0, 2)) < 1e-12


@needs_cpp
def test_dispatch_picks_cpp_for_cpu_inference_only():
    x, M, maps, bias, cw, cb = head_case(1, (16, 12), [(8, 6)], 8, 4, 3)
    facts = dict(device=torch.device("cpu"), inference_form=True)
    assert dispatch.choose("decoder_upsample_fuse", dtype=torch.float32, needs_grad=False, **facts).backend == "cpp"
    assert dispatch.choose("decoder_upsample_fuse", dtype=torch.bfloat16, needs_grad=False, **facts).backend == "cpp"
    assert dispatch.choose("decoder_upsample_fuse", dtype=torch.float64, needs_grad=False, **facts).backend == "torch"
    assert dispatch.choose("decoder_upsample_fuse", dtype=torch.float32, needs_grad=True, **facts).backend == "torch"
    with pytest.raises(dispatch.BackendUnavailable, match="no backward"):
        with use_backend("cpp"):
            upsample_sum([maps[0].requires_grad_()], (16, 12), bias)


def test_project_bad_input():
    x, M, maps, bias, cw, cb = head_case(1, (16, 12), [(8, 6)], 8, 4, 3)
    with pytest.raises(ValueError, match="1 to 4 maps"):
        upsample_sum([], (16, 12))
    with pytest.raises(ValueError, match="project's x"):
        upsample_sum(maps, (16, 12), project=(x[:, :8], M))
    with pytest.raises(ValueError, match="project's weight"):
        upsample_sum(maps, (16, 12), project=(x, M[:, :3]))
    with pytest.raises(ValueError, match="channels"):
        upsample_sum(maps, (16, 12), project=(x, torch.randn(9, 4)))
    with pytest.raises(ValueError, match="pair"):
        upsample_sum(maps, (16, 12), project=x)


@needs_cpp
def test_fused_b0_eval_uses_cpp_head_and_matches_reference():
    torch.manual_seed(0)
    ref = SegFormer("b0", num_classes=9).eval()
    fused = SegFormer("b0", num_classes=9).eval().set_fused(True)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 97, 131)
    with torch.inference_mode():
        want = ref(x)
        choice = dispatch.choose("decoder_upsample_fuse", device=x.device, dtype=x.dtype, needs_grad=False,
                                 inference_form=True)
        got = fused(x)
    assert choice.backend == "cpp"
    assert rel_err(got, want) < 1e-4
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.999
