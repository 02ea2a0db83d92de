"""Saves are atomic as a whole and honour the umask.

A writer is killed (``os._exit`` in a forked child: no cleanup, no ``finally``, as after SIGKILL)
at every step of a save, and the destination must then load as exactly the old model or the new
one; the leftovers of the killed write are gone after the next load or save.
"""
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import fastseg.io as fio
from fastseg import SegFormer, checkpoints
from fastseg.models.config import SegFormerConfig

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked writer"),
              pytest.mark.filterwarnings("ignore:.*LayerNorm eps:UserWarning")]

KILLED = 86
NEW_TAG = fio.NEW_TAG


def tiny(num_classes: int) -> SegFormer:
    cfg = SegFormerConfig(num_classes=num_classes, embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1),
                          decoder_dim=32, variant=None)
    return SegFormer(config=cfg).eval()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_killed_at(step: int, write) -> tuple[int, list[str]]:
    """Run ``write()`` in a forked child that dies at its ``step``-th atomic-write step (-1: never).
    Returns (exit code, the steps it reached)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork (as DataLoader workers do)
            seen = []

            def hook(name):
                seen.append(name)
                os.write(write_end, (name + "\n").encode())
                if len(seen) - 1 == step:
                    os._exit(KILLED)

            fio._step_hook = hook
            write()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        steps = f.read().split()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), steps


def leftovers(dest: Path) -> list[str]:
    """Temporary siblings of ``dest`` and temporary files inside it."""
    found = [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
    if dest.is_dir():
        found += [f"{dest.name}/{p.name}" for p in dest.iterdir() if p.name.endswith(".tmp")]
    return found


def kill_at_every_step(tmp_path, make_old, write_new, check):
    """For every step k of ``write_new``: a fresh copy of the old save, the writer killed at k, then
    ``check(dest)`` (which loads it) and no leftovers."""
    template = tmp_path / "template"
    make_old(template)
    code, steps = run_killed_at(-1, lambda: write_new(template))
    assert code == 0 and len(steps) >= 8, steps
    make_old(template)  # the dry run replaced it
    outcomes = set()
    for k, name in enumerate(steps):
        dest = tmp_path / f"k{k}" / "model"
        dest.parent.mkdir()
        shutil.copytree(template, dest, symlinks=True, copy_function=shutil.copy2) if template.is_dir() \
            else shutil.copy2(template, dest)
        code, reached = run_killed_at(k, lambda: write_new(dest))
        assert code == KILLED and reached[-1] == name, (k, name, code, reached)
        outcomes.add((name, check(dest)))
        assert leftovers(dest) == [], (name, leftovers(dest))
    return outcomes


# --- killed between every pair of steps -------------------------------------------------------------

def test_save_pretrained_5_to_7_classes_killed_at_every_step(tmp_path):
    old, new = tiny(5), tiny(7)
    old_sd, new_sd = old.state_dict(), new.state_dict()

    def make_old(dest):
        shutil.rmtree(dest, ignore_errors=True)
        old.save_pretrained(dest)
        (dest / "NOTES.txt").write_text("the user's own file")

    def check(dest):
        loaded = SegFormer.from_pretrained(dest)
        sd = loaded.state_dict()
        assert (dest / "NOTES.txt").read_text() == "the user's own file"
        if loaded.num_classes == 5:
            assert same_weights(sd, old_sd)
            return "old"
        assert loaded.num_classes == 7 and same_weights(sd, new_sd)
        return "new"

    outcomes = kill_at_every_step(tmp_path, make_old, lambda d: new.save_pretrained(d), check)
    by_step = dict(outcomes)
    assert set(by_step.values()) == {"old", "new"}
    # Killed between "old folder renamed aside" and "new folder renamed into place", the next load
    # finds no folder at all; it must finish the swap (the new folder was complete).
    assert by_step["dir-old-aside"] == "new"
    assert by_step["dir-ready"] == "old" and by_step["dir-renamed"] == "new"


def test_convert_to_hf_killed_at_every_step_never_mixes_config_and_weights(tmp_path):
    old, new = tiny(5), tiny(7)
    (tmp_path / "src").mkdir()
    new.save_pretrained(tmp_path / "src" / "new.safetensors")
    classes = {}

    def make_old(dest):
        shutil.rmtree(dest, ignore_errors=True)
        old.save_pretrained(dest, format="hf", allow_eps_change=True)

    def write_new(dest):
        checkpoints.convert(tmp_path / "src" / "new.safetensors", dest, "hf", overwrite=True, allow_eps_change=True,
                            model_classes={"segformer": SegFormer})

    def check(dest):
        import json

        loaded = SegFormer.from_pretrained(dest)  # raises on weights of one save with the other's config
        config = json.loads((dest / "config.json").read_text())
        assert len(config["id2label"]) == loaded.num_classes
        weights = new.state_dict() if loaded.num_classes == 7 else old.state_dict()
        assert same_weights(loaded.state_dict(), weights)
        classes[loaded.num_classes] = True
        return loaded.num_classes

    outcomes = kill_at_every_step(tmp_path, make_old, write_new, check)
    assert {c for _, c in outcomes} == {5, 7}


def test_single_file_save_killed_at_every_step(tmp_path):
    old, new = tiny(5), tiny(7)
    template = tmp_path / "template.pth"
    old.save_pretrained(template, format="nvlabs")
    code, steps = run_killed_at(-1, lambda: new.save_pretrained(tmp_path / "dry.pth", format="nvlabs"))
    assert code == 0 and steps == ["file-created", "file-written", "file-synced", "file-renamed"]
    for k in range(len(steps)):
        dest = tmp_path / f"k{k}.pth"
        shutil.copy2(template, dest)
        code, _ = run_killed_at(k, lambda: new.save_pretrained(dest, format="nvlabs"))
        assert code == KILLED
        assert bool(list(tmp_path.glob(f".{dest.name}.*"))) == (k < 3)  # the killed write's temp file
        loaded = SegFormer.from_pretrained(dest)
        want = new if steps[k] == "file-renamed" else old  # the rename is the commit
        assert same_weights(loaded.state_dict(), want.state_dict())
        assert list(tmp_path.glob(f".{dest.name}.*")) == []  # the load removed it


def test_missing_destination_is_restored_from_the_old_folder(tmp_path):
    """Only the renamed-aside old folder survives (no complete new one): the next load restores it."""
    old = tiny(5)
    dest = tmp_path / "model"
    old.save_pretrained(dest)
    dead = _dead_pid()
    os.rename(dest, tmp_path / f".model.fastseg-old-{dead}-0badc0de")
    (tmp_path / f".model.fastseg-tmp-{dead}-0badc0df").mkdir()  # an unfinished new folder: dropped
    loaded = SegFormer.from_pretrained(dest)
    assert same_weights(loaded.state_dict(), old.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_older_versions_and_live_writers(tmp_path):
    """mkstemp temp files that older fastseg left inside a model folder go at the next save; the
    temporary folder of a writer that is still running is left alone."""
    model = tiny(5)
    dest = tmp_path / "model"
    model.save_pretrained(dest)
    (dest / ".model.safetensors.k3j_x9a2.tmp").write_bytes(b"half a tensor")
    live = tmp_path / f".model.fastseg-tmp-{os.getppid()}-0123abcd"
    live.mkdir()
    SegFormer.from_pretrained(dest)  # a load cleans up too
    assert not (dest / ".model.safetensors.k3j_x9a2.tmp").exists()
    model.save_pretrained(dest)
    assert live.is_dir()
    assert sorted(p.name for p in dest.iterdir()) == ["fastseg_config.json", "model.safetensors"]


def test_save_into_a_file_is_refused_and_changes_nothing(tmp_path):
    dest = tmp_path / "model"
    dest.write_text("not a folder")
    with pytest.raises(NotADirectoryError):
        tiny(5).save_pretrained(dest)
    assert dest.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failing_writer_leaves_the_old_folder(tmp_path):
    dest = tmp_path / "model"
    tiny(5).save_pretrained(dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with fio.atomic_directory(dest) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_rename_into_place_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = tmp_path / "model"
    tiny(5).save_pretrained(dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    rename = os.rename

    def refuse_new(src, dst):
        if NEW_TAG in str(src) and str(dst) == str(dest):
            raise PermissionError(13, "Permission denied", str(dst))
        rename(src, dst)

    monkeypatch.setattr(fio.os, "rename", refuse_new)
    with pytest.raises(PermissionError):
        tiny(7).save_pretrained(dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replaces_drops_superseded_files_and_keeps_the_users(tmp_path):
    """A fastseg save over a HuggingFace folder drops its config.json / weights, keeps other files."""
    dest = tmp_path / "model"
    tiny(5).save_pretrained(dest, format="hf", allow_eps_change=True)
    (dest / "sub").mkdir()
    (dest / "sub" / "eval.json").write_text("{}")
    tiny(7).save_pretrained(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["fastseg_config.json", "model.safetensors", "sub"]
    assert (dest / "sub" / "eval.json").read_text() == "{}"
    assert SegFormer.from_pretrained(dest).num_classes == 7


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# --- permissions ----------------------------------------------------------------------------------------

@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_saves_honour_the_umask(tmp_path, umask):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    model = tiny(5)
    model.save_pretrained(tmp_path / "model")
    assert mode(tmp_path / "model") == dir_mode
    for p in (tmp_path / "model").iterdir():
        assert mode(p) == file_mode, p
    model.save_pretrained(tmp_path / "model")  # a replaced folder too
    assert mode(tmp_path / "model") == dir_mode and mode(tmp_path / "model" / "model.safetensors") == file_mode
    for fmt, name in (("fastseg", "m.safetensors"), ("nvlabs", "m.pth")):
        model.save_pretrained(tmp_path / name, format=fmt)
        assert mode(tmp_path / name) == file_mode, name
    model.save_pretrained(tmp_path / "hf", format="hf", allow_eps_change=True)
    assert mode(tmp_path / "hf") == dir_mode and mode(tmp_path / "hf" / "config.json") == file_mode
    with fio.atomic_write(tmp_path / "a.json", "w") as f:
        f.write("{}")
    assert mode(tmp_path / "a.json") == file_mode
    with fio.atomic_path(tmp_path / "e.onnx") as tmp:  # a writer that gives its file mkstemp's 0600
        assert tmp.suffix == ".onnx"
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    assert mode(tmp_path / "e.onnx") == file_mode


def test_atomic_path_failure_keeps_the_old_file_and_names_it(tmp_path):
    target = tmp_path / "engine.onnx"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as info:
        with fio.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert info.value.filename == str(target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["engine.onnx"]


def test_training_checkpoint_honours_the_umask(tmp_path, umask):
    from fastseg.train import save_checkpoint

    path = save_checkpoint({"iteration": 1, "w": torch.randn(3)}, tmp_path / "checkpoints", 1, keep=2)
    assert mode(path) == 0o666 & ~umask
    assert mode(tmp_path / "checkpoints") == 0o777 & ~umask


def test_onnx_export_honours_the_umask(tmp_path):
    """0600 from mkstemp used to survive the rename (the umask fixture's other case costs a second export)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from fastseg import export_onnx

    old = os.umask(0o022)
    try:
        export_onnx(tiny(3), tmp_path / "m.onnx", example_size=(64, 64))
    finally:
        os.umask(old)
    assert mode(tmp_path / "m.onnx") == 0o644
