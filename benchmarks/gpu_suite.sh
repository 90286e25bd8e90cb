#!/usr/bin/env bash
# The GPU half of the speed goals in one command (BUILD.md "NVIDIA GPU"): the DANN step table
# and whole default runs in fp32 and bf16 compute against PyTorch on CUDA (accuracy parity),
# and ResNet-50 fine-tuning throughput with its MFU.
#
# For a GPU image with JAX and PyTorch but no TensorFlow, tfds, clu or network. Prepare on a
# machine where tfds works, in the repository root, and carry both paths over:
#   python -m tljax.data.export --config=configs/dann.py --out=runs/arrays/dann
#   pip download ml_collections --no-deps -d .whl
#
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]   (markdown tables and logs; default runs/gpu)
# SPEED_DANN_FLAGS and RESNET_FLAGS append flags (a CPU smoke run: --run_steps=100 --seeds=0).
set -euo pipefail
out="${1:-runs/gpu}"
mkdir -p "$out"
python -c "import ml_collections" 2>/dev/null || pip install --no-index --no-deps .whl/*.whl
# PyTorch shares the GPU with JAX in the step table.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/device.csv" || true
python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', \
torch.__version__, torch.cuda.is_available())" | tee "$out/versions.txt"
python benchmarks/speed_dann.py --data_dir=runs/arrays/dann --impls=xla \
  --dtypes=float32,bfloat16 --rounds=3 --full_run --seeds=0,1,2 ${SPEED_DANN_FLAGS:-} \
  2>"$out/speed_dann.log" | tee "$out/speed_dann.md"
python benchmarks/resnet_throughput.py --dtypes=float32,bfloat16 ${RESNET_FLAGS:-} \
  2>"$out/resnet_throughput.log" | tee "$out/resnet_throughput.md"
