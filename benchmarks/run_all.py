"""Reproduce the README's results: train the README's models, export them, benchmark them.

    python benchmarks/run_all.py                      # CPU: resnet8 (2 epochs) and resnet18 (1 epoch)
    python benchmarks/run_all.py --provider cuda      # on a GPU machine with onnxruntime-gpu

Each model goes through the CLI exactly as a user runs it (train, export --quantize, bench) in
benchmarks/results/<tag>/<arch>/; the bench is run --repeats times and every ratio's spread is
reported. A summary (summary.json, summary.md) with the machine goes beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = {"resnet8": ["--epochs", "2"], "resnet18": ["--epochs", "1"]}


def cli(*args: str) -> float:
    t0 = time.perf_counter()
    print("$ resnet-edge " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "resnet_edge", *args], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--archs", default="resnet8,resnet18")
    ap.add_argument("--device", default="auto", help="training device")
    ap.add_argument("--repeats", type=int, default=2, help="bench runs per model (ratios must agree)")
    ap.add_argument("--duration", default="2")
    ap.add_argument("--batch-sizes", default="1,8,64,256")
    ap.add_argument("--tag", default=None, help="results folder name (default: the provider)")
    ap.add_argument("--skip-train", action="store_true", help="reuse the runs already in the results folder")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    out = HERE / "results" / (args.tag or args.provider)
    summary: dict = {"provider": args.provider, "models": {}}
    for arch in args.archs.split(","):
        run = out / arch
        timings = {}
        if not args.skip_train:
            timings["train_s"] = cli("train", "--arch", arch, *RECIPES.get(arch, []), "--device", args.device,
                                     "--run", str(run), "--quiet")
            timings["export_s"] = cli("export", "--run", str(run), "--quantize", "--quiet")
        benches = []
        for i in range(args.repeats):
            bench_dir = run / f"bench-{i + 1}"
            cli("bench", "--run", str(run), "--provider", args.provider, "--duration", args.duration,
                "--batch-sizes", args.batch_sizes, "--out", str(bench_dir), "--quiet",
                *(["--no-torch"] if args.no_torch else []))
            benches.append(json.loads((bench_dir / "bench.json").read_text()))
        train = json.loads((run / "train.json").read_text())
        export = json.loads((run / "export.json").read_text())
        ratios = {}
        for r in benches[0]["ratios"]:
            key = f"{r['variant']} vs {r['baseline']} @ batch {r['batch_size']}"
            values = [next(x["speedup_p50"] for x in b["ratios"] if (x["variant"], x["baseline"], x["batch_size"]) ==
                           (r["variant"], r["baseline"], r["batch_size"])) for b in benches]
            ratios[key] = {"runs": values, "median": statistics.median(values),
                           "spread": (max(values) - min(values)) / statistics.median(values)}
        throughput = {}
        for row in benches[0]["rows"]:
            key = f"{row['variant']} @ batch {row['batch_size']}"
            values = [next(x for x in b["rows"] if (x["variant"], x["batch_size"]) == (row["variant"], row["batch_size"]))
                      for b in benches]
            throughput[key] = {"p50_ms": statistics.median(v["p50_ms"] for v in values),
                               "p99_ms": statistics.median(v["p99_ms"] for v in values),
                               "throughput": statistics.median(v["throughput"] for v in values)}
        summary["models"][arch] = {
            "train": {k: train[k] for k in ("arch", "params", "device", "device_name", "epochs", "seconds", "test_accuracy")},
            "export": {"fp32_accuracy": export["fp32"]["test_accuracy"], "int8_accuracy": export["int8"]["test_accuracy"],
                       "top1_agreement": export["int8"]["top1_agreement"], "fp32_bytes": export["fp32"]["bytes"],
                       "int8_bytes": export["int8"]["bytes"], "max_parity_diff": max(p["max_abs_diff"] for p in export["parity"]),
                       "seconds": export["seconds"], "scheme": export["int8"]["scheme"]["name"],
                       "max_abs_weight": export["int8"]["max_abs_weight"],
                       "saturation_free": export["int8"]["saturation_free"],
                       "float_nodes": len(export["int8"]["float_nodes"]),
                       "accuracy_drop_points": export["int8"]["accuracy_drop_points"]},
            "timings": timings, "cells": throughput, "ratios": ratios,
            "variants": benches[0]["variants"], "diagnoses": benches[0]["diagnoses"],
            "recommendations": [b.get("recommendation") for b in benches],
        }
        summary["machine"] = benches[0]["machine"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render(summary))
    print(render(summary))


def render(summary: dict) -> str:
    m = summary["machine"]
    isa = ", ".join(k for k, v in m["isa"].items() if v)
    lines = [f"Machine: {m['cpu']}, {m['logical_cores']} logical cores; ISA: {isa}; GPU: {m['gpu'] or 'none'}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v), ""]
    lines += ["| model | train | FP32 acc | INT8 acc | agreement | FP32 size | INT8 size | INT8 scheme | nodes kept float | parity max diff |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for arch, s in summary["models"].items():
        t, e = s["train"], s["export"]
        lines.append(f"| {arch} | {t['epochs']} ep, {t['device']}, {t['seconds']:.0f} s | {100 * e['fp32_accuracy']:.2f} % | "
                     f"{100 * e['int8_accuracy']:.2f} % | {100 * e['top1_agreement']:.2f} % | {e['fp32_bytes'] / 1e6:.2f} MB | "
                     f"{e['int8_bytes'] / 1e6:.2f} MB ({100 * e['int8_bytes'] / e['fp32_bytes']:.0f} %) | "
                     f"{e.get('scheme', '?')} (max |w| {e.get('max_abs_weight')}) | {e.get('float_nodes', '?')} | {e['max_parity_diff']:.1e} |")
    lines += ["", f"Latency and throughput on `{summary['provider']}` (medians of the bench runs):", "",
              "| model | variant | batch | p50 ms | p99 ms | images/s |", "|---|---|---:|---:|---:|---:|"]
    for arch, s in summary["models"].items():
        for key, c in s["cells"].items():
            variant, bs = key.split(" @ batch ")
            lines.append(f"| {arch} | {variant} | {bs} | {c['p50_ms']:.3f} | {c['p99_ms']:.3f} | {c['throughput']:,.0f} |")
    lines += ["", "| model | ratio (p50 speed-up) | median | runs | spread |", "|---|---|---:|---|---:|"]
    for arch, s in summary["models"].items():
        for key, r in s["ratios"].items():
            lines.append(f"| {arch} | {key} | {r['median']:.2f}x | {', '.join(f'{v:.2f}' for v in r['runs'])} | {100 * r['spread']:.0f} % |")
    lines += ["", "Recommendation of each bench run (fastest variant within the accuracy guard):", ""]
    for arch, s in summary["models"].items():
        for i, rec in enumerate(s.get("recommendations") or []):
            lines.append(f"- {arch} run {i + 1}: " + "; ".join(f"{w} (batch {r['batch_size']}): {r['variant']} ({r['why']})"
                                                            for w, r in (rec or {}).items()))
    for arch, s in summary["models"].items():
        for d in s["diagnoses"]:
            lines.append(f"\n- {arch}: {d}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
