"""benchmarks/openvino_op_compare.py maps OpenVINO's profiled nodes to the SegFormer parts it
compares with fastseg's fused ops: a wrong mapping would put time in the wrong row silently."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "openvino_op_compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("openvino_op_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openvino_nodes_map_to_parts(compare):
    roles = {"node_Conv_71": "mix-ffn fc1"}
    part = compare._openvino_part
    assert part("node_Conv_71", "Convolution", roles) == "mix-ffn fc1"
    assert part("/stages.0/blocks.0/attn/MatMul", "FullyConnected", roles) == "q"
    assert part("/stages.2/blocks.1/attn/MatMul_1", "FullyConnected", roles) == "kv"
    assert part("/stages.2/blocks.1/attn/MatMul_2", "FullyConnected", roles) == "kv"
    assert part("/stages.3/blocks.0/attn/MatMul_5", "FullyConnected", roles) == "proj"
    assert part("/stages.0/blocks.0/attn/MatMul_4", "Subgraph", roles) == "attention core"
    assert part("/stages.1/blocks.1/attn/Transpose_5", "Subgraph", roles) == "attention core"
    assert part("/stages.0/blocks.1/Add_1", "Subgraph", roles) == "residual add (+LN)"
    assert part("MVN_1160", "MVN", roles) == "layernorm (other)"
    assert part("logits", "Convolution", roles) == "decoder"
    assert part("/decoder/Resize_1", "Interpolate", roles) == "decoder"
    assert part("images_abcd_acdb_node_Conv_69", "Reorder", roles) == "layout reorders"
    assert part("something_new", "Eltwise", roles) == "other"


def test_onnx_convs_map_to_parts(compare, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    def conv(name, src, weight):
        return helper.make_node("Conv", [src, weight], [name + "_out"], name=name)

    nodes = [conv("pe", "images", "stages.0.patch_embed.weight"),
             conv("sr", "/stages.0/blocks.0/attn/Reshape_output_0", "stages.0.blocks.0.attn.sr_weight"),
             conv("fc1", "/stages.0/blocks.0/mlp/Reshape_output_0", "onnx::Conv_1"),
             conv("dw", "/stages.0/blocks.0/mlp/Conv_output_0", "stages.0.blocks.0.mlp.dwconv_weight"),
             conv("fc2", "/stages.0/blocks.0/mlp/Mul_1_output_0", "onnx::Conv_2"),
             conv("m0", "/stages.0/Reshape_output_0", "decoder.M0")]
    graph = helper.make_graph(nodes, "g", [], [])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert compare._onnx_roles(path) == {"pe": "patch embed (conv + LN)", "sr": "sr conv", "fc1": "mix-ffn fc1",
                                         "dw": "mix-ffn dwconv+GELU", "fc2": "mix-ffn fc2", "m0": "decoder"}
