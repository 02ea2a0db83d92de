"""fastseg.ops.packed_linear: oneDNN GEMMs with weights packed once (CPU inference), against
F.linear; the cache's invalidation (optimiser step, load_state_dict, .to(), in-place edits, writes
through .data) seen from the fused SegFormer; autograd keeping aten; the memory report; and
torch.compile tracing the op without graph breaks."""
import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from fastseg import SegFormer, SegFormerConfig
from fastseg.ops import packed_linear as pl
from oracles import randomize_



@pytest.fixture(autouse=True)
def onednn_forced():
    """The oneDNN path on for fp32 on any CPU (automatic mode uses it on AVX-512 CPUs only), so
    these tests exercise it here too; restored afterwards."""
    previous = pl._enabled
    pl.set_enabled(True)
    yield
    pl.set_enabled(previous)


pl.set_enabled(True)
ONEDNN = not pl.reasons(torch.float32)  # torch has oneDNN's linear ops, and it is not disabled
pl.set_enabled(pl._env_setting())


def ref_linear(x, w, b, activation):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return {"none": y, "relu": torch.relu(y), "gelu": F.gelu(y)}[activation]


@pytest.mark.parametrize("shape,N", [((7, 13), 5), ((2, 37, 61), 67), ((3, 5, 4, 32), 96)])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_fp32_matches_f_linear(shape, N, has_bias, activation):
    K = shape[-1]
    x, w = torch.randn(shape), torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) if has_bias else None
    with torch.no_grad():
        got = pl.linear(x, w, b, activation)
    assert got.shape == (*shape[:-1], N) and got.dtype == torch.float32
    assert rel_err(got, ref_linear(x, w, b, activation)) <= 1e-5
    if ONEDNN:
        assert pl.packed_weight(w) is not None  # it ran through the oneDNN pack


def test_non_contiguous_input_and_weight_views():
    x = torch.randn(40, 3, 24).transpose(0, 1)  # (3, 40, 24), non-contiguous
    base = torch.randn(2, 33, 24)
    w = base[1]  # a view of a larger tensor
    b = torch.randn(66)[::2]  # a strided bias
    with torch.inference_mode():
        got = pl.linear(x, w, b)
    assert rel_err(got, ref_linear(x, w, b, "none")) <= 1e-5


def test_bf16_within_twice_eager_error():
    """bf16 weights, and fp32 weights under CPU autocast: judged against the fp32 gold."""
    x, w, b = torch.randn(3, 57, 96), torch.randn(80, 96) / 10, torch.randn(80)
    gold = ref_linear(x, w, b, "none")
    eager = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
    eager_err = rel_err(eager, gold)
    with torch.no_grad():
        got = pl.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = pl.linear(x, w, b)
    for y in (got, auto):
        assert y.dtype == torch.bfloat16
        assert rel_err(y, gold) <= 2 * eager_err + 1e-6


def test_autocast_casts_each_weight_once_per_version():
    """Under autocast the bf16 weight (packed or dense) and bias are made once, then reused."""
    w, b = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(10, 32).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pl.linear(x, w, b)
        before = pl.memory()
        with torch.profiler.profile() as prof:
            for _ in range(3):
                y = pl.linear(x, w, b)
    assert pl.memory() == before
    names = [e.name for e in prof.events()]
    assert "aten::_to_copy" not in names, names  # no cast (addmm's own bias copy_ may remain)
    assert rel_err(y, ref_linear(x, w, b, "none")) < 1e-2


def test_cache_reuses_and_invalidates():
    w = torch.randn(24, 16)
    pack = pl.packed_weight(w) if ONEDNN else pl.weight_in(w, torch.bfloat16)
    again = pl.packed_weight(w) if ONEDNN else pl.weight_in(w, torch.bfloat16)
    assert pack is again
    x = torch.randn(5, 16)
    for edit in (lambda: w.add_(1), lambda: w.data.mul_(2), lambda: w.data.copy_(torch.randn(24, 16))):
        with torch.no_grad():
            edit()
            assert rel_err(pl.linear(x, w), ref_linear(x, w, None, "none")) <= 1e-5
            dtype_b = pl.linear(x.bfloat16(), w.bfloat16())
        assert rel_err(dtype_b, ref_linear(x, w, None, "none")) < 2e-2


