"""Every SegFormer checkpoint format both ways: smp, the converters (HF checked with the real
``transformers``), round trips between every pair of formats, the HuggingFace cache, wrong-model
and other bad input. The smp, NVlabs and mmseg layouts come from the independent module trees in
``oracles.py``; SETR's formats are tested in ``test_setr.py``.
"""
import ast
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import rel_err
from fastseg import SETR, SegFormer, SegFormerConfig
from fastseg.checkpoints import ConversionError, detect_format
from fastseg.cli import main as cli
from fastseg.io import CheckpointError
from fastseg.models.config import NORM_EPS
from oracles import MMSegSegFormer, NVLabsSegFormer, SMPSegformer, randomize_

transformers = pytest.importorskip("transformers")

DIMS, DEPTHS = (32, 64, 160, 256), (2, 2, 2, 2)  # b0: smp builds its encoders by name
CLASSES = 3


@pytest.fixture
def x():
    return torch.randn(1, 3, 32, 64)  # multiples of 32, which smp requires; small: many models run


def fastseg_b0(eps="nvlabs", decoder="mlp", seed=0):
    cfg = SegFormerConfig.from_variant("b0", num_classes=CLASSES, decoder=decoder, norm_eps=NORM_EPS[eps])
    return randomize_(SegFormer(config=cfg), seed=seed).eval()


def hf_b0(seed=0):
    config = transformers.SegformerConfig(hidden_sizes=list(DIMS), depths=list(DEPTHS), decoder_hidden_size=256,
                                          num_labels=CLASSES)
    return randomize_(transformers.SegformerForSemanticSegmentation(config), seed=seed).eval()


@torch.no_grad()
def logits(model, x):
    return model.eval()(x)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- smp ---------------------------------------------------------------------------------------------

def test_smp_checkpoint_matches_smp_structure(tmp_path, x):
    ref = randomize_(SMPSegformer(DIMS, DEPTHS, 256, CLASSES), seed=1).eval()
    torch.save(ref.state_dict(), tmp_path / "smp_segformer.pth")
    model = SegFormer.from_pretrained(tmp_path / "smp_segformer.pth").eval()
    report = model.load_report
    assert report.format == "smp" and model.variant == "b0" and model.num_classes == CLASSES
    assert "align_corners=True" in report.output and "align_corners=True" in str(report)
    with torch.no_grad():
        want = ref(x)
        quarter = model(x)
        assert quarter.shape == (1, CLASSES, 8, 16) and want.shape == (1, CLASSES, 32, 64)
        full = F.interpolate(quarter, scale_factor=4, mode="bilinear", align_corners=True)
        assert rel_err(full, want) < 1e-4
        assert rel_err(model.set_fused(True)(x), quarter) < 1e-4

    # smp's own save_pretrained directory: config.json with _model_class + model.safetensors
    (tmp_path / "hub").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(
        '{"_model_class": "Segformer", "encoder_name": "mit_b0", "classes": 3, "upsampling": 4}')
    assert same_weights(SegFormer.from_pretrained(tmp_path / "hub"), model)

    # back to smp: smp's module tree loads it strictly, bit for bit
    model.save_pretrained(tmp_path / "back.safetensors", "smp")
    again = SMPSegformer(DIMS, DEPTHS, 256, CLASSES)
    from safetensors.torch import load_file

    again.load_state_dict(load_file(tmp_path / "back.safetensors"), strict=True)
    assert same_weights(again, ref)
    # a path without suffix: smp's save_pretrained directory, which smp.from_pretrained reads
    model.save_pretrained(tmp_path / "smp_dir", "smp")
    config = json.loads((tmp_path / "smp_dir" / "config.json").read_text())
    assert config["_model_class"] == "Segformer" and config["encoder_name"] == "mit_b0" and config["classes"] == CLASSES
    assert same_weights(SegFormer.from_pretrained(tmp_path / "smp_dir"), model)


def test_smp_with_another_encoder_is_refused():
    resnet_smp = {"encoder.conv1.weight": torch.randn(8, 3, 7, 7), "decoder.mlp_stage.0.linear.weight": torch.randn(4, 8),
                  "segmentation_head.0.weight": torch.randn(2, 4, 1, 1)}
    with pytest.raises(CheckpointError, match="not a Mix Transformer"):
        SegFormer.from_pretrained(resnet_smp)


# --- HF, for real --------------------------------------------------------------------------------------

def test_hf_directory_loads_strictly_in_transformers_and_comes_back(tmp_path, x):
    model = fastseg_b0("hf", seed=2)
    saved = model.save_pretrained(tmp_path / "hf", "hf")
    assert sorted(p.name for p in saved.path.iterdir()) == ["config.json", "model.safetensors"]
    hf, info = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.model_type == "segformer" and len(hf.config.id2label) == CLASSES
    assert list(hf.config.hidden_sizes) == list(DIMS) and list(hf.config.depths) == list(DEPTHS)
    with torch.no_grad():
        assert rel_err(hf.eval()(pixel_values=x).logits, logits(model, x)) < 1e-5
    back = SegFormer.from_pretrained(tmp_path / "hf").eval()
    assert back.load_report.format == "hf_legacy" and back.config == model.config
    assert same_weights(back, model) and torch.equal(logits(back, x), logits(model, x))


