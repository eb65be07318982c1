"""Training images/s: our device-resident loop against a plain torchvision Dataset + DataLoader.

Same model, batch size, device, optimizer step and augmentation kind (random rotation/scale/shift);
only the data path differs:
  * ours:     the split as one uint8 tensor on the device, batches sliced and augmented there (data.py)
  * baseline: torchvision.datasets.MNIST (PIL image per sample) + transforms.RandomAffine + ToTensor,
              through torch.utils.data.DataLoader, for each num_workers asked (pin_memory on CUDA)
  * ceiling:  one batch already on the device, reused: the model step alone, the most any data path can give
Rounds alternate between the pipelines; the medians are reported and the ratio is ours / best baseline.

    python benchmarks/train_throughput.py --device cpu --arch resnet8 --steps 200 --rounds 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from resnet_edge.core.mnist import IDX_FILES, bundled_dir, load_dataset
from resnet_edge.training.batches import DeviceBatches
from resnet_edge.core.machine import cpu_info
from resnet_edge.training.models import create_model
from resnet_edge.training.session import TrainConfig, autocast_dtype, resolve_device, train_step


def torchvision_root(tmp: Path) -> Path:
    """The bundled files laid out the way torchvision.datasets.MNIST reads them (root/MNIST/raw/*)."""
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in IDX_FILES.values():
        with gzip.open(bundled_dir() / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return tmp


def measure(batches, model, optimizer, dtype, memory_format, device, steps: int, warmup: int = 5) -> float:
    it = iter(batches)
    for _ in range(warmup):
        x, y = next(it)
        train_step(model, optimizer, x.to(device, non_blocking=True), y.to(device, non_blocking=True), dtype, memory_format)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, images = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(it)
        train_step(model, optimizer, x.to(device, non_blocking=True), y.to(device, non_blocking=True), dtype, memory_format)
        images += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="resnet8")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="0,2", help="DataLoader num_workers values to try")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (both pipelines)")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args()

    import torchvision
    from torchvision import transforms

    device = resolve_device(args.device)
    config = TrainConfig(arch=args.arch, device=device.type, batch_size=args.batch_size)
    dtype = autocast_dtype(config, device)
    memory_format = torch.channels_last
    model = create_model(args.arch).to(device).to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    if args.compile:
        model = torch.compile(model)
    ds = load_dataset()
    gen = torch.Generator(device=device).manual_seed(0)
    ours = DeviceBatches(ds.train_images, ds.train_labels, args.batch_size, device, gen, augment=True)

    results: dict[str, list[float]] = {"ours": [], "ceiling": []}
    fixed = next(iter(ours))

    def same_batch():
        while True:
            yield fixed

    with tempfile.TemporaryDirectory() as tmp:
        tv = torchvision.datasets.MNIST(str(torchvision_root(Path(tmp))), train=True, download=False,
                                        transform=transforms.Compose([
                                            transforms.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                                            transforms.ToTensor()]))
        loaders = {}
        for w in (int(v) for v in args.workers.split(",")):
            loaders[f"DataLoader(num_workers={w})"] = torch.utils.data.DataLoader(
                tv, batch_size=args.batch_size, shuffle=True, num_workers=w, drop_last=True,
                pin_memory=device.type == "cuda", persistent_workers=w > 0)
            results[f"DataLoader(num_workers={w})"] = []
        for r in range(args.rounds):
            results["ours"].append(measure(ours, model, optimizer, dtype, memory_format, device, args.steps))
            results["ceiling"].append(measure(same_batch(), model, optimizer, dtype, memory_format, device, args.steps))
            for name, loader in loaders.items():
                results[name].append(measure(loader, model, optimizer, dtype, memory_format, device, args.steps))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} img/s" for k, v in results.items()), flush=True)

    medians = {k: statistics.median(v) for k, v in results.items()}
    best = max((k for k in medians if k not in ("ours", "ceiling")), key=medians.get)
    summary = {
        "arch": args.arch, "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info().model,
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
        "autocast": str(dtype), "compile": args.compile, "images_per_second": results, "median": medians,
        "best_baseline": best, "ratio_vs_best_baseline": medians["ours"] / medians[best],
        "ceiling_ratio": medians["ceiling"] / medians[best],
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    print(f"ours {medians['ours']:,.0f} img/s vs {best} {medians[best]:,.0f} img/s: "
          f"{summary['ratio_vs_best_baseline']:.2f}x ({args.arch}, batch {args.batch_size}, {device.type}"
          f"{', compiled' if args.compile else ''}); the model step alone: {medians['ceiling']:,.0f} img/s, "
          f"{medians['ceiling'] / medians[best]:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
