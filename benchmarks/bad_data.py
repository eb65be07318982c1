"""What a gzip bomb in --data-dir costs: time and memory to refuse it, against refusing a missing folder.

    python benchmarks/bad_data.py [--mb-per-member 1024 --members 10]

Builds a ~10 MB gzip file whose first member is a valid IDX image header promising 10 images
followed by 1 GiB of zeros, and nine more members of 1 GiB of zeros each (~10 GiB in all), then
measures, in fresh processes: load_dataset on it and on a missing folder (seconds, peak RSS), and the
CLI `resnet-edge train --data-dir` on both (which also pays for importing torch). Medians of --rounds.
Writes benchmarks/results/cpu/bad_data.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROBE = """
import resource, sys, time
from resnet_edge.core.mnist import DataError, load_dataset
t0 = time.perf_counter()
try:
    load_dataset(sys.argv[1])
except DataError as exc:
    message = str(exc)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, message, sep="\\t")
"""


def _member(prefix: bytes, mb: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(2**20)
    return z.compress(prefix) + b"".join(z.compress(zeros) for _ in range(mb)) + z.flush()


def main() -> None:
    from conftest import write_dataset

    from resnet_edge.core.machine import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb-per-member", type=int, default=1024)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu" / "bad_data.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bomb = write_dataset(Path(tmp) / "bomb", compress=True)
        header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28))
        rest = _member(b"", args.mb_per_member)
        data = _member(header, args.mb_per_member) + rest * (args.members - 1)
        (bomb / "train-images-idx3-ubyte.gz").write_bytes(data)
        missing = Path(tmp) / "missing"
        results: dict = {"bomb_file_mb": len(data) / 2**20,
                         "bomb_uncompressed_gib": args.mb_per_member * args.members / 1024}
        for label, folder in (("gzip bomb", bomb), ("missing folder", missing)):
            lib, cli = [], []
            for _ in range(args.rounds):
                out = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True,
                                     cwd=ROOT, check=True).stdout.strip().split("\t")
                lib.append({"seconds": float(out[0]), "peak_rss_mb": float(out[1]), "message": out[2]})
                t0 = time.perf_counter()
                proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "resnet_edge", "train",
                                       "--data-dir", str(folder), "--run", str(Path(tmp) / "run"), "--epochs", "1"],
                                      capture_output=True, text=True, cwd=ROOT)
                cli.append({"seconds": time.perf_counter() - t0, "exit_code": proc.returncode,
                            "peak_rss_mb": int(proc.stderr.strip().splitlines()[-1]) / 1024,
                            "stderr": proc.stderr.strip().splitlines()[0]})
            results[label] = {
                "load_dataset": {"seconds": statistics.median(r["seconds"] for r in lib),
                                 "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in lib), "message": lib[0]["message"]},
                "cli_train": {"seconds": statistics.median(r["seconds"] for r in cli),
                              "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in cli),
                              "exit_code": cli[0]["exit_code"], "stderr": cli[0]["stderr"]}}
    for label in ("gzip bomb", "missing folder"):
        r = results[label]
        print(f"{label:15s} load_dataset {r['load_dataset']['seconds']:.3f} s, peak RSS {r['load_dataset']['peak_rss_mb']:.0f} MB; "
              f"`train --data-dir` exit {r['cli_train']['exit_code']} in {r['cli_train']['seconds']:.2f} s, "
              f"peak RSS {r['cli_train']['peak_rss_mb']:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**results, "machine": machine(gpu=False)}, indent=2) + "\n")
    print(f"bomb: {results['bomb_file_mb']:.1f} MB file, {results['bomb_uncompressed_gib']:.0f} GiB uncompressed -> {args.out}")


if __name__ == "__main__":
    main()
