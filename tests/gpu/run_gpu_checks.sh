#!/usr/bin/env bash
# The GPU checks of the model and training issues, as one prepared script (never run by CI).
# Usage on a CUDA machine, from the repo root after `pip install -e ".[dev]"`:  bash tests/gpu/run_gpu_checks.sh [OUT_DIR]
# Prints and saves: the inference latency table of the default model (ViT-B/16 x 2 cameras + 12x768 transformer) vs
# context length in fp32 and bf16 (with the prompt and reset costs), the policy server's latency, and the training throughput of the default recipe with and without --dataset-cfg.gpu-preprocess, and the
# compressed-frame loader with nvJPEG decoding (--dataset-cfg.gpu-decode), and the icl suite's gpu preset (8 minutes of training).
set -euo pipefail
out=${1:-${OUT:-gpu_results}}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python - <<'PY' | tee "$out/cuda_pytest.txt"
import subprocess, sys
sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_models_policy.py", "tests/test_dataset.py",
                          "tests/test_compress.py", "-k", "cuda or cache"]))
PY
icrt_bench_inference --config default --device cuda --contexts 50 300 600 1000 2000 --json "$out/inference.json" | tee "$out/inference.txt"
# bf16 autocast, a two-demonstration prompt of 150 steps (600 tokens) and its reset; target >= 30 control steps/s with vision
icrt_bench_inference --config default --device cuda --precision bf16 --contexts 600 1000 --no-uncached --prompt 2 150 \
    --json "$out/inference_bf16.json" | tee "$out/inference_bf16.txt"
# the same step compiled (torch.compile of the fixed-shape step; reduce-overhead asks for CUDA graphs)
icrt_bench_inference --config default --device cuda --precision bf16 --compile reduce-overhead --contexts 600 1000 --no-uncached \
    --prompt 0 0 --json "$out/inference_bf16_compiled.json" | tee "$out/inference_bf16_compiled.txt"
# the policy server over loopback on the GPU: 1 and 8 concurrent sessions (tiny model; pass a run folder for a real one)
icrt_bench_serve --device cuda --clients 1 8 --steps 200 --json "$out/serve.json" | tee "$out/serve.txt"
# the default model served (ViT-B/16 x 2 cameras + 12x768 transformer, random weights): 8 sessions' steps run as one batched
# model call (icrt_serve batches concurrent control steps); compare steps/s of 8 clients with 1 (unmeasured so far)
icrt_bench_serve --config default --device cuda --clients 1 8 --steps 100 --json "$out/serve_default.json" | tee "$out/serve_default.txt"
icrt_bench_train --config default --steps 200 --num-workers 8 --json "$out/train.json" | tee "$out/train.txt"
# raw vs JPEG frames: bytes per sample, PSNR, warm/cold samples/s per worker, and nvJPEG decode of gpu_decode batches
icrt_bench_loader --compression "$out/compression" --no-metaworld --samples 16 | tee "$out/compression.txt"
# the in-context suite (issue #25): the gpu preset, at most 8 minutes of training, then its closed-loop evaluation (unseen
# goals, far-goal and other-verb controls, k-shot curve); Meta-World renders on the CPU (OSMesa). Unmeasured so far.
MUJOCO_GL=osmesa icrt_bench_metaworld --suite icl --preset gpu --minutes 8 --device cuda --out "$out/icl_gpu" | tail -30 | tee "$out/icl_gpu.txt"
