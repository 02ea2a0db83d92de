"""Build script for fastseg.

Install without build isolation so the build sees the torch that is already installed and never
replaces it:

    pip install --no-build-isolation -e .

The Triton kernels live in `fastseg/kernels/`. They are not a top-level `kernels/` folder: run
from the repository root, such a folder shadows the `kernels` package that transformers imports.

The compiled patch-embedding extension (`csrc/`) is built as `fastseg._C` with
torch.utils.cpp_extension (ninja when available):
- a CUDAExtension (CUDA kernel + C++ CPU kernel) when the installed torch has CUDA and nvcc is
  found, else a CppExtension with the CPU kernel only;
- nothing at all with FASTSEG_SKIP_EXT=1, when torch is not importable at build time, or when
  compiling fails (no compiler): the package still installs, and the patch embedding falls back
  to its `torch` backend with one warning (`python -m fastseg info` gives the reason).

Environment variables:
  FASTSEG_SKIP_EXT=1       do not build the extension (it is not loaded at run time either)
  FASTSEG_CUDA_ARCHS       CUDA architectures, default "8.0;9.0" (-gencode for each; the last
                           one also as PTX so newer GPUs can JIT it); 8.0 or newer
  FASTSEG_REQUIRE_EXT=1    make a failed extension build an error instead of a warning
  MAX_JOBS                 parallel compile jobs; default min(CPUs, available RAM / 4 GiB), >= 1
"""
import os
import sys

from setuptools import setup

PACKAGES = ["fastseg", "fastseg.checkpoints", "fastseg.data", "fastseg.deploy", "fastseg.models", "fastseg.ops", "fastseg.kernels"]
ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(message: str) -> None:
    print(f"fastseg setup: {message}", file=sys.stderr)


def _default_max_jobs() -> int:
    """One compile job per CPU, but at most one per 4 GiB of available memory (nvcc on torch's
    headers peaks near 2-3 GiB per job), and at least one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = cpus
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available_gib = int(fields["MemAvailable"].split()[0]) / 2**20
        jobs = min(jobs, int(available_gib // 4))
    except (OSError, KeyError, ValueError):
        pass
    return max(1, jobs)


def _cuda_arch_flags(spec: str) -> list[str]:
    """ "8.0;9.0" -> -gencode flags for sm_80 and sm_90, plus compute_90 PTX for newer GPUs."""
    archs = [a.strip() for a in spec.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    if not archs:
        raise SystemExit(f"FASTSEG_CUDA_ARCHS={spec!r} names no architecture (e.g. '8.0;9.0')")
    flags, codes = [], []
    for arch in archs:
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        try:
            major, minor = (int(p) for p in arch.split("."))
        except ValueError:
            raise SystemExit(f"FASTSEG_CUDA_ARCHS: {arch!r} is not an architecture like '8.0' or '9.0'") from None
        if major < 8:
            raise SystemExit(f"FASTSEG_CUDA_ARCHS: {arch} is not supported: the kernel's bf16 tensor-core path "
                             f"needs compute capability 8.0 or newer")
        code = f"{major}{minor}"
        codes.append(code)
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    newest = max(codes, key=int)
    ptx_flag = f"-gencode=arch=compute_{newest},code=compute_{newest}"
    if ptx_flag not in flags:
        flags.append(ptx_flag)
    return flags


def _extension_build():
    """(ext_modules, cmdclass) for the patch-embedding extension, or ([], {}) with the reason said."""
    if _flag("FASTSEG_SKIP_EXT"):
        _say("FASTSEG_SKIP_EXT=1: not building the compiled extension (the torch backend will be used)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _say(f"torch is not importable at build time ({e}); not building the compiled extension. "
             "Install torch first and build with `pip install --no-build-isolation -e .`")
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    sources = ["csrc/bindings.cpp", "csrc/overlap_patch_embed_checks.cpp", "csrc/overlap_patch_embed_cpu.cpp",
               "csrc/upsample_argmax_cpu.cpp", "csrc/add_layer_norm_cpu.cpp",
               "csrc/decoder_head_cpu.cpp", "csrc/dwconv3x3_gelu_cpu.cpp",
               "csrc/sr_attention_cpu.cpp", "csrc/mix_ffn_cpu.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # no debug info: a faster build and a smaller module; -fopenmp-simd: `#pragma omp simd`
    # reductions (add_layer_norm_cpu.cpp) without the OpenMP runtime; -fno-trapping-math: GCC's
    # default (-ftrapping-math) will not if-convert a float select whose arms compute, so with
    # AVX2 (no masked ops) loops such as the Mix-FFN GELU (dwconv3x3_gelu_rows.h: its non-finite
    # selects) stayed scalar, 4x slower. No FP exception is ever unmasked here, NaN/Inf results
    # are unchanged (clang's default is the same).
    cxx_flags = ["-O3", "-g0", "-fopenmp-simd", "-fno-trapping-math"]
    # at::parallel_for is a header template that runs its body serially unless the *extension* is
    # compiled with OpenMP (_OPENMP): without -fopenmp every CPU kernel here ran on one thread.
    # Linux torch wheels use GNU OpenMP (torch/lib/libgomp.so.1, loaded before fastseg._C), so
    # the extension binds to that same runtime by soname.
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    nvcc_path = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    with_cuda = torch.version.cuda is not None and nvcc_path is not None and os.path.exists(nvcc_path)
    if with_cuda:
        archs = os.environ.get("FASTSEG_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        arch_flags = _cuda_arch_flags(archs)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        ext = cpp_extension.CUDAExtension(
            "fastseg._C",
            sources + ["csrc/overlap_patch_embed_cuda.cpp", "csrc/overlap_patch_embed_kernel_host.cpp",
                       "csrc/overlap_patch_embed_kernel.cu"],
            include_dirs=include_dirs,
            define_macros=[("FASTSEG_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"] + arch_flags},
            extra_link_args=link_flags,
        )
        _say(f"building fastseg._C with CUDA (torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"archs {archs}), MAX_JOBS={os.environ['MAX_JOBS']}")
    else:
        why = "torch was built without CUDA" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)"
        ext = cpp_extension.CppExtension("fastseg._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
        _say(f"building fastseg._C with the CPU kernel only ({why}), MAX_JOBS={os.environ['MAX_JOBS']}")

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension; a failed build (no compiler, …) leaves the package installable."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler missing or failing: the package must still install
                if _flag("FASTSEG_REQUIRE_EXT"):
                    raise
                _say(f"building the extension failed ({type(e).__name__}: {e}); fastseg is installed without "
                     "it and falls back to the torch backend (FASTSEG_REQUIRE_EXT=1 makes this fatal)")
                self.extensions = []  # nothing built, nothing to install

    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension_build()

setup(
    packages=PACKAGES,
    package_dir={"fastseg": "fastseg"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
