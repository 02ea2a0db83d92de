"""Reading and writing weight files safely.

Nothing here ever unpickles arbitrary objects: ``.pth``/``.pt``/``.bin`` files go through
``torch.load(weights_only=True)`` (tensors, containers and plain Python values only, plus the
numpy array/scalar reconstructors that mmcv checkpoints put in their ``meta``); ``.safetensors``
holds no code at all. Writes are atomic, for single files (:func:`atomic_write`) and whole folders
(:func:`atomic_directory`): after a kill the destination holds the old or the new contents, never a
mix, and the next save or load (:func:`recover`) removes what the killed writer left. New files and
folders get the modes a plain ``open()`` / ``mkdir`` would give under the process umask.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import pickle
import re
import secrets
import shutil
import threading
import zipfile
from pathlib import Path

import torch

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model, with the reason."""


def _numpy_safe_globals() -> list:
    """numpy's array/scalar reconstructors: they rebuild plain data and run no user code."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core
    found = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(core.multiarray, name, None)
        if fn is not None:
            found.append(fn)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


def load_torch_file(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``; clear errors for unsafe or damaged files."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            raise CheckpointError(
                f"refused to load {path}: it contains pickled objects that are not plain weights "
                f"({first}). fastseg never unpickles arbitrary objects; re-save the weights with "
                "torch.save(model.state_dict(), ...) or as .safetensors"
            ) from None
        raise CheckpointError(f"could not read {path}: the file is corrupt or truncated ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(
            f"could not read {path}: the file is corrupt or truncated ({type(e).__name__}: {e})"
        ) from None


def load_safetensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of a ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"could not read {path}: not a valid safetensors file ({e})") from None


def load_weights_file(path) -> tuple[object, dict[str, str]]:
    """Load one weight file by its suffix: (contents, safetensors metadata or {})."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, expected a weight file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return load_safetensors_file(path)
    if suffix in TORCH_SUFFIXES:
        return load_torch_file(path), {}
    raise CheckpointError(
        f"unsupported checkpoint file type {suffix or '(no suffix)'!r} for {path}; "
        f"expected one of {[*TORCH_SUFFIXES, SAFETENSORS_SUFFIX]}"
    )


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"could not parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


# --- atomic writes -------------------------------------------------------------------------------------
#
# A save is a sequence of steps; a kill (power loss, SIGKILL, OOM killer) can land between any two.
# Files: write a hidden temporary file beside the target, fsync it, give it the umask's mode, rename
# it over the target, fsync the folder. Folders (see atomic_directory): the same at the scale of a
# whole folder, with a rename aside of the old one. Every temporary name carries the writer's pid,
# so the next save or load of the same destination can tell a dead writer's leftovers (removed,
# or used to finish the swap) from a live writer's work (left alone).

TMP_TAG, NEW_TAG, OLD_TAG = "fastseg-tmp", "fastseg-new", "fastseg-old"
# .<name>.<tag>-<pid>-<hex>[.suffix]: a file being written (.tmp, or the target's suffix for writers
# that go by it), a folder being written (tmp), a
# complete new folder waiting to be renamed into place (new), the old folder renamed aside (old).
_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<tag>fastseg-(?:tmp|new|old))-(?P<pid>\d+)-[0-9a-f]+(?:\.\w+)?$")
# What atomic_write's mkstemp named its files before fastseg 0.x tagged them: .<name>.<8 chars>.tmp.
# Only weight, config and export files: a user's own ".notes.abcdefgh.tmp" is not ours.
_LEGACY_TMP_RE = re.compile(r"^\.(?P<name>.+\.(?:safetensors|json|pth|pt|bin|ckpt|onnx|pt2))\.[a-z0-9_]{8}\.tmp$")

# Test hook: called with the name of each step of an atomic write, so a test can kill the writer
# between any two steps. None in normal use.
_step_hook = None


