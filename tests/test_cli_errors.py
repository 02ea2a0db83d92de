"""Expected failures of the real CLI: one line on stderr, exit code 1 (2 for export's own checks),
never a traceback; ``FASTSEG_DEBUG=1`` shows it."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from fastseg import SegFormer
from fastseg.models.config import SegFormerConfig

# Runs ``fastseg ARGS`` with an optional file-size limit (a write past it fails with EFBIG, as a
# full disk fails with ENOSPC) without SIGXFSZ killing the process.
LAUNCH = textwrap.dedent("""
    import os, resource, signal, sys
    limit = int(os.environ.get("FASTSEG_TEST_FSIZE", "0"))
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from fastseg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def fastseg(*args, fsize: int = 0, debug: bool = False, prefix=()):
    env = {**os.environ, "FASTSEG_TEST_FSIZE": str(fsize), "OMP_NUM_THREADS": "1"}
    env.pop("FASTSEG_DEBUG", None)
    if debug:
        env["FASTSEG_DEBUG"] = "1"
    cmd = [*prefix, sys.executable, "-c", LAUNCH, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def one_line_error(result, command: str, *needles) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode not in (0, None), result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fastseg {command}: error: "), lines[0]
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny 5-class SegFormer saved as a folder."""
    cfg = SegFormerConfig(num_classes=5, embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), decoder_dim=32,
                          variant=None)
    path = tmp_path_factory.mktemp("model") / "tiny"
    SegFormer(config=cfg).save_pretrained(path)
    return path


def _tmpfs_prefix(mount):
    """Run in a private mount namespace with a 64 KiB tmpfs on ``mount`` (None where not allowed)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"', str(mount)]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_convert_to_a_full_disk(saved, tmp_path):
    """ENOSPC from a 64 KiB tmpfs where a mount namespace is allowed, else EFBIG from RLIMIT_FSIZE
    (then the old output is checked to be intact and no temporary folder left)."""
    mount = tmp_path / "small"
    mount.mkdir()
    prefix = _tmpfs_prefix(mount)
    if prefix is not None:
        r = fastseg("convert", saved, mount / "out", "--to", "fastseg", prefix=prefix)
        one_line_error(r, "convert", mount / "out", "No space left on device", "errno 28")
        return
    out = tmp_path / "out"
    shutil.copytree(saved, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = fastseg("convert", saved, out, "--to", "fastseg", "--overwrite", fsize=20_000)
    one_line_error(r, "convert", out / "model.safetensors", "File too large")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "small"]  # no temporary folder left


def test_torch_save_to_a_full_disk_raises_the_oserror_naming_the_path(saved, tmp_path):
    """torch.save reports a failed write as a RuntimeError; the atomic writer raises the OSError behind
    it, with the destination's path, which the CLI prints in one line."""
    import resource
    import signal

    import fastseg
    from fastseg.errors import one_line

    model = fastseg.SegFormer.from_pretrained(saved)
    folder = tmp_path / "folder"
    shutil.copytree(saved, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, old_limit[1]))
    try:
        with pytest.raises(OSError) as info:
            model.save_pretrained(tmp_path / "x.pth", format="nvlabs")
        with pytest.raises(OSError, match="File too large"):
            model.save_pretrained(folder)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert one_line(info.value) == f"{tmp_path / 'x.pth'}: File too large (errno 27)"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_export_opset_outside_the_supported_range_fails_at_once(saved, tmp_path):
    import onnx.defs

    from fastseg import export_onnx
    from fastseg.deploy.common import ExportError

    newest = onnx.defs.onnx_opset_version()
    r = fastseg("export", saved, "--out", tmp_path / "m.onnx", "--opset", newest + 1)
    line = one_line_error(r, "export", f"--opset 17..{newest}")
    assert "loading" not in r.stdout, line  # refused before the model is even read
    model = SegFormer.from_pretrained(saved)
    for opset in (16, newest + 1, 99):
        with pytest.raises(ExportError, match=f"opset {opset} is"):
            export_onnx(model, tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_full_disk(saved, tmp_path):
    pytest.importorskip("onnxscript")
    r = fastseg("export", saved, "--out", tmp_path / "m.onnx", "--size", "64x64", fsize=50_000)
    one_line_error(r, "export", tmp_path / "m.onnx", "File too large")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def bad_labels(tmp_path):
    """A folder dataset with one good pair and one label of the wrong size or with a class id 9."""
    def make(kind):
        root = tmp_path / kind
        for sub in ("images", "labels"):
            (root / sub).mkdir(parents=True)
        rng = np.random.default_rng(0)
        for stem in ("a", "b"):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
            Image.fromarray(rng.integers(0, 5, (40, 48), dtype=np.uint8)).save(root / "labels" / f"{stem}.png")
        bad = np.full((30, 48) if kind == "size" else (40, 48), 9 if kind == "range" else 1, dtype=np.uint8)
        Image.fromarray(bad).save(root / "labels" / "b.png")
        return root
    return make


def test_eval_label_of_the_wrong_size_in_a_dataloader_worker_is_one_line(saved, bad_labels, tmp_path):
    root = bad_labels("size")
    r = fastseg("eval", "--checkpoint", saved, "--dataset", "folder", "--data-root", root, "--num-classes", 5,
                "--workers", 1, "--quiet", "--out", tmp_path / "e.json")
    line = one_line_error(r, "eval", root / "labels" / "b.png", "is 48x30 but its image")
    assert "DataLoader worker" not in line


def test_eval_out_of_range_labels_one_line_and_fastseg_debug_shows_the_traceback(saved, bad_labels, tmp_path):
    root = bad_labels("range")
    r = fastseg("eval", "--checkpoint", saved, "--dataset", "folder", "--data-root", root, "--num-classes", 5,
                "--workers", 1, "--quiet", "--out", tmp_path / "e.json", debug=True)
    assert r.returncode == 1 and "Traceback" in r.stderr
    last = r.stderr.rstrip().splitlines()[-1]
    assert last.startswith("fastseg eval: error: ") and "outside 0..4" in last and str(root / "labels" / "b.png") in last


def test_worker_exception_is_unwrapped_to_its_type_and_message():
    import torch

    from fastseg.errors import one_line, original

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError(f"label file x{i}.png has labels [9]\noutside 0..4")

    loader = torch.utils.data.DataLoader(Bad(), num_workers=1)
    with pytest.raises(ValueError) as info:
        next(iter(loader))
    exc = original(info.value)
    assert type(exc) is ValueError and one_line(exc) == "label file x0.png has labels [9] outside 0..4"
    plain = KeyError("k")
    assert original(plain) is plain


def test_other_subcommands_missing_files(saved, tmp_path):
    missing = tmp_path / "nowhere"
    r = fastseg("train", "--dataset", "folder", "--data-root", missing, "--num-classes", 3, "--iters", 1,
                "--out", tmp_path / "run", "--quiet")
    one_line_error(r, "train", missing)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(image)
    r = fastseg("predict", image, "--checkpoint", missing / "model.pth", "--out", tmp_path / "pred", "--quiet")
    one_line_error(r, "predict", missing / "model.pth")
