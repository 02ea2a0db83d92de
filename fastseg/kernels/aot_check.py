"""Compile every Triton kernel of fastseg ahead of time for real GPU targets (no GPU needed).

    python -m fastseg.kernels.aot_check --arch sm_80 sm_90 [--out FILE] [--jobs N]

Each kernel module lists, in ``aot_variants()``, every variant its launchers can pick (tile
configs, dtypes, head-dim buckets, split / epilogue variants), derived from the same tables and
rules the launchers use. Each variant is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``: Triton lowers it to PTX and ptxas assembles a cubin, so a
``tl.dot`` shape the hardware cannot take, a layout that fails to lower, a config whose shared
memory does not fit or one that spills registers is caught here, which the CPU interpreter
cannot do. The resource usage (registers, local memory, i.e. spills, from ``cuobjdump
--dump-resource-usage``; shared memory from Triton's allocation) is printed as a table, and the
exit status is 1 on a failed compile, a spill or shared memory over the target's limit.

Adding a kernel module: put its name in KERNEL_MODULES and give it an ``aot_variants()``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

KERNEL_MODULES = ("sr_attention", "dwconv3x3_gelu", "decoder_upsample_fuse", "upsample_argmax")
# Max dynamic shared memory per block (bytes): A100 163 KB, H100/H200 227 KB.
SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_STRUCTURAL = ("num_warps", "num_stages")


def parse_arch(text: str) -> int:
    t = text.lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
    if not t.isdigit() or int(t) not in SHARED_LIMITS:
        raise argparse.ArgumentTypeError(f"unknown arch {text!r}; one of "
                                         + ", ".join(f"sm_{a}" for a in SHARED_LIMITS))
    return int(t)


def _scalar_type(value) -> tuple[str, bool]:
    """Triton type of a scalar argument and whether the JIT would mark it divisible by 16."""
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot type the scalar {value!r}")


def _params(fn) -> tuple[list[str], set[str]]:
    """(argument names, constexpr names) of a @triton.jit kernel (also an interpreted one)."""
    import inspect

    py = getattr(fn, "fn", fn)
    sig = inspect.signature(py)
    return list(sig.parameters), {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}


def specialise(fn, args: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) for ASTSource / triton.compile, specialising the
    arguments as the JIT does on a launch: pointers 16-byte aligned, ints equal to 1 folded to
    constants, ints divisible by 16 marked so."""
    names, const_params = _params(fn)
    missing = [n for n in names if n not in args]
    extra = [k for k in args if k not in names and k not in _STRUCTURAL]
    if missing or extra:
        raise ValueError(f"{_name(fn)}: variant arguments missing {missing}, unknown {extra}")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = args[name]
        if name in const_params:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, str) and value.startswith("*"):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and not isinstance(value, bool) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name], div16 = _scalar_type(value)
            if div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: args[k] for k in _STRUCTURAL if k in args}
    return signature, constexprs, attrs, options


def _name(fn) -> str:
    return getattr(getattr(fn, "fn", fn), "__name__", str(fn))


def label(fn, args: dict) -> tuple[str, str]:
    """(config text, dtype) of a variant: its constexprs and launch options; the dtype of its
    tensors (the first fp16 / bf16 pointer, else the first pointer's)."""
    names, consts = _params(fn)
    const_params = [n for n in names if n in consts]
    parts = [f"{n}={args[n]}" for n in const_params] + [f"{k}={args[k]}" for k in _STRUCTURAL if k in args]
    ptrs = [v[1:] for v in args.values() if isinstance(v, str) and v.startswith("*")]
    # fp32 workspaces and int outputs say little: the first fp16 / bf16 pointer names the variant.
    low = [t for t in ptrs if t in ("fp16", "bf16")]
    return " ".join(parts), (low[0] if low else ptrs[0] if ptrs else "-")


