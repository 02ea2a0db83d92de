"""The one place that decides which backend runs each fused op.

Backends, in the order they are preferred:
  ``triton``    Triton kernels (CUDA tensors; CPU tensors under Triton's interpreter)
  ``cuda``/``cpp``  the compiled extension (CUDA kernel / C++ CPU kernel)
  ``torch``     a fast composition of stock PyTorch ops (the fused path on CPU)
  ``reference`` the eager semantics of the official code; always available

Each backend declares what it supports through ``not_supported_reasons(**inputs)``, and may
add ``auto_reasons`` for choices it should not be picked for automatically (Triton on CPU runs
only under its interpreter); the first backend with no reasons wins. The user can force one backend with ``FASTSEG_BACKEND=<name>`` or
the :func:`use_backend` context manager: an op that implements the forced backend must use it,
and raises :class:`BackendUnavailable` with the reasons if it cannot; an op that has no backend
of that name keeps its automatic choice (``info`` shows which).
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

FUSED_OPS = ("overlap_patch_embed", "sr_attention", "dwconv3x3_gelu", "decoder_upsample_fuse",
             "upsample_argmax", "add_layer_norm", "mix_ffn")
BACKEND_NAMES = ("triton", "cuda", "cpp", "torch", "reference")
REFERENCE = "reference"


class BackendUnavailable(RuntimeError):
    """A backend the user asked for explicitly cannot run these inputs."""


@dataclass(frozen=True)
class Backend:
    name: str
    # Returns why this backend cannot run the given inputs (empty list: it can).
    not_supported_reasons: Callable[..., list[str]]
    # The implementation; its signature is the op's.
    impl: Callable | None = None
    # Why it should not be chosen automatically although it could run (forcing still works).
    auto_reasons: Callable[..., list[str]] | None = None


@dataclass(frozen=True)
class Choice:
    op: str
    backend: str
    # Why each better-ranked backend was passed over: {backend: [reasons]}.
    skipped: dict[str, list[str]] = field(default_factory=dict)
    forced: bool = False
    # Tuned dispatch (fastseg.tune): the measured choices and timings for this op, if any.
    tuned: str = ""

    def describe(self) -> str:
        text = self.backend + (" (forced)" if self.forced else "")
        if self.skipped:
            why = "; ".join(f"{name}: {', '.join(r)}" for name, r in self.skipped.items())
            text += f"  [passed over: {why}]"
        if self.tuned:
            text += f"  [tuned: {self.tuned}]"
        return text


_registry: dict[str, list[Backend]] = {op: [] for op in FUSED_OPS}
_forced = threading.local()
_facts = threading.local()  # the facts of this thread's last choose() per op (for tuning)
# (wrap(op, backend, impl) -> callable, describe(op, facts) -> str), set by fastseg.tune;
# None: static dispatch only.
_tuning = None


def set_tuning_hooks(wrap: Callable, describe: Callable) -> None:
    global _tuning
    _tuning = (wrap, describe)


def tuning_hooks():
    return _tuning


def last_facts(op: str) -> dict | None:
    return getattr(_facts, "by_op", {}).get(op)


def register(op: str, backend: Backend) -> None:
    """Add a backend for ``op``; backends are kept in the order of BACKEND_NAMES."""
    if op not in _registry:
        raise ValueError(f"unknown op {op!r}; known ops: {list(FUSED_OPS)}")
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {list(BACKEND_NAMES)}, got {backend.name!r}")
    entries = [b for b in _registry[op] if b.name != backend.name] + [backend]
    entries.sort(key=lambda b: BACKEND_NAMES.index(b.name))
    _registry[op] = entries


def register_reference(op: str, impl: Callable) -> None:
    """The op's reference implementation: always able to run, chosen when nothing else fits."""
    register(op, Backend(REFERENCE, lambda **_: [], impl))


def backends_of(op: str) -> list[Backend]:
    return list(_registry[op])


def forced_backend() -> str | None:
    """The backend the user forced (context manager first, then FASTSEG_BACKEND), or None."""
    name = getattr(_forced, "name", None) or os.environ.get("FASTSEG_BACKEND") or None
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"FASTSEG_BACKEND={name!r} is not a backend; choose one of {list(BACKEND_NAMES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op that implements it, inside the ``with`` block (this thread)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKEND_NAMES)}")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def choose(op: str, **inputs) -> Choice:
    """Pick the backend for ``op`` on these inputs (device, dtype and op-specific facts)."""
    if op not in _registry:
        raise ValueError(f"unknown op {op!r}; known ops: {list(FUSED_OPS)}")
    candidates = [b for b in _registry[op] if b.name != REFERENCE]
    if _tuning is not None:  # only with tuning on: static dispatch stays as torch.compile traced it
        if not hasattr(_facts, "by_op"):
            _facts.by_op = {}
        _facts.by_op[op] = inputs
    forced = forced_backend()
    if forced == REFERENCE:
        return Choice(op, REFERENCE, forced=True)
    if forced is not None:
        match = [b for b in candidates if b.name == forced]
        if match:
            reasons = match[0].not_supported_reasons(**inputs)
            if reasons:
                raise BackendUnavailable(
                    f"{op}: backend {forced!r} was forced but cannot run here: " + "; ".join(reasons)
                )
            return Choice(op, forced, forced=True)
    skipped: dict[str, list[str]] = {}
    for backend in candidates:
        reasons = backend.not_supported_reasons(**inputs)
        if not reasons and backend.auto_reasons is not None:
            reasons = backend.auto_reasons(**inputs)
        if not reasons:
            return Choice(op, backend.name, skipped, tuned=_tuning[1](op, inputs) if _tuning else "")
        skipped[backend.name] = reasons
    if not candidates:
        skipped["fused"] = [f"no fused implementation of {op} is built yet"]
    return Choice(op, REFERENCE, skipped, tuned=_tuning[1](op, inputs) if _tuning else "")


def implementation(op: str, backend: str) -> Callable:
    for b in _registry[op]:
        if b.name == backend:
            # Tuned dispatch picks per call among the backends that can run it (fastseg.tune).
            return _tuning[0](op, backend, b.impl) if _tuning else b.impl
    raise KeyError(f"{op} has no backend {backend!r}")


def resolve(op: str, **inputs) -> Callable:
    """The implementation to call for these inputs (see :func:`choose`)."""
    return implementation(op, choose(op, **inputs).backend)
