"""Time to accuracy of the training recipes, over several seeds: `resnet-edge train --recipe R --seed S`.

Each run is its own process (`python -m resnet_edge train ...`), so start-up is real; the figures come
from its train.json: training time from the first step to the final test pass (`seconds`: every
epoch's steps and test pass, checkpoints not included), the time at which the test accuracy first
reached the target (the `elapsed` of that epoch), start-up (data, model) and compilation (the warm-up
steps, timed apart), and the process's wall time. The result file is rewritten after every run, so a
run cut short keeps what finished.

    python benchmarks/train_recipes.py --recipes fast --seeds 0,1,2             # on the GPU
    python benchmarks/train_recipes.py --recipes default --seeds 0,1,2
    python benchmarks/train_recipes.py --device cpu --recipes fast --seeds 0 -- --epochs 2 --train-limit 2048  # rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(recipe: str, seed: int, device: str, run_dir: Path, extra: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "resnet_edge", "train", "--recipe", recipe, "--seed", str(seed), "--device", device,
           "--run", str(run_dir), "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"recipe": recipe, "seed": seed, "ok": False, "command": " ".join(cmd[1:]),
                "error": (proc.stderr or proc.stdout).strip()[-2000:], "process_seconds": round(wall, 2)}
    report = json.loads((run_dir / "train.json").read_text())
    return {"recipe": recipe, "seed": seed, "ok": True, "command": " ".join(cmd[1:]), "report": report,
            "process_seconds": round(wall, 2)}


def summarize_run(run: dict, target: float) -> dict:
    """The figures of one run: final accuracy, time to target, and the parts of its wall time."""
    if not run["ok"]:
        return {"seed": run["seed"], "ok": False, "error": run["error"].splitlines()[-1] if run["error"] else ""}
    r = run["report"]
    reached = next((h for h in r["history"] if h["test_accuracy"] >= target), None)
    return {
        "seed": run["seed"], "ok": True, "test_accuracy": r["test_accuracy"],
        "best_test_accuracy": max(h["test_accuracy"] for h in r["history"]),
        "train_seconds": r["seconds"], "seconds_to_target": reached["elapsed"] if reached else None,
        "epoch_reaching_target": reached["epoch"] if reached else None,
        "setup_seconds": r["this_process"]["setup_seconds"], "compile_seconds": r["this_process"]["compile_seconds"],
        "wall_seconds_first_step_to_end": r["this_process"]["wall_seconds"], "process_seconds": run["process_seconds"],
        "epochs": r["epochs"], "global_batch_size": r["distributed"]["global_batch_size"], "compiled": r["compiled"],
        "autocast": r["autocast"],
    }


def summarize(rows: list[dict], target: float, budget: float) -> dict:
    ok = [r for r in rows if r["ok"]]
    if not ok:
        return {"runs": len(rows), "ok": 0}
    acc = [r["test_accuracy"] for r in ok]
    times = [r["seconds_to_target"] for r in ok if r["seconds_to_target"] is not None]
    return {
        "runs": len(rows), "ok": len(ok),
        "test_accuracy_mean": statistics.mean(acc), "test_accuracy_min": min(acc), "test_accuracy_max": max(acc),
        "test_accuracy_stdev": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "train_seconds_mean": statistics.mean(r["train_seconds"] for r in ok),
        "reached_target": len(times), "seconds_to_target_max": max(times) if times else None,
        "final_at_target_within_budget": sum(r["test_accuracy"] >= target and r["train_seconds"] <= budget for r in ok),
        "compile_seconds_mean": statistics.mean(r["compile_seconds"] for r in ok),
    }


def environment(device: str) -> dict:
    import torch

    from resnet_edge.core.machine import cpu_info, versions

    env = {"cpu": cpu_info().model, "cores": os.cpu_count(), "versions": versions(include_torch=True),
           "cuda": torch.version.cuda}
    if device != "cpu" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--recipes", default="fast,default")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--target", type=float, default=0.995, help="test accuracy whose time is reported")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of training the target must be met in")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>/train_recipes-<recipes>.json")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders here (<recipe>-<seed>); default: deleted")
    ap.add_argument("extra", nargs="*", help="after --: more `resnet-edge train` options (rehearsals: --epochs 1 ...)")
    args = ap.parse_args()
    recipes, seeds = args.recipes.split(","), [int(s) for s in args.seeds.split(",")]
    out = args.out or ROOT / "benchmarks" / "results" / args.device / f"train_recipes-{'-'.join(recipes)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"target": args.target, "budget_seconds": args.budget, "extra_options": args.extra,
              "environment": environment(args.device), "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.keep or Path(tmp)
        for recipe in recipes:
            rows, runs = [], []
            for seed in seeds:
                run = run_once(recipe, seed, args.device, runs_dir / f"{recipe}-{seed}", args.extra, args.timeout)
                runs.append(run)
                rows.append(summarize_run(run, args.target))
                result["recipes"][recipe] = {"summary": summarize(rows, args.target, args.budget), "runs": rows,
                                             "train_json": [r.get("report") for r in runs]}
                _write(out, result)
                print(f"{recipe} seed {seed}: " + json.dumps(rows[-1]), flush=True)
            print(f"{recipe}: " + json.dumps(result["recipes"][recipe]["summary"]), flush=True)
    print(f"-> {out}")


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