def test_packs_are_freed_with_their_weight():
    gc.collect()
    base = pl.memory()
    w = torch.randn(64, 32)
    with torch.no_grad():
        pl.linear(torch.randn(3, 32), w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pl.linear(torch.randn(3, 32), w)
    count, nbytes = pl.memory()
    assert count == base[0] + 2 and nbytes >= base[1] + 64 * 32 * (4 + 2)
    del w
    gc.collect()
    assert pl.memory() == base


def test_autograd_keeps_aten_and_gives_eager_gradients():
    lin = torch.nn.Linear(20, 30)
    x = torch.randn(4, 7, 20, requires_grad=True)
    g = torch.randn(4, 7, 30)
    y = pl.linear(x, lin.weight, lin.bias)
    y.backward(g)
    got = (x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    x.grad = None
    lin.zero_grad()
    F.linear(x, lin.weight, lin.bias).backward(g)
    for a, b in zip(got, (x.grad, lin.weight.grad, lin.bias.grad)):
        assert torch.equal(a, b)


def test_automatic_mode_follows_the_cpu():
    pl.set_enabled(None)
    cap = torch.backends.cpu.get_cpu_capability()
    fp32 = pl.reasons(torch.float32)
    assert (not fp32) == (ONEDNN and cap.upper().startswith("AVX512")), (cap, fp32)
    x, w = torch.randn(9, 12), torch.randn(7, 12)
    with torch.no_grad():
        assert rel_err(pl.linear(x, w), ref_linear(x, w, None, "none")) <= 1e-5
    pl.set_enabled(False)
    assert pl.packed_weight(w) is None and pl.choice("cpu", torch.float32).backend == "aten"


def test_bad_input():
    with pytest.raises(ValueError, match="activation"):
        pl.linear(torch.randn(2, 3), torch.randn(4, 3), activation="tanh")
    with torch.no_grad(), pytest.raises(RuntimeError, match="shape"):
        pl.linear(torch.randn(2, 3), torch.randn(4, 5))
    with torch.no_grad(), pytest.raises(RuntimeError, match="size"):
        pl.linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(5))


# --- the fused model ----------------------------------------------------------------------------

def tiny(decoder="mlp"):
    config = SegFormerConfig.from_variant("b0", num_classes=5, decoder=decoder, embed_dims=(16, 32, 40, 64),
                                          depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), decoder_dim=24)
    ref = randomize_(SegFormer(config=config)).eval()
    return ref, copy.deepcopy(ref).set_fused(True)


def check(fused, ref, x, tol=1e-4):
    with torch.no_grad():
        got = fused(x)
        assert rel_err(got, ref(x)) < tol


@pytest.mark.parametrize("decoder", ["mlp", "mmseg"])
def test_fused_model_sees_every_kind_of_weight_change(decoder):
    ref, fused = tiny(decoder)
    x = torch.randn(2, 3, 67, 45)
    check(fused, ref, x)  # fills the caches
    # an optimiser step, applied to both (same gradients)
    for model in (ref, fused):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        torch.manual_seed(0)
        (model(x).square().mean() + sum(p.square().sum() for p in model.parameters())).backward()
        opt.step()
        model.eval()
    check(fused, ref, x)
    # load_state_dict
    other = randomize_(SegFormer(config=ref.config))
    for model in (ref, fused):
        model.load_state_dict(other.state_dict())
    check(fused, ref, x)
    # in-place edits: no_grad on the parameter, and writes through .data (no version bump)
    for model in (ref, fused):
        with torch.no_grad():
            model.encoder.stages[1].blocks[0].mlp.fc1.weight.add_(0.5)
        model.encoder.stages[2].blocks[0].attn.q.weight.data.mul_(2)
        model.encoder.stages[0].blocks[0].attn.proj.weight.data.mul_(-1)
        head = model.decoder.linear_c[0] if decoder == "mlp" else model.decoder.classifier
        head.weight.data.mul_(3)
    check(fused, ref, x)