def _upsample_argmax_variants():
    """upsample_argmax's launcher rules (BLOCK_W = min(256, next_pow2(W)); 4 warps from 128
    columns, else 1), until its module enumerates them in its own aot_variants()."""
    from fastseg.kernels import upsample_argmax as m

    for name in ("fp32", "fp16", "bf16"):
        for block_w in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            for scores in (False, True):
                yield m._upsample_argmax_kernel, dict(
                    x_ptr="*" + name, labels_ptr="*i64", scores_ptr="*" + name if scores else "*i64",
                    K=150, h=128, w=128, H=512, W=512, sb=150 * 128 * 128, sk=128 * 128, sh=128, sw=1,
                    scale_h=0.25, scale_w=0.25, WRITE_SCORES=scores, BLOCK_W=block_w,
                    num_warps=4 if block_w >= 128 else 1, num_stages=3)


# Enumerators kept here for kernel modules that do not define aot_variants() themselves.
_FALLBACK_VARIANTS = {"upsample_argmax": _upsample_argmax_variants}


def variants(modules=KERNEL_MODULES) -> list[tuple[str, object, dict]]:
    """Every (module, kernel, args) the launchers can pick; modules that do not exist yet are skipped."""
    out = []
    for mod_name in modules:
        try:
            module = importlib.import_module(f"fastseg.kernels.{mod_name}")
        except ModuleNotFoundError as e:
            if e.name == f"fastseg.kernels.{mod_name}":
                continue
            raise
        enumerate_fn = getattr(module, "aot_variants", None) or _FALLBACK_VARIANTS.get(mod_name)
        if enumerate_fn is None:
            raise RuntimeError(f"fastseg.kernels.{mod_name} has no aot_variants(): aot_check cannot cover it")
        for fn, args in enumerate_fn():
            out.append((mod_name, fn, args))
    return out


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """{'registers', 'local', 'stack'} of the one kernel in a cubin (cuobjdump's resource usage)."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships with Triton's NVIDIA backend)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            usage = {"registers": int(fields["REG"]), "local": int(fields.get("LOCAL", 0)),
                     "stack": int(fields.get("STACK", 0))}
    if not usage:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    return usage


def compile_one(task: tuple[int, str, int]) -> dict:
    """Compile variant ``index`` of ``mod_name`` (re-enumerated here: workers get plain data) for
    compute capability ``cc``; returns the table row."""
    index, mod_name, cc = task
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, fn, args = [v for v in variants((mod_name,))][index]
    config, dtype = label(fn, args)
    row = {"kernel": _name(fn), "module": mod_name, "config": config, "dtype": dtype, "arch": f"sm_{cc}"}
    t0 = time.perf_counter()
    try:
        signature, constexprs, attrs, options = specialise(fn, args)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                                options=options)
        row.update(resource_usage(kernel.asm["cubin"]))
        row["shared"] = int(kernel.metadata.shared)
        row["error"] = None
    except Exception as e:  # a kernel that fails to lower is a finding, not a crash of the check
        row.update(registers=None, local=None, stack=None, shared=None,
                   error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def problems(row: dict) -> list[str]:
    out = []
    if row["error"]:
        return [f"compile failed: {row['error']}"]
    if row["local"] or row["stack"]:
        out.append(f"spills: {row['local']} B local memory, {row['stack']} B stack per thread")
    limit = SHARED_LIMITS[int(row["arch"][3:])]
    if row["shared"] > limit:
        out.append(f"shared memory {row['shared']} B > {limit} B")
    return out


def _worker_init():
    os.environ["TRITON_INTERPRET"] = "0"


def run(archs: list[int], jobs: int, modules=KERNEL_MODULES, progress=None, match: str | None = None) -> list[dict]:
    """Compile every variant (those whose "kernel config dtype" text contains ``match``, if
    given) for every arch with ``jobs`` processes; rows in a stable order."""
    index: dict[str, int] = {}
    picked = []
    for mod_name, fn, args in variants(modules):
        i = index[mod_name] = index.get(mod_name, -1) + 1
        config, dtype = label(fn, args)
        if match is None or match in f"{_name(fn)} {config} {dtype}":
            picked.append((i, mod_name))
    tasks = [(i, m, cc) for i, m in picked for cc in archs]
    rows: list[dict | None] = [None] * len(tasks)
    if jobs <= 1:
        for k, task in enumerate(tasks):
            rows[k] = compile_one(task)
            if progress:
                progress(k + 1, len(tasks))
        return rows
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fresh interpreters: compiled mode, no inherited Triton state
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(compile_one, t): k for k, t in enumerate(tasks)}
        for done, fut in enumerate(cf.as_completed(futures), 1):
            rows[futures[fut]] = fut.result()
            if progress:
                progress(done, len(tasks))
    return rows


def _kib(b) -> str:
    return "-" if b is None else f"{b / 1024:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| kernel | config | dtype | arch | registers | spill (local B) | shared KiB | status |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        bad = problems(r)
        lines.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['arch']} | "
                     f"{'-' if r['registers'] is None else r['registers']} | "
                     f"{'-' if r['local'] is None else r['local'] + r['stack']} | {_kib(r['shared'])} | "
                     f"{'; '.join(bad) if bad else 'ok'} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per kernel and arch: variants, max registers, max shared memory, failures."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    lines = ["| kernel | arch | variants | max registers | max shared KiB | spills | over shared limit | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (kernel, arch), rs in groups.items():
        ok = [r for r in rs if not r["error"]]
        limit = SHARED_LIMITS[int(arch[3:])]
        lines.append(f"| {kernel} | {arch} | {len(rs)} | {max((r['registers'] for r in ok), default='-')} | "
                     f"{_kib(max((r['shared'] for r in ok), default=None))} | "
                     f"{sum(1 for r in ok if r['local'] or r['stack'])} | "
                     f"{sum(1 for r in ok if r['shared'] > limit)} | {len(rs) - len(ok)} |")
    return "\n".join(lines)


def versions() -> str:
    import platform

    import torch
    import triton

    return f"triton {triton.__version__}, torch {torch.__version__}, python {platform.python_version()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastseg.kernels.aot_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", type=parse_arch, default=[80, 90], help="targets, e.g. sm_80 sm_90")
    p.add_argument("--out", help="write the Markdown table (summary + every variant) to this file")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--kernels", nargs="+", choices=KERNEL_MODULES, default=list(KERNEL_MODULES),
                   help="kernel modules to check (default: all)")
    p.add_argument("--match", help="only variants whose 'kernel config dtype' text contains this")
    p.add_argument("--summary-only", action="store_true", help="print the per-kernel summary, not every variant")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "0":
        # fastseg.kernels switches the interpreter on where torch sees no GPU, and the mode is
        # fixed when triton and the kernels load: start again in compiled mode.
        env = {"TRITON_DEFAULT_FP_FUSION": "1", **os.environ, "TRITON_INTERPRET": "0"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "fastseg.kernels.aot_check", *argv], env=env)
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done, total):
        if time.perf_counter() - last[0] > 10 or done == total:
            last[0] = time.perf_counter()
            print(f"  compiled {done}/{total}", file=sys.stderr, flush=True)

    rows = run(args.arch, max(1, args.jobs), args.kernels, progress, args.match)
    elapsed = time.perf_counter() - t0
    bad = [(r, problems(r)) for r in rows if problems(r)]
    if not rows:
        print(f"aot_check: no variant matches {args.match!r}", file=sys.stderr)
        return 2
    head = (f"{len(rows)} compiles ({len(rows) // len(args.arch)} variants x {len(args.arch)} archs: "
            f"{', '.join(f'sm_{a}' for a in args.arch)}) in {elapsed:.0f} s with {args.jobs} jobs; {versions()}")
    if not args.summary_only:
        print(table(rows))
        print()
    print(summary(rows))
    print()
    print(head)
    if args.out:
        from pathlib import Path

        text = ["# Triton kernels compiled ahead of time", "",
                f"`python -m fastseg.kernels.aot_check --arch {' '.join(f'sm_{a}' for a in args.arch)}`: {head}.",
                "Registers and local memory (spills) from `cuobjdump --dump-resource-usage` of the cubin, "
                "shared memory from Triton's allocation; limits sm_80 163 KiB, sm_90 227 KiB.", "",
                "## Per kernel", "", summary(rows), "", "## Every variant", "", table(rows), ""]
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(text))
        os.replace(tmp, path)
    for r, why in bad:
        print(f"FAIL {r['kernel']} [{r['config']}] {r['dtype']} {r['arch']}: {'; '.join(why)}", file=sys.stderr)
    print(f"aot_check: {'FAILED, ' + str(len(bad)) + ' problem(s)' if bad else 'ok'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
