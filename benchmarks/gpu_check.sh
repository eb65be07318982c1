#!/usr/bin/env bash
# The GPU paths (shared/docs/GPU.md), as one script for a machine with an NVIDIA GPU:
#   1. `resnet-edge train` on CUDA with the default recipe (wall time, accuracy, images/s)
#   2. `resnet-edge export --quantize`, then `bench --provider cuda` and `--provider cpu` on the same machine
#   3. training-loop throughput against a torchvision DataLoader on the GPU (eager, then both with torch.compile)
# Results (reports only, no weights) go to benchmarks/results/cuda/. The CUDA bench needs
# onnxruntime-gpu in place of onnxruntime; without it that step fails with a clear error and the
# rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
R=${RESULTS:-benchmarks/results/cuda}
ARCH=${ARCH:-resnet8}
DEVICE=${DEVICE:-cuda}      # DEVICE=cpu PROVIDER=cpu TRAIN_ARGS="--epochs 1" rehearses the script without a GPU
PROVIDER=${PROVIDER:-cuda}
TRAIN_ARGS=${TRAIN_ARGS:-}
mkdir -p "$R"
# CUDA libraries from the nvidia-* wheels that PyTorch uses, for ONNX Runtime's CUDA provider too.
NV=$(python3 -c "import nvidia, os; print(':'.join(sorted({os.path.dirname(os.path.join(r, f)) for p in nvidia.__path__ for r, _, fs in os.walk(p) for f in fs if '.so' in f})))" 2>/dev/null)
export LD_LIBRARY_PATH="${NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  lscpu | grep -E 'Model name|^CPU\(s\)'
  python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnxruntime', o.__version__, o.get_available_providers())"
} 2>&1 | tee "$R/environment.txt"
step() { echo "+ $*"; local t0=$SECONDS; "$@"; echo "  ($((SECONDS - t0)) s, exit $?)"; }
step python3 -m resnet_edge train --device "$DEVICE" --run "$R/$ARCH" $TRAIN_ARGS 2>&1 | tee "$R/train.log"
step python3 -m resnet_edge export --run "$R/$ARCH" --quantize --quiet 2>&1 | tee "$R/export.log"
step python3 -m resnet_edge bench --run "$R/$ARCH" --provider "$PROVIDER" --duration "${DURATION:-2}" --out "$R/$ARCH/bench-$PROVIDER" --quiet 2>&1 | tee "$R/bench-cuda.log"
step python3 -m resnet_edge bench --run "$R/$ARCH" --provider cpu --duration "${DURATION:-2}" --out "$R/$ARCH/bench-cpu" --quiet 2>&1 | tee "$R/bench-cpu.log"
step python3 benchmarks/train_throughput.py --device "$DEVICE" --arch "$ARCH" --steps 200 --rounds 3 --workers 0,4 --out "$R/train_throughput-$ARCH.json" 2>&1 | tee "$R/train_throughput.log"
# The same with torch.compile, for the README's compiled figures.
step python3 -m resnet_edge train --device "$DEVICE" --compile --run "$R/$ARCH-compiled" $TRAIN_ARGS 2>&1 | tee "$R/train-compiled.log"
step python3 benchmarks/train_throughput.py --device "$DEVICE" --compile --arch "$ARCH" --steps 300 --rounds 3 --workers 4,8 --out "$R/train_throughput-$ARCH-compiled.json" 2>&1 | tee "$R/train_throughput-compiled.log"
