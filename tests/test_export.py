"""ONNX / torch.export deployment export (fastseg.deploy's onnx and pt2 modules, `fastseg export`).

One dynamic ONNX file per model is exported once (module fixtures) and then checked with
onnx.checker, ONNX Runtime and OpenVINO at three sizes (odd ones and batch 2 included) against
fastseg's PyTorch output, and op by op for the decoder rewrite.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os

import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from fastseg import SETR, SegFormer, SegFormerConfig, SETRConfig, export_onnx  # noqa: E402
ex = importlib.import_module("fastseg.deploy")  # the package (fastseg.deploy is the function)
from fastseg.cli import main as cli_main  # noqa: E402

try:
    import openvino  # noqa: F401
    RUNTIMES = ("onnxruntime", "openvino")
except ImportError:  # the export extra is in the test extra; without it, ORT alone
    RUNTIMES = ("onnxruntime",)

# (batch, H, W): odd sizes, batch 2, all from the one dynamic file traced at TRACE_SIZE.
SIZES = [(2, 97, 131), (1, 256, 320), (1, 64, 200)]
TRACE_SIZE = (128, 160)
TOL = 1e-4


def randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so folding them is actually tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def tiny_setr(decoder: str) -> SETR:
    cfg = SETRConfig(decoder=decoder, encoder=None, embed_dim=64, depth=4, num_heads=2, img_size=(64, 64),
                     num_classes=5, head_channels=32, aux_channels=32, neck_channels=32, mla_channels=16)
    return randomise_bn(SETR(config=cfg))


def tiny_segformer(decoder: str = "mlp", fused: bool = False) -> SegFormer:
    cfg = SegFormerConfig(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 5, 8),
                          decoder_dim=32, num_classes=4, decoder=decoder, variant=None)
    return randomise_bn(SegFormer(config=cfg, fused=fused))


MODELS = {
    "segformer-b0-mlp": lambda: randomise_bn(SegFormer("b0", num_classes=19)),
    # fused: the PyTorch side runs fastseg's fused CPU path here, the reference path elsewhere
    "segformer-b0-mmseg": lambda: randomise_bn(SegFormer("b0", num_classes=19, decoder="mmseg", fused=True)),
    "setr-pup": lambda: tiny_setr("pup"),
    "setr-mla": lambda: tiny_setr("mla"),
    "setr-naive": lambda: tiny_setr("naive"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (model, path, report)}, each exported once with dynamic batch/H/W."""
    cache = {}
    folder = tmp_path_factory.mktemp("onnx")

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = MODELS[name]()
            path = folder / f"{name}.onnx"
            cache[name] = (model, path, export_onnx(model, path, example_size=TRACE_SIZE))
        return cache[name]

    return get


def run_pytorch(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_runtimes_match_pytorch_at_three_sizes(exported, name):
    model, path, report = exported(name)
    onnx.checker.check_model(str(path), full_check=True)
    assert report.dynamic and report.input_shape == ("batch", 3, "height", "width")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(b, 3, h, w, generator=gen) for b, h, w in SIZES]
    wants = [run_pytorch(model, x) for x in inputs]
    runtimes = RUNTIMES if name != "setr-naive" else ("onnxruntime",)
    for rt in runtimes:
        run = ex.onnx_session(path, rt)
        for x, want in zip(inputs, wants):
            got = torch.from_numpy(run(x.numpy()))
            assert got.shape == want.shape, (rt, tuple(x.shape))
            err = ex.relative_error(got, want)
            assert err < TOL, f"{name} in {rt} at {tuple(x.shape)}: max relative error {err:.2e}"


