"""Size of the inference-only install: `pip install <this checkout>` (no extras) in a fresh venv.

    python benchmarks/runtime_install_size.py

Reports the venv's size on disk, whether torch is there, and the installed distributions, the largest
first. Writes benchmarks/results/cpu/runtime_install_size.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def main() -> None:
    from resnet_edge.core.machine import machine

    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        sizes = sorted(((p.name, _mb(p)) for p in site.iterdir() if p.is_dir() and not p.name.endswith("-info")),
                       key=lambda t: -t[1])
        result = {"venv_mb": round(_mb(venv), 1), "torch_installed": (site / "torch").exists(),
                  "largest_packages_mb": {n: round(m, 1) for n, m in sizes[:10]}, "machine": machine(gpu=False)}
    out = ROOT / "benchmarks" / "results" / "cpu" / "runtime_install_size.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"runtime-only venv: {result['venv_mb']:.0f} MB, torch installed: {result['torch_installed']}; largest: "
          + ", ".join(f"{n} {m:.0f} MB" for n, m in list(result["largest_packages_mb"].items())[:5]) + f" -> {out}")


if __name__ == "__main__":
    main()
