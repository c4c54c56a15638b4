#!/usr/bin/env bash
# Calibration of the tiny world's RL learning rates with GRPO alone, on a seed the comparison does not use (101).
# Two runs at a time, one thread each. Usage: bash experiments/calibrate.sh OUT_DIR [CACHE_DIR]
set -u
R=${1:-runs/calibrate}; C=${2:-$HOME/.cache/codistill_grpo}
T="python codistill_grpo.py --preset tiny --cache_dir $C --seed 101"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
{
  for lr in 1e-4 3e-4 1e-3; do
    echo "$T --algo grpo --num_samples 4 --group_size 4 --lr_small $lr --output_dir $R/grpo-small-lr$lr"
  done
  for lr in 3e-5 1e-4; do
    echo "$T --algo grpo --policy large --num_samples 4 --group_size 4 --lr_large $lr --output_dir $R/grpo-large-lr$lr"
  done
} | xargs -P 2 -I{} sh -c "{} > /dev/null 2>&1 || echo failed: {}"
