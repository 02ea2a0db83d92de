"""How the command line reports a failure: one line, exit code 1, no traceback.

Expected failures are the ones a user can act on: a missing or unreadable file, a full disk
(any ``OSError``, named with its path), a bad option or input (``ValueError`` and the project's
errors derived from it: ``CheckpointError``, ``ExportError``…), a missing optional package, a
run out of memory, a training loss that diverged. Anything else is a bug and keeps its traceback.
``FASTSEG_DEBUG=1`` shows the traceback of every failure.

A DataLoader re-raises a worker's exception in the main process with the worker's whole traceback
as its message; :func:`original` turns it back into the worker's own exception type and message,
so ``fastseg eval`` with a bad label file says what is wrong with the file in one line.
"""
from __future__ import annotations

import os
import re
import sys
import traceback

DEBUG_ENV = "FASTSEG_DEBUG"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# torch.utils.data's ExceptionWrapper: "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback…"
_WORKER_RE = re.compile(r"^Caught (?P<type>[\w.]+) in (?P<where>[^\n]*)\.\nOriginal (?P<trace>Traceback.*)\Z", re.S)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def expected_types() -> tuple[type, ...]:
    found = [OSError, ValueError, ImportError, MemoryError, FloatingPointError]
    try:
        import torch

        found.append(torch.OutOfMemoryError)
    except (ImportError, AttributeError):  # pragma: no cover - torch < 2.5 names it differently
        pass
    return tuple(found)


def original(exc: BaseException) -> BaseException:
    """The exception a DataLoader worker raised, rebuilt from the re-raised copy's message (the same
    type, the worker's own message); any other exception unchanged."""
    text = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    m = _WORKER_RE.match(text)
    if not m:
        return exc
    name = type(exc).__name__
    lines = m["trace"].splitlines()
    # The last line that starts with the type's name (bare or module-qualified) begins the message.
    for i in range(len(lines) - 1, -1, -1):
        head, sep, _ = lines[i].partition(":")
        if sep and (head == name or head.endswith("." + name) or head == m["type"]) and not lines[i].startswith(" "):
            message = "\n".join([lines[i][len(head) + 1:].strip(), *lines[i + 1:]]).strip()
            break
    else:
        return exc
    try:
        rebuilt = type(exc)(message)
    except Exception:  # a type whose constructor wants other arguments: keep the text, plain
        rebuilt = RuntimeError(message)
    rebuilt.__cause__ = exc
    return rebuilt


def one_line(exc: BaseException) -> str:
    """A message for ``exc`` on a single line; an ``OSError`` names its path (and errno)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        also = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        text = f"{where}{exc.strerror}{also}"
        if exc.errno is not None:
            text += f" (errno {exc.errno})"
    elif isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run_command(command: str, func, args) -> int:
    """``func(args)`` as the CLI runs it: expected failures become ``fastseg <command>: error: …``
    on stderr and exit code 1; Ctrl-C exits 130; with ``FASTSEG_DEBUG=1`` the traceback is printed too."""
    try:
        return func(args)
    except KeyboardInterrupt:
        if debug():
            traceback.print_exc()
        print(f"fastseg {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except expected_types() as e:
        exc = original(e)
        if debug():
            traceback.print_exc()
        print(f"fastseg {command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