def _step(name: str) -> None:
    if _step_hook is not None:
        _step_hook(name)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o22)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask (0o644 under umask 022)."""
    return 0o666 & ~current_umask()


def _tag_name(dest: Path, tag: str, suffix: str = "") -> Path:
    return dest.parent / f".{dest.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # our own: another thread may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists under another user (or cannot tell): leave its files alone
    return True


def fsync_directory(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _leftovers(dest: Path) -> list[tuple[str, Path]]:
    """(tag, path) of the temporary siblings of ``dest`` left by writers that are no longer running."""
    found = []
    try:
        names = os.listdir(dest.parent if str(dest.parent) else ".")
    except OSError:
        return found
    for name in names:
        m = _LEFTOVER_RE.match(name)
        if m and m["name"] == dest.name and not _pid_alive(int(m["pid"])):
            found.append((m["tag"], dest.parent / name))
        elif not m and (legacy := _LEGACY_TMP_RE.match(name)) and legacy["name"] == dest.name:
            found.append((TMP_TAG, dest.parent / name))
    return sorted(found, key=lambda t: t[1].name)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _write_error(e: BaseException, path, tmp=None) -> BaseException:
    """The error to raise for a failed write of ``path``: the ``OSError`` behind it (``torch.save``
    wraps a full disk in a RuntimeError), naming ``path`` rather than our temporary ``tmp``."""
    cause, seen = e, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, OSError):
        return e
    if cause.errno is None:  # OSError("text"): a filename would not be shown
        return cause
    if cause.filename is None:
        cause.filename = str(path)
    elif tmp is not None and str(cause.filename).startswith(str(tmp)):
        cause.filename = str(path) + str(cause.filename)[len(str(tmp)):]
    return cause


def recover(dest) -> Path:
    """Finish or undo what a killed writer left at ``dest`` (a file or a folder); remove its leftovers.

    A folder swap killed after the old folder was renamed aside but before the new one was renamed
    into place leaves ``dest`` missing: the complete new folder (``.<name>.fastseg-new-…``) is
    renamed into place, or, if there is none, the old one (``.<name>.fastseg-old-…``) is renamed
    back. Everything else a dead writer left (temporary files and folders, an old folder already
    replaced) is removed. Best effort: in a folder we may not write, nothing is changed.

    Returns the path that holds the destination's contents: ``dest`` itself, or the leftover that
    still holds them when it could not be renamed back.
    """
    dest = Path(dest)
    left = _leftovers(dest)
    if left and not os.path.lexists(dest):
        for tag in (NEW_TAG, OLD_TAG):  # roll forward if the new folder was complete, else back
            ready = sorted((p for t, p in left if t == tag), key=_mtime)
            if ready:
                try:
                    os.rename(ready[-1], dest)
                    left.remove((tag, ready[-1]))
                    fsync_directory(dest.parent)
                except OSError:
                    return ready[-1]
                break
    for _, path in left:
        with contextlib.suppress(OSError):
            _remove(path)
    if dest.is_dir() and not dest.is_symlink():
        with contextlib.suppress(OSError):
            for inner in os.listdir(dest):  # temporary files of a killed atomic_write inside the folder
                m = _LEFTOVER_RE.match(inner)
                if (m and not _pid_alive(int(m["pid"]))) or (not m and _LEGACY_TMP_RE.match(inner)):
                    _remove(dest / inner)
    return dest


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", *, recover_leftovers: bool = True):
    """Yield a file object for a temporary file beside ``path``; when the block succeeds it is
    fsynced, given the mode a plain ``open()`` would give (0o666 less the umask) and renamed over
    ``path``. On failure ``path`` is untouched and the temporary file removed; an ``OSError`` names
    ``path``. Leftovers of a killed earlier write of ``path`` are removed first, which lists the
    folder: a writer of many files into one folder (``fastseg predict``) passes
    ``recover_leftovers=False`` and calls :func:`recover` on the folder once instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if recover_leftovers:
        recover(path)
    tmp = _tag_name(path, TMP_TAG, ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, mode) as f:
            _step("file-created")
            yield f
            f.flush()
            _step("file-written")
            os.fsync(f.fileno())
        _step("file-synced")
        os.replace(tmp, path)
        _step("file-renamed")
        fsync_directory(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        err = _write_error(e, path, tmp)
        if err is e:
            raise
        raise err from None


@contextlib.contextmanager
def atomic_path(path):
    """For writers that take a file name (``onnx.save_model``, a compiler's output): yield a fresh
    temporary path beside ``path`` to write; when the block succeeds the file there is fsynced, given
    the umask's mode and renamed over ``path`` (as :func:`atomic_write` does for file objects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = _tag_name(path, TMP_TAG, path.suffix or ".tmp")  # some writers go by the suffix (.pt2)
    try:
        yield tmp
        _step("file-written")
        _fsync_file(str(tmp))
        os.chmod(tmp, file_mode())  # whatever mode the writer gave it: what open() would give
        _step("file-synced")
        os.replace(tmp, path)
        _step("file-renamed")
        fsync_directory(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        err = _write_error(e, path, tmp)
        if err is e:
            raise
        raise err from None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no copy, no extra space; the old folder's link goes when it is removed
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_directory(dest, *, replaces=()):
    """Write a folder as a whole: ``with atomic_directory(dest) as tmp:`` write the files into
    ``tmp``; when the block succeeds ``tmp`` replaces ``dest``.

    After a kill at any moment, ``dest`` holds exactly the old folder or the new one, never a mix;
    the next :func:`recover` (every save, and every load through :mod:`fastseg.checkpoints`) finishes
    or undoes an interrupted swap and removes the leftovers. If the block raises, ``dest`` is
    untouched and the temporary folder removed.

    The steps: a new hidden sibling ``.<name>.fastseg-tmp-<pid>-<hex>`` (mode 0o777 less the umask);
    the caller's files; files of the old ``dest`` that the new contents neither contain nor
    ``replaces`` (``fnmatch`` patterns of names the new save supersedes, e.g. another format's
    weight files) carried over as hard links (copies where links fail), so nothing a user kept in
    the folder is lost; every file and the folder fsynced; renamed ``.<name>.fastseg-new-…``
    (complete); the old ``dest`` renamed aside to ``.<name>.fastseg-old-…``; the new one renamed
    to ``dest``; the parent fsynced; the old one removed.

    ``dest`` may not exist yet (it is created; its parent too); it must not be a file
    (``NotADirectoryError``). A symlink to a folder is followed: the target folder is replaced.
    """
    dest = Path(dest)
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder")
    tmp, olds = _tag_name(dest, TMP_TAG), []
    try:
        os.mkdir(tmp, 0o777)  # the umask applies, as for mkdir(1)
        _step("dir-created")
        yield tmp
        _step("dir-written")
        if dest.is_dir():
            _carry_over(dest, tmp, replaces)
            _step("dir-carried-over")
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_file(os.path.join(root, name))
            fsync_directory(Path(root))
        ready = _tag_name(dest, NEW_TAG)
        os.rename(tmp, ready)
        tmp = ready
        fsync_directory(dest.parent)
        _step("dir-ready")
        for _ in range(8):  # another writer may swap the same dest between our renames: retry
            if dest.exists():
                olds.append(_tag_name(dest, OLD_TAG))
                with contextlib.suppress(FileNotFoundError):
                    os.rename(dest, olds[-1])
                    _step("dir-old-aside")
            try:
                os.rename(ready, dest)
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.exists():
                    raise
        else:
            raise FileExistsError(f"{dest}: another process keeps replacing it; nothing was written")
        tmp = None
        _step("dir-renamed")
        fsync_directory(dest.parent)
        _step("dir-synced")
        for old in olds:
            _remove(old)
        if olds:
            _step("dir-old-removed")
    except BaseException as e:
        if olds and tmp is not None and not os.path.lexists(dest):
            with contextlib.suppress(OSError):  # failed between the renames: put the old folder back
                os.rename(olds[-1], dest)
        if tmp is not None:
            _remove(Path(tmp))
        err = _write_error(e, dest, tmp)
        if err is e:
            raise
        raise err from None


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _carry_over(old: Path, new: Path, replaces) -> None:
    """Link the entries of ``old`` that ``new`` lacks (and ``replaces`` does not match) into ``new``."""
    for name in os.listdir(old):
        if os.path.lexists(new / name) or any(fnmatch.fnmatchcase(name, p) for p in replaces):
            continue
        if _LEFTOVER_RE.match(name) or _LEGACY_TMP_RE.match(name):
            continue  # a killed write's temporary file: not the user's
        src = old / name
        if src.is_symlink():
            os.symlink(os.readlink(src), new / name)
        elif src.is_dir():
            shutil.copytree(src, new / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(new / name))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)


def save_json_atomic(data: dict, path: Path) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def file_slug(text: str, limit: int = 40) -> str:
    """``text`` as a part of a file name (a CPU's or GPU's name in a result file's): every run of
    other characters than ASCII letters and digits becomes one ``-``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit]


def save_result(stem: Path, record: dict, markdown: list[str]) -> None:
    """A benchmark's result: ``stem``.json (the record) and ``stem``.md (the lines), each written
    atomically, the folder made if missing."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_json_atomic(record, stem.with_suffix(".json"))
    with atomic_write(stem.with_suffix(".md"), "w") as f:
        f.write("\n".join(markdown) + "\n")
