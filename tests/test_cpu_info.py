"""fastseg.cpu_info (which CPU a result names), fastseg.cpu_gemm (GEMM rates) and the CPU fields
of ``fastseg bench``'s record."""
import json

import pytest
import torch
import torch.nn.functional as F

from fastseg import cpu_gemm, cpu_info

# Canned /proc/cpuinfo texts (two logical CPUs each, trimmed to the fields that matter plus noise).
SAPPHIRE_RAPIDS_VM = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 8
microcode\t: 0xffffffff
flags\t\t: fpu vme sse sse2 ssse3 fma avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 avx512_vbmi amx_tile amx_int8 arch_capabilities
bogomips\t: 4200.00

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 8
flags\t\t: fpu vme sse sse2 ssse3 fma avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 avx512_vbmi amx_tile amx_int8 arch_capabilities
"""

GENOA = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
stepping\t: 1
flags\t\t: fpu sse sse2 ssse3 fma avx avx2 avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg
power management:

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
stepping\t: 1
flags\t\t: fpu sse sse2 ssse3 fma avx avx2 avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg
"""

MILAN = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse sse2 ssse3 fma avx f16c avx2 bmi2 vaes vpclmulqdq rdpid fsrm
"""

NEOVERSE = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm bf16 i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_intel_vm_with_a_generic_brand_string_is_named_by_its_model_number():
    ident = cpu_info.parse_cpuinfo(SAPPHIRE_RAPIDS_VM)
    assert (ident["vendor"], ident["family"], ident["model"], ident["stepping"]) == ("Intel", 6, 143, 8)
    assert ident["microarch"] == "Sapphire Rapids"
    assert ident["logical_cpus"] == 2
    assert ident["flags"] == list(cpu_info.ISA_FLAGS)  # every flag we track, in our order
    assert cpu_info.label(ident) == "Intel(R) Xeon(R) Processor (family 6 model 143, Sapphire Rapids)"
    assert cpu_info.isa_summary(ident["flags"]) == "AMX + AVX512-BF16"


def test_zen4_has_avx512_bf16_but_no_amx():
    ident = cpu_info.parse_cpuinfo(GENOA)
    assert ident["vendor"] == "AMD" and ident["microarch"] == "Zen 4"
    assert ident["flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"]
    assert cpu_info.label(ident) == "AMD EPYC 9R14 96-Core Processor (family 25 model 17, Zen 4)"
    assert cpu_info.isa_summary(ident["flags"]) == "AVX512-BF16"


def test_zen3_is_avx2_only():
    ident = cpu_info.parse_cpuinfo(MILAN)
    assert ident["microarch"] == "Zen 3" and ident["logical_cpus"] == 1
    assert ident["flags"] == ["avx2", "fma"]  # f16c, vaes, vpclmulqdq are not AVX-512
    assert cpu_info.label(ident) == "AMD EPYC (family 25 model 1, Zen 3)"
    assert cpu_info.isa_summary(ident["flags"]) == "AVX2"


@pytest.mark.parametrize("vendor, family, model, stepping, want", [
    ("GenuineIntel", 6, 0x55, 4, "Skylake-SP"), ("GenuineIntel", 6, 0x55, 7, "Cascade Lake"),
    ("GenuineIntel", 6, 0x55, 11, "Cooper Lake"), ("GenuineIntel", 6, 0xCF, 2, "Emerald Rapids"),
    ("GenuineIntel", 6, 0xAD, 1, "Granite Rapids"), ("GenuineIntel", 6, 0x6A, 6, "Ice Lake-SP"),
    ("AuthenticAMD", 23, 0x31, 0, "Zen 2"), ("AuthenticAMD", 23, 0x01, 2, "Zen/Zen+"),
    ("AuthenticAMD", 25, 0x21, 0, "Zen 3"), ("AuthenticAMD", 25, 0x61, 2, "Zen 4"),
    ("AuthenticAMD", 25, 0xA0, 1, "Zen 4"), ("AuthenticAMD", 26, 0x02, 0, "Zen 5"),
    ("AuthenticAMD", 21, 0x02, 0, None), ("GenuineIntel", 6, 0x01, 0, None),
])
def test_microarchitecture_table(vendor, family, model, stepping, want):
    assert cpu_info.microarchitecture(vendor, family, model, stepping) == want


def test_a_cpuinfo_without_x86_fields_names_no_x86_flags():
    ident = cpu_info.parse_cpuinfo(NEOVERSE)
    assert ident["flags"] == [] and ident["microarch"] is None and ident["family"] is None
    assert cpu_info.isa_summary(ident["flags"]) == "no AVX2"


def test_onednn_verbose_parsing():
    text = ("onednn_verbose,v1,info,oneDNN v3.7.1 (commit 8d263e693366ef8db40acc569cc7d8edf644556d)\n"
            "onednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:2\n"
            "onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with float16, Intel DL Boost and bfloat16 support and "
            "Intel AMX with bfloat16 and 8-bit integer support\n"
            "onednn_verbose,v1,info,gpu,runtime:none\n"
            "onednn_verbose,v1,primitive,exec,cpu,inner_product,brg_matmul:avx512_core_amx,forward_inference,"
            "src:f32::blocked:ab::f0 wei:f32::blocked:ab::f0,,mb8ic16oc4,0.03\n")
    got = cpu_info.parse_onednn_verbose(text)
    assert got == {"onednn_version": "3.7.1",
                   "onednn_isa": "Intel AVX-512 with float16, Intel DL Boost and bfloat16 support and Intel AMX "
                                 "with bfloat16 and 8-bit integer support",
                   "onednn_inner_product": "brg_matmul:avx512_core_amx"}
    assert cpu_info.parse_onednn_verbose("") == dict.fromkeys(got)


def test_this_machines_record_agrees_with_atens_dispatch(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSEG_CACHE_DIR", str(tmp_path))
    cpu_info.onednn.cache_clear()  # probe afresh, into this test's cache folder
    rec = cpu_info.record()
    assert set(rec["isa_flags"]) == set(cpu_info.ISA_FLAGS)
    assert rec["threads"] == torch.get_num_threads() and rec["label"]
    # Two independent sources: /proc/cpuinfo's flags and the kernels ATen picked at start-up.
    if rec["aten_isa"].startswith("AVX512"):
        assert rec["isa_flags"]["avx512f"]
    if rec["aten_isa"] in ("AVX2", "AVX512"):
        assert rec["isa_flags"]["avx2"]
    if torch.backends.mkldnn.is_available():
        assert rec["onednn_isa"], rec.get("onednn_error")
        assert ("AVX2" in rec["onednn_isa"] or "AVX-512" in rec["onednn_isa"]) == (rec["isa_flags"]["avx2"])
        cached = json.loads((tmp_path / "onednn_isa.json").read_text())  # probed once, then read back
        assert [v["onednn_isa"] for v in cached.values()] == [rec["onednn_isa"]]
    for line in cpu_info.summary_lines(rec):
        assert line.strip()


# --- GEMM rates -----------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", cpu_gemm.IMPLS)
def test_each_gemm_implementation_computes_the_linear(impl):
    shape = (37, 24, 19)
    fn = cpu_gemm.gemm_fn(impl, shape, torch.float32, seed=3)
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(37, 24, generator=g), torch.randn(19, 24, generator=g), torch.randn(19, generator=g)
    torch.testing.assert_close(fn(), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    rate = cpu_gemm.measure(impl, shape, torch.float32, budget_s=0.0)
    assert rate["repeats"] == 3 and rate["best_gflops"] >= rate["median_gflops"] > 0


def test_onednn_bf16_runs_where_the_cpu_has_it_and_says_why_not_elsewhere():
    shape = (33, 64, 40)
    if cpu_info.onednn_bf16():
        out = cpu_gemm.gemm_fn("onednn", shape, torch.bfloat16)()
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    else:
        with pytest.raises(cpu_gemm.Unsupported, match="bf16"):
            cpu_gemm.gemm_fn("onednn", shape, torch.bfloat16)
        assert "bf16" in cpu_gemm.measure("onednn", shape, torch.bfloat16)["unsupported"]
    with pytest.raises(ValueError, match="mkl"):
        cpu_gemm.gemm_fn("mkl", shape, torch.float32)


def test_profile_counts_each_linear_gemm_once_with_its_flops():
    torch.manual_seed(0)
    x2, x3 = torch.randn(50, 24), torch.randn(2, 30, 24)
    w1, w2, b = torch.randn(40, 24), torch.randn(24, 40), torch.randn(40)
    packed = torch.ops.mkldnn._reorder_linear_weight(w1, 60) if torch.backends.mkldnn.is_available() else None

    def forward():
        with torch.inference_mode():
            F.linear(x2, w1, b)                      # addmm
            F.linear(x3, w1)                          # 3-D, no bias: matmul -> mm
            torch.mm(x2, w2)                          # mm: (50 x 24) . (24 x 40)
            if packed is not None:
                torch.ops.mkldnn._linear_pointwise(x3, packed, b, "none", [], "")

    got = cpu_gemm.profile_gemms(forward)
    want = 2 * (50 * 24 * 40 + 60 * 24 * 40 + 50 * 24 * 40 + (60 * 24 * 40 if packed is not None else 0))
    assert got["calls"] == (4 if packed is not None else 3)
    assert got["gflop"] * 1e9 == pytest.approx(want)
    assert got["ms"] > 0 and got["gflops"] == pytest.approx(got["gflop"] / (got["ms"] / 1e3))
    judged = cpu_gemm.against_peak(got, {"gflops": 2 * got["gflops"], "impl": "aten"})
    assert judged["frac_of_peak"] == pytest.approx(0.5)


def test_the_peak_is_measured_once_and_cached_per_thread_count(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSEG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_gemm, "PEAK_SHAPE", (96, 64, 80))  # small: the test checks the plumbing
    assert cpu_gemm.peak("fp32", measure_if_missing=False) is None
    rows = cpu_gemm.sweep({"peak": cpu_gemm.PEAK_SHAPE}, dtypes=("fp32",), budget_s=0.0)
    first = cpu_gemm.peak_from_rows(rows, "fp32")
    assert first["gflops"] == max(r["best_gflops"] for r in rows) and first["impl"] in cpu_gemm.IMPLS
    assert cpu_gemm.store_peak(first) == first
    assert cpu_gemm.peak(torch.float32, measure_if_missing=False) == first
    slower = {**first, "gflops": first["gflops"] / 2}  # measured on a busy machine: must not lower the peak
    assert cpu_gemm.store_peak(slower) == first and cpu_gemm.peak("fp32", measure_if_missing=False) == first
    faster = {**first, "gflops": first["gflops"] * 2}
    assert cpu_gemm.store_peak(faster) == faster and cpu_gemm.peak("fp32", measure_if_missing=False) == faster
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert cpu_gemm.peak("fp32", measure_if_missing=False) is None  # another setting, another peak
    finally:
        torch.set_num_threads(threads)
    assert cpu_gemm.peak("fp16") is None  # no CPU GEMM peak is kept for fp16


# --- the bench record -----------------------------------------------------------------------------

def test_bench_record_names_the_cpu_and_the_gemm_rate(tmp_path, monkeypatch, capsys):
    from fastseg.cli import main

    monkeypatch.setenv("FASTSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_gemm, "PEAK_SHAPE", (96, 64, 80))
    results = tmp_path / "benchmarks" / "results"
    readme = tmp_path / "benchmarks" / "README.md"
    readme.parent.mkdir(parents=True)
    readme.write_text("# results\n<!-- results:begin -->\n<!-- results:end -->\n")
    assert main(["bench", "--height", "48", "--width", "40", "--repeats", "1", "--warmup", "0",
                 "--out", str(results), "--quiet", "--no-plot"]) == 0
    record = json.loads(next(results.glob("*.json")).read_text())
    cpu = record["cpu"]
    assert {"label", "vendor", "model_name", "microarch", "isa_flags", "aten_isa", "onednn_isa", "threads"} <= set(cpu)
    assert set(cpu["isa_flags"]) == set(cpu_info.ISA_FLAGS)
    assert cpu["threads"] == torch.get_num_threads()
    assert cpu == {**cpu_info.record(), "threads": cpu["threads"]}
    rows = {r["mode"]: r for r in record["results"]}
    for mode in ("eager", "fused"):
        g = rows[mode]["gemm"]
        assert g["calls"] > 0 and g["gflop"] > 0 and g["peak_gflops"] > 0
        assert g["frac_of_peak"] == pytest.approx(g["gflops"] / g["peak_gflops"])
    assert (tmp_path / "cache" / "gemm_peak.json").exists()  # measured once, then read back
    md = next(results.glob("*.md")).read_text()
    assert f"CPU: {cpu_info.short(cpu)}" in md and "GEMM GFLOP/s" in md
    summary = readme.read_text()
    assert "| CPU |" in summary and cpu_info.short(cpu) in summary
    assert f"CPU: {cpu_info.short(cpu)}" in capsys.readouterr().out