def _float_concats(proto) -> list[str]:
    """Concat nodes joining float tensors (not the int64 shape arithmetic of dynamic reshapes)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return [n.name for n in inferred.graph.node
            if n.op_type == "Concat" and any(types.get(i) in floats for i in n.input)]


@pytest.mark.parametrize("name", ["segformer-b0-mlp", "segformer-b0-mmseg"])
def test_graph_carries_the_decoder_rewrite(exported, name):
    model, path, report = exported(name)
    proto = onnx.load(str(path))
    ops = ex.count_ops(proto)
    E = model.config.decoder_dim
    n_layernorms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert ops["LayerNormalization"] == n_layernorms == 30
    assert "ReduceMean" not in ops and "Pow" not in ops and "Sqrt" not in ops  # no decomposed LayerNorm
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    decoder_inputs = {i for n in proto.graph.node if n.name.startswith("/decoder/") for i in n.input}
    decoder_shapes = [inits[i].shape for i in decoder_inputs if i in inits]
    assert not [s for s in decoder_shapes if 4 * E in s], f"a 4E-wide weight in the decoder: {decoder_shapes}"
    assert (E, model.config.embed_dims[0], 1, 1) in decoder_shapes  # stage 1's folded M (E x C1)
    fuse = (model.decoder.linear_fuse.weight if hasattr(model.decoder, "linear_fuse")
            else model.decoder.fusion_conv.conv.weight).detach().reshape(E, 4 * E).numpy()
    for v in inits.values():  # b0's stage-4 Mix-FFN weights are E x 4E too: none may be the fuse weight
        if v.size == fuse.size and 4 * E in v.shape:
            v = v.reshape(v.shape[:2])
            assert not any(a.shape == fuse.shape and (a == fuse).all() for a in (v, v.T))
    assert _float_concats(proto) == [], "the 4E-channel concat is in the graph"
    assert ops["Resize"] == 3  # stages 2-4 resized to stage 1's grid; nothing at full resolution
    assert "BatchNormalization" not in ops
    # Attention: MatMul / Softmax / MatMul per block; Mix-FFN: grouped Conv + GELU (erf form).
    assert ops["Softmax"] == sum(model.config.depths)
    assert ops["Erf"] == sum(model.config.depths)
    grouped = [n for n in proto.graph.node if n.op_type == "Conv"
               and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(grouped) == sum(model.config.depths)
    assert report.ops == ops


def test_setr_graphs_fold_bn_and_classify_before_the_last_upsample(exported):
    model, path, _ = exported("setr-pup")
    proto = onnx.load(str(path))
    ops = ex.count_ops(proto)
    assert "BatchNormalization" not in ops
    assert ops["LayerNormalization"] == sum(isinstance(m, nn.LayerNorm) for m in
                                            [*model.encoder.modules(), *model.decoder.modules()])
    # The classifier (K=5 output channels) feeds the last Resize, not the other way round.
    producers = {o: n for n in proto.graph.node for o in n.output}
    last = producers[proto.graph.output[0].name]
    assert last.op_type == "Resize" and producers[last.input[0]].op_type == "Conv"


def test_fused_and_reference_models_export_the_same_graph(tmp_path):
    torch.manual_seed(0)
    ref = tiny_segformer()
    fused = tiny_segformer(fused=True)
    fused.load_state_dict(ref.state_dict())
    a, b = ex.fast_graph(ref).state_dict(), ex.fast_graph(fused).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = export_onnx(fused, tmp_path / "fused.onnx", example_size=(64, 64))
    x = torch.randn(2, 3, 65, 97)
    got = ex.onnx_session(report.path)(x.numpy())
    assert ex.relative_error(got, run_pytorch(fused, x)) < TOL
    assert ex.relative_error(got, run_pytorch(ref, x)) < TOL


def test_fp16_error_within_twice_eager_fp16(tmp_path):
    torch.manual_seed(0)
    model = randomise_bn(SegFormer("b0", num_classes=19))
    report = export_onnx(model, tmp_path / "b0_fp16.onnx", example_size=TRACE_SIZE, fp16=True)
    assert report.fp16
    proto = onnx.load(report.path)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in and out
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    ln = [n for n in inferred.graph.node if n.op_type == "LayerNormalization"]
    sm = [n for n in inferred.graph.node if n.op_type == "Softmax"]
    mm = [n for n in inferred.graph.node if n.op_type == "MatMul"]
    assert ln and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in ln + sm)
    assert all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in mm if n.input[1] in types)
    x = torch.randn(2, 3, 97, 131)
    gold = run_pytorch(model, x)  # fp32
    eager16 = run_pytorch(model.half(), x.half()).float()
    model.float()
    eager_err = ex.relative_error(eager16, gold)
    for rt in RUNTIMES:
        err = ex.relative_error(ex.onnx_session(report.path, rt)(x.numpy()), gold)
        assert err <= 2 * eager_err, f"{rt}: fp16 export error {err:.2e} > 2x eager fp16's {eager_err:.2e}"


def test_static_export_for_tensorrt(tmp_path):
    torch.manual_seed(0)
    model = tiny_segformer()
    report = export_onnx(model, tmp_path / "static.onnx", dynamic=False, example_size=(64, 96), batch=2, opset=17)
    proto = onnx.load(report.path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 64, 96] and report.output_shape == (2, 4, 16, 24)
    assert "Shape" not in ex.count_ops(proto)  # no runtime shape arithmetic in a static graph
    x = torch.randn(2, 3, 64, 96)
    assert ex.relative_error(ex.onnx_session(report.path)(x.numpy()), run_pytorch(model, x)) < TOL


def test_check_option_reports_parity(tmp_path):
    torch.manual_seed(0)
    lines = []
    report = export_onnx(tiny_segformer(), tmp_path / "m.onnx", example_size=(64, 64), check=True,
                         progress=lines.append)
    assert len(report.parity) == 2 and max(report.parity.values()) < TOL
    assert [line[:5] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    text = report.summary()
    assert "LayerNormalization" in text and "MiB" in text and "parity onnxruntime" in text


# An extra beyond the default path (the TorchScript exporter): torch.export's symbolic shapes take
# ~10 s of CPU even for this tiny model, so CI runs it only with FASTSEG_TEST_EXPORT_SLOW=1.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTSEG_TEST_EXPORT_SLOW") != "1", reason="set FASTSEG_TEST_EXPORT_SLOW=1")
def test_dynamo_exporter(tmp_path):
    torch.manual_seed(0)
    model = tiny_segformer()
    report = export_onnx(model, tmp_path / "d.onnx", example_size=(64, 64), exporter="dynamo")
    assert report.exporter == "dynamo"
    onnx.checker.check_model(report.path)
    assert report.ops["LayerNormalization"] == sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    run = ex.onnx_session(report.path)
    for shape in [(2, 3, 97, 131), (1, 3, 64, 64)]:
        x = torch.randn(shape)
        assert ex.relative_error(run(x.numpy()), run_pytorch(model, x)) < TOL


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTSEG_TEST_EXPORT_SLOW") != "1", reason="set FASTSEG_TEST_EXPORT_SLOW=1")
@pytest.mark.parametrize("make", [tiny_segformer, lambda: tiny_setr("pup")], ids=["segformer", "setr"])
def test_opset23_attention_op(tmp_path, make):
    torch.manual_seed(0)
    model = make()
    report = export_onnx(model, tmp_path / "a.onnx", example_size=(64, 64), opset=23, attention="op")
    n_attention = sum(1 for m in model.modules() if type(m).__name__ in ("SRAttention", "Attention"))
    assert report.ops["Attention"] == n_attention
    assert "Softmax" not in report.ops
    parity = ex.check_parity(model, report.path, sizes=[(97, 131), (64, 64)], batch=2, runtimes=RUNTIMES)
    assert max(parity.values()) < TOL, parity


def test_pt2_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny_segformer("mmseg")
    report = ex.export_program(model, tmp_path / "m.pt2", example_size=(64, 64))
    assert report.format == "pt2" and os.path.getsize(report.path) == report.size_bytes
    assert report.input_shape == (1, 3, "height", "width")
    loaded = torch.export.load(report.path).module()
    for shape in [(1, 3, 97, 131), (1, 3, 64, 80), (1, 3, 256, 320)]:
        x = torch.randn(shape)
        assert ex.relative_error(loaded(x), run_pytorch(model, x)) < TOL


# --- the command line and bad input -----------------------------------------------------------------

def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["export", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def test_cli_detects_setr_in_a_fastseg_folder(tmp_path):
    torch.manual_seed(0)
    model = tiny_setr("mla")
    model.save_pretrained(tmp_path / "setr")
    code, out, err = run_cli(tmp_path / "setr", "--out", tmp_path / "setr.onnx", "--size", "64x64", "--check")
    assert code == 0, err
    assert "[1/4]" in out and "[4/4]" in out and "ops: " in out and "MiB" in out
    assert "SETR-mla" in out and "parity onnxruntime" in out
    onnx.checker.check_model(str(tmp_path / "setr.onnx"))


def test_cli_static_segformer(tmp_path):
    torch.manual_seed(0)
    tiny_segformer().save_pretrained(tmp_path / "seg")
    code, out, err = run_cli(tmp_path / "seg", "--out", tmp_path / "s.onnx", "--static", "64x64", "--batch", "2",
                             "--model", "segformer")
    assert code == 0, err
    assert "images 2x3x64x64 -> logits 2x4x16x16" in out


@pytest.mark.parametrize("args, message", [
    (["missing.pth"], "does not exist"),
    (["{src}", "--opset", "16"], "LayerNormalization needs opset >= 17"),
    (["{src}", "--static", "16x64"], "must be >= 32"),
    (["{src}", "--static", "bad"], "HxW"),
    (["{src}", "--model", "unet"], "--model must be"),
])
def test_cli_bad_input(tmp_path, args, message):
    src = tmp_path / "seg"
    tiny_segformer().save_pretrained(src)
    out = tmp_path / "m.onnx"
    code, _, err = run_cli(*[a.format(src=src) for a in args], "--out", out)
    assert code == 2 and message in err, err
    assert not out.exists()


def test_unknown_source_format(tmp_path):
    junk = tmp_path / "junk.safetensors"
    from safetensors.torch import save_file

    save_file({"something.weight": torch.zeros(3)}, str(junk))
    code, _, err = run_cli(junk, "--out", tmp_path / "m.onnx")
    assert code == 2 and "cannot load" in err and "as SegFormer" in err and "as SETR" in err


def test_output_folder_errors(tmp_path, monkeypatch):
    model = tiny_segformer()
    with pytest.raises(ex.ExportError, match="does not exist"):
        export_onnx(model, tmp_path / "no" / "such" / "m.onnx")
    with pytest.raises(ex.ExportError, match="is a folder"):
        export_onnx(model, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(ex.ExportError, match="not writable"):
        export_onnx(model, locked / "m.onnx")
    with pytest.raises(ex.ExportError, match="opset 16 is too old"):
        export_onnx(model, tmp_path / "m.onnx", opset=16)
    with pytest.raises(ex.ExportError, match="newer than the installed onnx"):
        export_onnx(model, tmp_path / "m.onnx", opset=onnx.defs.onnx_opset_version() + 1)
    with pytest.raises(ex.ExportError, match=">= 32"):
        export_onnx(model, tmp_path / "m.onnx", example_size=(31, 64))
    with pytest.raises(ex.ExportError, match="needs opset >= 23"):
        export_onnx(model, tmp_path / "m.onnx", attention="op")
    with pytest.raises(ex.ExportError, match="SegFormer or SETR"):
        export_onnx(nn.Conv2d(3, 3, 1), tmp_path / "m.onnx")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_segformer()
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous file")

    def broken_save(proto, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(model, target, example_size=(64, 64))
    assert target.read_bytes() == b"previous file"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTSEG_TEST_EXPORT_SLOW") != "1", reason="a C++ build of minutes: set "
                    "FASTSEG_TEST_EXPORT_SLOW=1")
def test_aoti_package(tmp_path):
    torch.manual_seed(0)
    model = tiny_segformer()
    report = ex.export_program(model, tmp_path / "m.pt2", example_size=(64, 64), aoti=True, check=True)
    assert report.format == "aoti" and max(report.parity.values()) < TOL


def test_cli_exports_an_hf_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=3, hidden_sizes=[16, 32, 40, 64], depths=[1, 1, 1, 1],
                                       num_attention_heads=[1, 2, 5, 8], decoder_hidden_size=32)
    hf = transformers.SegformerForSemanticSegmentation(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "hf.onnx"
    code, text, err = run_cli(tmp_path / "hf", "--out", out, "--size", "64x64")
    assert code == 0, err
    assert "SegFormer-custom (mlp head, 3 classes)" in text
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
    assert ex.relative_error(ex.onnx_session(out)(x.numpy()), want) < TOL
