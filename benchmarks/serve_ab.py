"""A/B of two versions of `serve`'s code: this checkout (A) and another checkout of the repository (B, put
first on PYTHONPATH), both up at once and measured in alternating rounds (A then B, then B then A) with
serve_loadgen's closed-loop clients; prints each round's req/s and server CPU per request, and the median
of the per-round B / A ratios. For trying a change to the hot path before keeping it, on a machine whose
speed drifts: only ratios within a round are compared.

    git worktree add /tmp/variant HEAD    # then change /tmp/variant
    python benchmarks/serve_ab.py --b /tmp/variant --mode stream --rounds 8 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import ALL_MODES, free_port, launch, run_load, stop  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", type=Path, required=True, help="the other checkout (its resnet_edge/ is imported)")
    ap.add_argument("--model", type=Path, default=Path("exported/resnet8/model.int8.onnx"))
    ap.add_argument("--mode", choices=ALL_MODES, default="json")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    if not (args.b / "resnet_edge").is_dir():
        raise SystemExit(f"--b {args.b}: no resnet_edge/ there")
    servers, results = {}, {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, path in (("A", None), ("B", args.b.resolve())):
                http, grpc = free_port(), free_port()
                env = {**os.environ, **({"PYTHONPATH": str(path)} if path else {})}
                cmd = [sys.executable, "-m", "resnet_edge", "serve", "--model", str(args.model.resolve()),
                       "--model-name", "m", "--port", str(http), "--grpc-port", str(grpc)]
                servers[name] = (launch(cmd, Path(tmp) / f"{name}.log", http, env=env), http, grpc)
            for r in range(args.rounds):
                for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    proc, http, grpc = servers[name]
                    load = run_load([args.mode], args.clients, args.seconds, "m", http, grpc, server_pid=proc.pid)
                    results[name].append(asyncio.run(load)[args.mode])
                a, b = results["A"][-1], results["B"][-1]
                cpu = {k: 1e6 * x["server_cpu_s"] / max(1, x["requests"]) for k, x in (("A", a), ("B", b))}
                print(f"round {r + 1}: A {a['requests_per_second']:,.0f} req/s, B {b['requests_per_second']:,.0f} "
                      f"(B/A {b['requests_per_second'] / max(a['requests_per_second'], 1e-9):.3f}); server CPU "
                      f"us/request A {cpu['A']:.0f}, B {cpu['B']:.0f}", flush=True)
        finally:
            stop([proc for proc, _, _ in servers.values()])
    ratios = [b["requests_per_second"] / a["requests_per_second"]
              for a, b in zip(results["A"], results["B"], strict=True) if a["requests_per_second"]]
    print(f"B / A req/s: median {statistics.median(ratios):.3f} over {len(ratios)} rounds "
          f"({', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