def test_hf_refuses_what_it_cannot_hold(tmp_path, x):
    with pytest.raises(ConversionError, match="SegformerHead"):
        fastseg_b0("mmseg", decoder="mmseg").save_pretrained(tmp_path / "a", "hf")
    nv = fastseg_b0("nvlabs")
    with pytest.raises(ConversionError, match="eps"):
        nv.save_pretrained(tmp_path / "b", "hf")
    assert not (tmp_path / "b").exists()
    with pytest.warns(UserWarning, match="eps"):
        nv.save_pretrained(tmp_path / "b", "hf", allow_eps_change=True)
    hf = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        assert rel_err(hf(pixel_values=x).logits, logits(nv, x)) < 1e-2  # other eps: close, not equal
    back = SegFormer.from_pretrained(tmp_path / "b")
    assert back.config.norm_eps == NORM_EPS["hf"]
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), nv.state_dict().values()))


# --- round trips A -> fastseg -> B -> fastseg ------------------------------------------------------------

SOURCES = ["nvlabs", "smp", "hf", "mmseg", "fastseg"]
TARGETS = ["nvlabs", "smp", "hf", "mmseg", "fastseg"]
EPS_OF = {"nvlabs": "nvlabs", "smp": "nvlabs", "hf": "hf", "mmseg": "mmseg", "fastseg": "nvlabs"}
ORACLES = {"nvlabs": NVLabsSegFormer, "smp": SMPSegformer, "mmseg": MMSegSegFormer}


def write_source(kind, tmp_path) -> Path:
    """A checkpoint in layout ``kind``, written by that library's own module tree (oracles / transformers)."""
    if kind == "nvlabs":
        ref = randomize_(NVLabsSegFormer(DIMS, DEPTHS, 256, CLASSES), seed=3)
        torch.save({"meta": {"CLASSES": ("a", "b", "c")}, "state_dict": ref.state_dict()}, tmp_path / "src.pth")
        return tmp_path / "src.pth"
    if kind == "smp":
        torch.save(randomize_(SMPSegformer(DIMS, DEPTHS, 256, CLASSES), seed=3).state_dict(), tmp_path / "src.pth")
        return tmp_path / "src.pth"
    if kind == "mmseg":
        ref = randomize_(MMSegSegFormer(DIMS, DEPTHS, 256, CLASSES), seed=3)
        torch.save({"meta": {}, "state_dict": ref.state_dict()}, tmp_path / "src.pth")
        return tmp_path / "src.pth"
    if kind == "hf":
        hf_b0(seed=3).save_pretrained(tmp_path / "src")
        return tmp_path / "src"
    fastseg_b0(seed=3).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def tensors_of(path: Path) -> dict:
    if path.is_dir():
        return SegFormer.from_pretrained(path).state_dict()
    obj = torch.load(path, weights_only=True)
    return obj.get("state_dict", obj)


@pytest.mark.parametrize("source", SOURCES)
def test_round_trip_between_formats(tmp_path, source):
    """A -> fastseg -> B -> fastseg for every target B: bit-exact where allowed, refused with the reason
    otherwise; then back into A's own layout, which gives A's tensors under A's names."""
    x = torch.randn(1, 3, 32, 32)
    a = write_source(source, tmp_path)
    first = SegFormer.from_pretrained(a).eval()
    want = logits(first, x)
    for target in TARGETS:
        head_ok = (first.config.decoder == "mmseg") == (target == "mmseg") or target == "fastseg"
        eps_ok = target == "fastseg" or EPS_OF[source] == EPS_OF[target]
        out = tmp_path / (f"to_{target}" if target in ("hf", "fastseg") else f"to_{target}.pth")
        if not (head_ok and eps_ok):
            with pytest.raises(ConversionError, match="decoder|eps") as info:
                first.save_pretrained(out, target)
            assert ("eps" in str(info.value)) == (head_ok and not eps_ok), target
            assert not out.exists()
            continue
        first.save_pretrained(out, target)
        second = SegFormer.from_pretrained(out).eval()
        # nothing is refolded on these paths (renames, k/v splits, 1x1-conv views): bit-exact
        assert second.config == first.config and same_weights(second, first), target
        assert torch.equal(logits(second, x), want), target
    if source == "fastseg":
        return
    again = tmp_path / ("again" if source == "hf" else "again.pth")
    SegFormer.from_pretrained(tmp_path / "to_fastseg").save_pretrained(again, source)
    original, got = tensors_of(a), tensors_of(again)
    if source != "hf":  # (an HF directory is compared through fastseg's reading of it)
        assert got.keys() == original.keys()
    for key, value in original.items():
        if key.startswith("decode_head.conv_seg.") and source == "nvlabs":
            continue  # NVlabs' unused conv_seg is not loaded; it is written back as a copy of linear_pred
        assert torch.equal(got[key], value), key
    if source in ORACLES:  # that library's module tree loads the written file strictly, same logits
        ref = ORACLES[source](DIMS, DEPTHS, 256, CLASSES).eval()
        ref.load_state_dict(got, strict=True)
        with torch.no_grad():
            theirs = ref(x)
        ours = F.interpolate(want, scale_factor=4, mode="bilinear", align_corners=True) if source == "smp" else want
        assert rel_err(theirs, ours) < 1e-4


