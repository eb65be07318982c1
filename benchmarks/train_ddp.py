"""Data-parallel training against one process: the same recipe and epochs, time and test accuracy.

Runs `resnet-edge train --nproc 1` and `--nproc N` (torchrun's launcher; gloo on the CPU, NCCL on
GPUs), each in its own process, and reads their train.json: training time (every epoch's steps and
test pass), process wall time (start-up, process group and launcher included), test accuracy. On the
CPU one process uses every core (PyTorch's threads); N processes get cores/N threads each, as torchrun
gives them, so both use the whole machine.

    python benchmarks/train_ddp.py --device cpu --nproc 2 -- --epochs 1             # this CPU
    python benchmarks/train_ddp.py --device cuda --nproc 8 -- --epochs 4 --sync-bn  # a node of 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, device: str, run_dir: Path, extra: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "resnet_edge", "train", "--device", device, "--nproc", str(nproc), "--run", str(run_dir),
           "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    row = {"nproc": nproc, "command": " ".join(cmd[1:]), "process_seconds": round(wall, 2), "ok": proc.returncode == 0,
           "load_average_after": os.getloadavg()}  # other work on the machine slows multi-threaded runs most
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip()[-2000:]
        return row
    r = json.loads((run_dir / "train.json").read_text())
    row.update({"world_size": r["world_size"], "train_seconds": r["seconds"], "test_accuracy": r["test_accuracy"],
                "images_per_second": [h["images_per_second"] for h in r["history"]], "epochs": r["epochs"],
                "distributed": r["distributed"], "lr_schedule": r["lr_schedule"], "device_name": r["device_name"],
                "threads_per_process": r["threads"], "versions": r["versions"]})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>/train_ddp-<arch>.json")
    ap.add_argument("extra", nargs="*", help="after --: more `resnet-edge train` options (the same for both runs)")
    args = ap.parse_args()
    arch = args.extra[args.extra.index("--arch") + 1] if "--arch" in args.extra else "resnet8"
    out = args.out or ROOT / "benchmarks" / "results" / args.device / f"train_ddp-{arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result = {"device": args.device, "arch": arch, "options": args.extra,
              "cpu_model": next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), None),
              "cores": os.cpu_count(), "load_average_before": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in dict.fromkeys((1, args.nproc)):
            result["runs"].append(run(nproc, args.device, Path(tmp) / f"n{nproc}", args.extra, args.timeout))
            tmp_out = out.with_name(f".{out.name}.tmp")
            tmp_out.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp_out, out)
            row = result["runs"][-1]
            print(f"{nproc} process(es): " + (f"{row['train_seconds']:.1f} s training, {row['process_seconds']:.1f} s "
                  f"process, test accuracy {100 * row['test_accuracy']:.2f} %" if row["ok"] else f"failed: {row['error'][-500:]}"),
                  flush=True)
    ok = [r for r in result["runs"] if r["ok"]]
    if len(ok) == 2:
        result["speedup_training"] = ok[0]["train_seconds"] / ok[1]["train_seconds"]
        result["speedup_process"] = ok[0]["process_seconds"] / ok[1]["process_seconds"]
        tmp_out = out.with_name(f".{out.name}.tmp")
        tmp_out.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp_out, out)
        print(f"{args.nproc} processes vs 1: {result['speedup_training']:.2f}x training time, "
              f"{result['speedup_process']:.2f}x process time")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
