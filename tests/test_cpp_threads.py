"""The C++ CPU kernels split their work across OpenMP threads (rows, tiles, bands). Under
pytest-xdist every other test computes on one thread, so here the fused model runs on two: a
partition bug (a row counted twice, a band edge missed) shows as a mismatch with the reference."""
import copy

import pytest
import torch

from conftest import rel_err
from fastseg import SegFormer, SegFormerConfig
from fastseg.ops import upsample_argmax
from fastseg.ops.upsample_argmax import upsample_argmax_reference
from oracles import randomize_

CPP_OPS = ("overlap_patch_embed", "sr_attention", "add_layer_norm", "mix_ffn", "decoder_upsample_fuse")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("decoder", ["mlp", "mmseg"])
def test_fused_model_on_two_threads_matches_the_reference(two_threads, decoder):
    ref = randomize_(SegFormer(config=SegFormerConfig.from_variant("b0", num_classes=7, decoder=decoder))).eval()
    fused = copy.deepcopy(ref).set_fused(True)
    chosen = {op: choice.backend for op, choice in fused.backends().items()}
    missing = [op for op in CPP_OPS if chosen.get(op) != "cpp"]
    if missing:
        pytest.skip(f"the C++ extension does not serve {missing} here")
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        want, got = ref(x), fused(x)
        labels = upsample_argmax(got, (97, 131))
    assert rel_err(got, want) < 1e-4
    assert torch.equal(labels, upsample_argmax_reference(got, (97, 131)))
