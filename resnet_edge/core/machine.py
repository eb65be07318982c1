"""What this machine is: CPU model, the ISA flags that decide INT8 accuracy and speed, GPU, versions.

One probe for every report (export.json, bench.json, the variant choice of serve/predict/eval), so
they describe a machine the same way and can be compared. No torch import.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

# x86 flags (as /proc/cpuinfo names them) that decide how ONNX Runtime runs int8 and bf16 kernels.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
# int8 dot-product instructions: with them ONNX Runtime multiplies uint8 x int8 into 32-bit sums directly;
# without them (AVX2, AVX-512 without VNNI) it uses VPMADDUBSW, whose 16-bit pair sums saturate.
X86_INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")


def _is_arm(arch: str) -> bool:
    return arch.lower() in ("aarch64", "arm64") or arch.lower().startswith("arm")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str  # platform.machine(): x86_64, aarch64, arm64, ...
    isa: dict[str, bool] = field(default_factory=dict)  # ISA_FLAGS on x86; {"asimddp": ...} on ARM

    @property
    def int8_dot_product(self) -> bool:
        """True when the CPU multiplies int8 into 32-bit sums without a saturating 16-bit step."""
        if self.is_arm:
            return bool(self.isa.get("asimddp", self.arch == "arm64"))  # Apple Silicon has dotprod
        return any(self.isa.get(f) for f in X86_INT8_DOT)

    @property
    def u8s8_saturates(self) -> bool:
        """True on x86 CPUs without VNNI/AMX: ONNX Runtime's uint8 x int8 kernels there add product pairs
        in saturating int16 (VPMADDUBSW). ARM kernels widen or use dot products: no saturation."""
        return not self.is_arm and not self.int8_dot_product

    @property
    def is_arm(self) -> bool:
        return _is_arm(self.arch)

    @property
    def isa_summary(self) -> str:
        on = [f for f, v in self.isa.items() if v]
        if on:
            return ", ".join(on)
        return "none of " + ", ".join(self.isa) if self.isa else "ISA flags unknown"

    def same_as(self, other: dict[str, Any] | None) -> bool:
        """Whether a machine description written earlier (``machine()`` output) is this CPU."""
        return other is not None and other.get("cpu") == self.model and other.get("isa") == self.isa

    def describe(self) -> str:
        dot = "int8 dot product" if self.int8_dot_product else "no int8 dot-product instructions"
        return f"{self.model} ({self.arch}; {self.isa_summary}; {dot})"


def cpu_info(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    arch = platform.machine()
    model, flags = "", set[str]()
    try:
        for line in cpuinfo_path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or arch
    if _is_arm(arch):
        isa = {"asimddp": "asimddp" in flags} if flags else {}
    else:
        isa = {f: f in flags for f in ISA_FLAGS}
    return CpuInfo(model, arch, isa)


def package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def process_gpu_memory_mb(pid: int | None = None, timeout: float = 10) -> float | None:
    """GPU memory a process holds on every GPU together (CUDA context included), as nvidia-smi reports it:
    the same measure for PyTorch and ONNX Runtime; None when nvidia-smi cannot say. ``pid``: this process."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
        ).stdout
        used = [
            float(mem)
            for owner, _, mem in (line.partition(",") for line in out.splitlines())
            if owner.strip() == str(pid or os.getpid())
        ]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return sum(used) if used else None


def versions(include_torch: bool = False) -> dict[str, str | None]:
    """Versions of what produced or ran a model; torch is looked up, never imported."""
    names = ["onnxruntime", "onnx", "numpy"] + (["torch", "torchvision"] if include_torch else [])
    out = {n: package_version(n) for n in names}
    out["python"] = platform.python_version()
    from resnet_edge import __version__

    return {"resnet_edge": __version__, **out}


def machine(threads: int | None = None, include_torch: bool = False, gpu: bool = True) -> dict[str, Any]:
    """The machine description written into export.json and bench.json."""
    cpu = cpu_info()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:
        physical = None
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception:
        providers = []
    return {
        "cpu": cpu.model,
        "arch": cpu.arch,
        "isa": cpu.isa,
        "int8_dot_product": cpu.int8_dot_product,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "threads": threads,
        "gpu": gpu_name() if gpu else None,
        "platform": platform.platform(),
        "onnxruntime_providers": providers,
        "versions": versions(include_torch),
    }
