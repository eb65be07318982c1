"""resnet_edge/core on its own: the CPU probe read from /proc/cpuinfo text, and provider names.

Nothing here depends on the CPU that runs the tests: each CPU is described by the text its /proc/cpuinfo
would hold, and the architecture platform.machine() reports is set by the test.
"""

from __future__ import annotations

import platform

import pytest

from resnet_edge.core import machine
from resnet_edge.core.machine import ISA_FLAGS, cpu_info
from resnet_edge.core.providers import (
    CPU,
    CUDA,
    TENSORRT,
    is_cpu_provider,
    is_cuda_device_provider,
    is_tensorrt_provider,
    provider_name,
)

# An Ice Lake Xeon (AVX-512 with VNNI, no AVX-VNNI, no BF16, no AMX): two processors, as the file lists each.
XEON_VNNI = "".join(
    f"""processor\t: {i}
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss \
ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq \
ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor \
lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 avx2 smep bmi2 \
erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt \
xsavec xgetbv1 xsaves wbnoinvd ida arat avx512vbmi pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni \
avx512_bitalg tme avx512_vpopcntdq rdpid md_clear flush_l1d arch_capabilities
bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs mmio_stale_data eibrs_pbrsb

"""
    for i in range(2)
)

# A Milan EPYC: AVX2 (and "avx", a prefix of it), no AVX-512, no VNNI.
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq \
pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm \
cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext invpcid_single ssbd ibrs ibpb stibp vmmcall \
fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 \
clzero xsaveerptr arat npt nrip_save umip vaes vpclmulqdq rdpid fsrm

