"""Which CPU settings train fastest: fp32 or bf16 autocast, channels_last or not (our loop, resnet8).

    python benchmarks/cpu_train_settings.py --steps 100 --rounds 3

Each setting runs the same training step on device-resident, augmented batches; rounds alternate
between settings and the medians are reported with the CPU's bf16/AMX flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from resnet_edge.core.machine import machine
from resnet_edge.core.config import TrainConfig
from resnet_edge.core.mnist import load_dataset
from resnet_edge.training.batches import DeviceBatches
from resnet_edge.training.models import create_model
from resnet_edge.training.session import train_step

SETTINGS = {
    "fp32, channels_last": (None, torch.channels_last),
    "fp32, contiguous": (None, torch.contiguous_format),
    "bf16 autocast, channels_last": (torch.bfloat16, torch.channels_last),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet8")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ds = load_dataset()
    device = torch.device("cpu")
    batches = DeviceBatches(ds.train_images, ds.train_labels, args.batch_size, device, torch.Generator().manual_seed(0))
    runs: dict[str, list[float]] = {k: [] for k in SETTINGS}
    models = {}
    for name, (_, fmt) in SETTINGS.items():
        model = create_model(args.arch).to(memory_format=fmt)
        models[name] = (model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True))
    for r in range(args.rounds):
        for name, (dtype, fmt) in SETTINGS.items():
            model, opt = models[name]
            it = iter(batches)
            for _ in range(5):
                train_step(model, opt, *next(it), dtype, fmt)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, opt, *next(it), dtype, fmt)
            runs[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} img/s" for k, v in runs.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    machine_info = machine(torch.get_num_threads(), include_torch=True)
    for k, v in medians.items():
        print(f"{k:30s} {v:8,.0f} images/s")
    print("CPU:", machine_info["cpu"], {f: on for f, on in machine_info["isa"].items() if "bf16" in f or "amx" in f})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"arch": args.arch, "batch_size": args.batch_size, "steps": args.steps,
                                        "images_per_second": runs, "median": medians, "machine": machine_info}, indent=2) + "\n")


if __name__ == "__main__":
    main()