def test_cli_convert_refuses_existing_output_and_unrepresentable_targets(tmp_path, capsys):
    src = write_source("nvlabs", tmp_path)
    assert cli(["convert", str(src), str(tmp_path / "smp.pth"), "--to", "smp"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli(["convert", str(src), str(tmp_path / "smp.pth"), "--to", "smp"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["convert", str(src), str(tmp_path / "smp.pth"), "--to", "smp", "--overwrite"]) == 0
    assert detect_format(torch.load(tmp_path / "smp.pth", weights_only=True)) == "smp"
    assert cli(["convert", str(src), str(tmp_path / "m.pth"), "--to", "mmseg"]) == 1
    err = capsys.readouterr().err
    assert "cannot hold" in err and "BN" in err and not (tmp_path / "m.pth").exists()
    assert cli(["convert", str(src), str(tmp_path / "t.pth"), "--to", "timm"]) == 1
    assert "choose one of" in capsys.readouterr().err


# --- the HuggingFace cache -------------------------------------------------------------------------------

REPO = "nvidia/segformer-b0-finetuned-ade-512-512"


def fill_cache(hub: Path, repo: str, files: Path) -> None:
    """The layout huggingface_hub writes: blobs by hash, snapshots/<rev>/ links, refs/main."""
    root = hub / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "blobs").mkdir(parents=True)
    (root / "snapshots" / rev).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    for f in files.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, root / "snapshots" / rev), root / "snapshots" / rev / f.name)


def test_repo_id_from_the_local_hf_cache(tmp_path, monkeypatch, x):
    hf = hf_b0(seed=4)
    hf.save_pretrained(tmp_path / "files")
    fill_cache(tmp_path / "home" / "hub", REPO, tmp_path / "files")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = SegFormer.from_pretrained(REPO)
    assert REPO in model.load_report.source and model.load_report.format == "hf_legacy"
    with torch.no_grad():
        assert rel_err(logits(model, x), hf(pixel_values=x).logits) < 1e-4

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError) as info:
        SegFormer.from_pretrained(REPO)
    msg = str(info.value)
    assert str(tmp_path / "elsewhere") in msg and f"hf download {REPO}" in msg


# --- wrong model, wrong shapes, unsafe files ------------------------------------------------------------

def test_wrong_model_says_which_model_to_use(tmp_path):
    from fastseg import SETRConfig

    setr = SETR(config=SETRConfig(decoder="naive", encoder=None, embed_dim=64, depth=4, num_heads=1, img_size=32,
                                  head_channels=8, aux_channels=8, num_classes=2))
    setr.save_pretrained(tmp_path / "setr.pth", "mmseg")
    setr.save_pretrained(tmp_path / "setr_fastseg")
    for src in (tmp_path / "setr.pth", tmp_path / "setr_fastseg"):
        with pytest.raises(CheckpointError, match=r"this is a SETR checkpoint; use fastseg\.SETR\.from_pretrained"):
            SegFormer.from_pretrained(src)
    fastseg_b0().save_pretrained(tmp_path / "seg.pth", "nvlabs")
    with pytest.raises(CheckpointError, match=r"this is a SegFormer checkpoint; use fastseg\.SegFormer\.from_pretrained"):
        SETR.from_pretrained(tmp_path / "seg.pth")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit", "hidden_size": 768}')
    with pytest.raises(CheckpointError, match="model_type='vit'"):
        SegFormer.from_pretrained(tmp_path / "vit")


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    ref = randomize_(NVLabsSegFormer(DIMS, DEPTHS, 256, CLASSES))
    sd = dict(ref.state_dict())
    sd["backbone.block2.0.attn.q.weight"] = torch.randn(64, 32)
    with pytest.raises(CheckpointError) as info:
        SegFormer.from_pretrained(sd)
    msg = str(info.value)
    assert "backbone.block2.0.attn.q.weight" in msg and "(64, 32)" in msg and "(64, 64)" in msg


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("kind", ["nvlabs", "smp", "mmseg"])
def test_new_formats_never_unpickle_code(tmp_path, kind):
    path = write_source(kind, tmp_path)
    obj = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    obj = {"state_dict": obj.get("state_dict", obj), "meta": {"payload": _Exploit(str(marker))}}
    torch.save(obj, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        SegFormer.from_pretrained(tmp_path / "evil.pth")
    assert not marker.exists()


def test_the_formats_package_never_imports_the_models():
    """One-way dependency: fastseg.models -> fastseg.checkpoints, never back (not even lazily)."""
    import fastseg.checkpoints as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("fastseg.models") for n in names), (path.name, names)
