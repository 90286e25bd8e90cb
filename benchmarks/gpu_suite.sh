#!/usr/bin/env bash
# The GPU half of the speed goals in one command (BUILD.md "NVIDIA GPU"): the DANN step table
# and whole default runs in fp32 and bf16 compute against PyTorch on CUDA (accuracy parity),
# and the ResNet-50 and ViT-B/16 fine-tuning steps (224x224): images/s and MFU, fp32 and bf16.
#
# For a GPU image with JAX and PyTorch but no TensorFlow, tfds, clu or network. Prepare on a
# machine where tfds works, in the repository root, and carry both paths over:
#   python -m tljax.data.export --config=configs/dann.py --out=runs/arrays/dann
#   pip download ml_collections --no-deps -d .whl
#
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]   (markdown tables and logs; default runs/gpu)
# SPEED_DANN_FLAGS and THROUGHPUT_FLAGS append flags; a CPU smoke run of the commands:
#   SPEED_DANN_FLAGS="--steps=2 --batches=8 --rounds=1 --run_steps=20 --seeds=0 --page=" \
#   THROUGHPUT_FLAGS="--image_size=32 --batch=2 --steps=1 --warmup=1 --page=" \
#   bash benchmarks/gpu_suite.sh runs/gpu_smoke     # ~1 min on 2 cores
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
python benchmarks/finetune_throughput.py --models=resnet50,vit_b16 --dtypes=float32,bfloat16 \
  ${THROUGHPUT_FLAGS:-} 2>"$out/finetune_throughput.log" | tee "$out/finetune_throughput.md"
