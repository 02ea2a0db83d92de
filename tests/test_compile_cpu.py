"""torch.compile of the fused SegFormer on CPU: one graph (no break), the custom ops traced as ops
(their fake impls carry the shapes), and the same output as the fused model run eagerly.

The backend is AOT eager (dynamo + AOT autograd with fake tensors: everything inductor relies on
short of generating C++), so the test stays well under a minute on two loaded cores; inductor
itself is exercised by ``fastseg bench --compile``.
"""
import torch

from fastseg import SegFormer


def _recording_aot_eager(seen: list):
    """A torch.compile backend that records each graph's call targets, then runs AOT eager."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        seen.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return aot_eager(gm, example_inputs)

    return backend


def test_compiled_fused_segformer_is_one_graph_with_the_same_output():
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=19).eval().set_fused(True)
    x = torch.randn(1, 3, 67, 45)  # odd: no stage's token count is a multiple of any tile
    with torch.inference_mode():
        want = model(x).clone()
    graphs: list = []
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend=_recording_aot_eager(graphs))
        with torch.inference_mode():
            got = compiled(x)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1, f"expected one graph, dynamo made {len(graphs)}"
    assert got.shape == want.shape and torch.isfinite(got).all()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, f"compiled fused output differs from the fused model's: max rel err {rel:.2e}"
    # Every op on a compiled (C++) backend appears in the graph as an op, not inlined Python.
    ours = [t for t in graphs[0] if t.startswith(("fastseg.", "fastseg_ext."))]
    report = model.backends()
    # argmax: an inference helper, not the forward; dwconv3x3_gelu runs inside mix_ffn's kernel
    # when mix_ffn itself is cpp.
    skip = {"upsample_argmax"} | ({"dwconv3x3_gelu"} if report["mix_ffn"].backend == "cpp" else set())
    for op, choice in report.items():
        if choice.backend == "cpp" and op not in skip:
            stem = op.split("_")[0]
            assert any(stem in t for t in ours), f"{op} ({choice.backend}) is not a traced op: {sorted(set(ours))}"


def test_compiled_fused_segformer_reports_no_graph_break():
    """The same through ``torch._dynamo.explain`` (the user's way to find breaks), at a second size."""
    torch.manual_seed(1)
    model = SegFormer("b0", num_classes=5).eval().set_fused(True)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            report = torch._dynamo.explain(model)(torch.randn(2, 3, 41, 53))
    finally:
        torch._dynamo.reset()
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1