"""

# ARM Linux names the flags "Features" and often has no model name at all.
NEOVERSE_N1 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""
CORTEX_A72 = NEOVERSE_N1.replace(
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
    "asimdrdm lrcpc dcpop asimddp ssbs",
    "Features\t: fp asimd evtstrm crc32 cpuid",
)


def _probe(tmp_path, monkeypatch, text: str | None, arch: str, processor: str = ""):
    """cpu_info() on a machine whose /proc/cpuinfo holds ``text`` (None: no such file, as off Linux)."""
    monkeypatch.setattr(platform, "machine", lambda: arch)
    monkeypatch.setattr(platform, "processor", lambda: processor)
    path = tmp_path / "cpuinfo"
    if text is not None:
        path.write_text(text)
    return cpu_info(path)


def test_a_vnni_xeon_reads_as_one(tmp_path, monkeypatch):
    cpu = _probe(tmp_path, monkeypatch, XEON_VNNI, "x86_64")
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz" and cpu.arch == "x86_64"
    # AVX-512 VNNI is not AVX-VNNI (Alder Lake and later), and no BF16 or AMX on Ice Lake
    assert cpu.isa == {
        "avx2": True,
        "avx512f": True,
        "avx512_vnni": True,
        "avx_vnni": False,
        "avx512_bf16": False,
        "amx_tile": False,
        "amx_int8": False,
        "amx_bf16": False,
    }
    assert cpu.int8_dot_product and not cpu.u8s8_saturates and not cpu.is_arm
    assert "int8 dot product" in cpu.describe() and "avx512_vnni" in cpu.describe()


def test_an_avx2_epyc_has_no_int8_dot_product(tmp_path, monkeypatch):
    cpu = _probe(tmp_path, monkeypatch, EPYC_AVX2, "x86_64")
    assert cpu.model == "AMD EPYC 7B13"
    assert cpu.isa == {f: f == "avx2" for f in ISA_FLAGS}
    assert not cpu.int8_dot_product and cpu.u8s8_saturates
    assert cpu.describe() == "AMD EPYC 7B13 (x86_64; avx2; no int8 dot-product instructions)"


def test_arm_features_line_gives_dotprod(tmp_path, monkeypatch):
    cpu = _probe(tmp_path, monkeypatch, NEOVERSE_N1, "aarch64")
    assert cpu.is_arm and cpu.isa == {"asimddp": True}  # the x86 flags are not asked on ARM
    assert cpu.int8_dot_product and not cpu.u8s8_saturates
    assert cpu.model == "aarch64"  # no model name line, no platform.processor(): the architecture

    older = _probe(tmp_path, monkeypatch, CORTEX_A72, "aarch64", processor="Cortex-A72")
    assert older.isa == {"asimddp": False} and not older.int8_dot_product
    assert not older.u8s8_saturates  # ARM's int8 kernels widen: no saturation even without dotprod
    assert older.model == "Cortex-A72"


@pytest.mark.parametrize("arch", ["x86_64", "AMD64"])  # macOS on Intel, Windows
def test_off_linux_every_x86_flag_reads_false(tmp_path, monkeypatch, arch):
    """No /proc/cpuinfo: every ISA flag is there and False, so nothing claims VNNI it was not shown."""
    cpu = _probe(tmp_path, monkeypatch, None, arch, processor="Intel64 Family 6 Model 85")
    assert cpu.isa == dict.fromkeys(ISA_FLAGS, False)
    assert not cpu.int8_dot_product and cpu.u8s8_saturates
    assert cpu.model == "Intel64 Family 6 Model 85"
    assert cpu.isa_summary == "none of " + ", ".join(ISA_FLAGS)


def test_off_linux_arm_flags_are_unknown_and_apple_silicon_has_dotprod(tmp_path, monkeypatch):
    mac = _probe(tmp_path, monkeypatch, None, "arm64", processor="arm")
    assert mac.isa == {} and mac.isa_summary == "ISA flags unknown"
    assert mac.int8_dot_product and not mac.u8s8_saturates  # every Apple Silicon has dotprod
    other = _probe(tmp_path, monkeypatch, None, "aarch64")
    assert other.isa == {} and not other.int8_dot_product  # unknown is not claimed


def test_a_described_machine_is_the_same_cpu_only_with_the_same_flags(tmp_path, monkeypatch):
    xeon = _probe(tmp_path, monkeypatch, XEON_VNNI, "x86_64")
    assert xeon.same_as({"cpu": xeon.model, "isa": dict(xeon.isa)})
    assert not xeon.same_as({"cpu": xeon.model, "isa": {**xeon.isa, "avx512_vnni": False}})
    assert not xeon.same_as({"cpu": "AMD EPYC 7B13", "isa": dict(xeon.isa)})
    assert not xeon.same_as(None) and not xeon.same_as({})


def test_machine_description_carries_the_probe(monkeypatch):
    epyc = machine.CpuInfo("AMD EPYC 7B13", "x86_64", {f: f == "avx2" for f in ISA_FLAGS})
    monkeypatch.setattr(machine, "cpu_info", lambda *a: epyc)
    described = machine.machine(threads=2, gpu=False)
    assert described["cpu"] == "AMD EPYC 7B13" and described["isa"] == epyc.isa
    assert described["int8_dot_product"] is False and described["threads"] == 2 and described["gpu"] is None


# ------------------------------------------------------------------ provider names (tests/test_bench.py has the
# is_cpu_provider / is_cuda_device_provider table; here: the name ONNX Runtime is given, TensorRT, unknown names)
@pytest.mark.parametrize(
    "spelling, full",
    [
        ("cpu", CPU),
        ("CPU", CPU),
        ("CPUExecutionProvider", CPU),
        ("cpuexecutionprovider", CPU),
        ("cuda", CUDA),
        ("Cuda", CUDA),
        ("CUDAExecutionProvider", CUDA),
        ("tensorrt", TENSORRT),
        ("TensorRT", TENSORRT),
        ("TENSORRTEXECUTIONPROVIDER", TENSORRT),
        ("openvino", "OpenVINOExecutionProvider"),
        ("DNNL", "DnnlExecutionProvider"),
    ],
)
def test_every_spelling_becomes_onnx_runtimes_name(spelling, full):
    assert provider_name(spelling) == full
    assert is_tensorrt_provider(spelling) is (full == TENSORRT)


@pytest.mark.parametrize("unknown", ["ROCMExecutionProvider", "MyVendorExecutionProvider", "npu"])
def test_an_unknown_provider_is_passed_through_as_written(unknown):
    """ONNX Runtime says whether it has it; we neither rename nor take it for the CPU or a GPU."""
    assert provider_name(unknown) == unknown
    assert not is_cpu_provider(unknown) and not is_cuda_device_provider(unknown) and not is_tensorrt_provider(unknown)


def test_process_gpu_memory_sums_this_process_rows_of_nvidia_smi(tmp_path, monkeypatch):
    """One nvidia-smi query for bench and serve: a process on two GPUs holds both rows' memory; other
    processes' rows are not its own; no nvidia-smi (every CPU machine) is None, not an error."""
    import os

    from resnet_edge.core.machine import process_gpu_memory_mb

    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho '{os.getpid()}, 300'\necho '1, 999'\necho '{os.getpid()}, 20'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert process_gpu_memory_mb() == 320.0
    assert process_gpu_memory_mb(1) == 999.0 and process_gpu_memory_mb(2) is None
    fake.unlink()
    assert process_gpu_memory_mb() is None
