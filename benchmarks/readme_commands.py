"""Time the README's two commands as a newcomer runs them: a fresh clone, a fresh virtualenv each.

    python benchmarks/readme_commands.py            # both commands
    python benchmarks/readme_commands.py --only main

The commands are read from the README itself (its first two ```bash blocks), run with bash in a
clean clone of HEAD in a temporary folder, and timed from start to exit; pip's cache is whatever this
machine has (say so when you quote a time). Writes benchmarks/results/cpu/readme_commands.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from resnet_edge.core.machine import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("main", "tests"), default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu" / "readme_commands.json")
    args = ap.parse_args()
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)[:2]
    results = {}
    for name, command in zip(("main", "tests"), blocks):
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            clone = Path(tmp) / "resnet-edge"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            t0 = time.perf_counter()
            proc = subprocess.run(["bash", "-c", command], cwd=clone, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
        tail = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("WARNING: Location")][-3:]
        results[name] = {"command": command, "exit_code": proc.returncode, "seconds": round(seconds, 1), "tail": tail}
        print(f"{name}: exit {proc.returncode} in {int(seconds // 60)} min {seconds % 60:.0f} s; " + " | ".join(tail), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "machine": machine(gpu=False)}, indent=2) + "\n")
    if any(r["exit_code"] for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