def test_fused_model_to_bfloat16_uses_the_new_weights():
    ref, fused = tiny()
    x = torch.randn(1, 3, 64, 64)
    check(fused, ref, x)
    packs = pl.memory()[0]
    gold = copy.deepcopy(ref).double()
    with torch.no_grad():
        want = gold(x.double())
    ref, fused = ref.to(torch.bfloat16), fused.to(torch.bfloat16)
    with torch.no_grad():
        got, eager = fused(x.bfloat16()), ref(x.bfloat16())
    assert rel_err(got, want) <= 2 * rel_err(eager, want) + 1e-3
    # the fp32 packs went with the fp32 memory (.to() keeps the Parameter objects)
    gc.collect()
    assert pl.memory()[0] <= packs


def test_backends_report_the_packs():
    ref, fused = tiny()
    with torch.no_grad():
        fused(torch.randn(1, 3, 64, 64))
    choice = fused.backends()["linear"]
    assert choice.backend == ("onednn" if ONEDNN else "aten")
    count, nbytes = pl.memory()
    assert choice.packs == count and choice.nbytes == nbytes
    if ONEDNN:
        assert count >= 4 * 3 and nbytes > 0  # q, kv, proj, fc1, fc2 per block, decoder
        assert "cached weight copies" in choice.describe()
    assert ref.backends()["linear"].backend == "reference"


def test_compile_fullgraph_fused_model():
    ref, fused = tiny()
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x)
        assert rel_err(got, ref(x)) < 1e-4
        fused.encoder.stages[3].blocks[0].mlp.fc2.weight.mul_(2)  # packs rebuilt at run time
        ref.encoder.stages[3].blocks[0].mlp.fc2.weight.mul_(2)
        assert rel_err(compiled(x), ref(x)) < 1e-4


def test_one_fused_model_called_from_several_threads():
    """Four threads share one model (and its packs); a weight edit between rounds is seen by all."""
    from concurrent.futures import ThreadPoolExecutor

    ref, fused = tiny()
    xs = [torch.randn(1, 3, 64 + 8 * i, 48) for i in range(4)]

    def run(x):
        with torch.no_grad():
            return fused(x)

    for _ in range(2):
        with torch.no_grad():
            want = [ref(x) for x in xs]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(run, xs))
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-4
        for model in (ref, fused):
            with torch.no_grad():
                model.encoder.stages[0].blocks[0].mlp.fc2.weight.mul_(-2)


def _has_head() -> bool:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    return not extension_op_reasons("decoder_head_fwd")


@pytest.mark.skipif(not _has_head(), reason="the compiled extension (with decoder_head_fwd) is not built")
@pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN's linear ops")
def test_cpp_decoder_head_with_packed_weights():
    """The C++ head's two GEMMs on oneDNN (packed weights) against its aten GEMMs; mismatched
    packs are refused with a message naming them."""
    B, H, W, C, E, K = 2, 9, 13, 24, 40, 7
    maps = [torch.randn(B, 5, 7, E), torch.randn(B, 3, 4, E)]
    x, w, bias = torch.randn(B, H, W, C), torch.randn(E, C) / C ** 0.5, torch.randn(E)
    cls_w, cls_b = torch.randn(K, E) / E ** 0.5, torch.randn(K)
    head = torch.ops.fastseg_ext.decoder_head_fwd
    want = head(maps, x, w, H, W, bias, True, cls_w, cls_b)
    got = head(maps, x, w, H, W, bias, True, cls_w, cls_b, pl.packed_weight(w), pl.packed_weight(cls_w))
    assert rel_err(got, want) <= 1e-5
    proj_only = head(maps, x, w, H, W, bias, False, None, None, pl.packed_weight(w), None)
    assert rel_err(proj_only, head(maps, x, w, H, W, bias, False, None, None)) <= 1e-5
    with pytest.raises(ValueError, match="x_weight_packed"):
        head(maps, x, w, H, W, bias, True, cls_w, cls_b, pl.packed_weight(cls_w), None)
