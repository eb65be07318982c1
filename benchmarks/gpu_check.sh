#!/usr/bin/env bash
# The GPU paths (shared/docs/GPU.md), as one script for a machine with an NVIDIA GPU:
#   1. `resnet-edge train` on CUDA with the default recipe (wall time, accuracy, images/s)
#   2. `resnet-edge export --quantize`, then `bench --provider cuda` and `--provider cpu` on the same machine
#   3. training-loop throughput against a torchvision DataLoader on the GPU
# Results (reports only, no weights) go to benchmarks/results/cuda/.
# Needs onnxruntime-gpu in place of onnxruntime for the CUDA provider; without it step 2's CUDA bench
# fails with a clear error and the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results/cuda
mkdir -p "$R"
run() { echo "+ $*"; "$@"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', 'onnxruntime', o.__version__, o.get_available_providers())"
} 2>&1 | tee "$R/environment.txt"
ARCH=${ARCH:-resnet8}
/usr/bin/time -v python3 -m resnet_edge train --device cuda --run "$R/$ARCH" 2>&1 | tee "$R/train.log" | grep -vE '^\s' | tail -40
run python3 -m resnet_edge export --run "$R/$ARCH" --quantize --quiet 2>&1 | tee "$R/export.log"
run python3 -m resnet_edge bench --run "$R/$ARCH" --provider cuda --duration ${DURATION:-2} --out "$R/$ARCH/bench-cuda" --quiet 2>&1 | tee "$R/bench-cuda.log"
run python3 -m resnet_edge bench --run "$R/$ARCH" --provider cpu --duration ${DURATION:-2} --out "$R/$ARCH/bench-cpu" --quiet 2>&1 | tee "$R/bench-cpu.log"
run python3 benchmarks/train_throughput.py --device cuda --arch "$ARCH" --steps 200 --rounds 3 --workers 0,4 --out "$R/train_throughput-$ARCH.json" 2>&1 | tee "$R/train_throughput.log"
