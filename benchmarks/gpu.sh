#!/usr/bin/env bash
# Time to a trained adapter at ImageNet size on one GPU: offline, one command, sized for under 8 minutes.
#
#   bash benchmarks/gpu.sh                                            # on a machine with a CUDA GPU
#   bash benchmarks/gpu.sh --device cpu --tiny --classes 4 --output_dir /tmp/gpu-smoke  # tiny, any CPU
#
# 16 shots x 1000 classes of generated 500x375 JPEGs (16,000 files), 10 augmented views each, a
# random-weight ViT-B/16 CLIP in bf16 (speed does not depend on the weights). Ours: feature extraction
# from a cold cache (DataLoader workers decode, the GPU makes the views and runs the backbone, batch 256)
# plus 200 epochs of the paper's recipe on the cached features (batch 32). The floor: one bare bf16
# forward pass of the vision tower over pre-made tensors, same images x views, same batch. Prints the
# wall times, ours / floor and the GPU's utilisation during extraction and training (sampled through
# NVML or nvidia-smi), plus the input-pipeline section, and writes benchmarks/results/speed_cuda.{json,md}.
# Arguments given here go to benchmarks/speed.py after these ones, so they win.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing to download: the model and the images are generated
exec python benchmarks/speed.py --device cuda --arch vit-b-16 --sections adapter,pipeline --dtype bfloat16 \
  --classes 1000 --shots 16 --views 10 --epochs 200 --image_size 500x375 \
  --batch_size 32 --extraction_batch_size 256 --reference_steps 3 "$@"
