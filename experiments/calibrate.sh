#!/usr/bin/env bash
# Calibration of the tiny world's RL learning rates and budget with GRPO alone, on a seed the comparison does not use
# (101): GRPO (G samples) on the small model and on the large model at three rates each, 200 iterations, held-out
# accuracy every 25, every checkpoint kept (the chosen GRPO-large run is KDRL's teacher: experiments/teacher.py).
# Two runs at a time, one thread each.
#     bash experiments/calibrate.sh OUT_DIR [CACHE_DIR]
set -u
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then sed -n '2,/^set -u/p' "$0" | grep '^#' | cut -c3-; exit 0; fi
R=${1:-runs/calibrate}; C=${2:-$HOME/.cache/codistill_grpo}
T="python codistill_grpo.py --preset tiny --cache_dir $C --seed 101 --algo grpo --max_steps 200 --keep_checkpoints 0"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
{
  for lr in 1e-4 3e-4 1e-3; do echo "$T --lr_small $lr --output_dir $R/grpo-small-lr$lr"; done
  for lr in 3e-5 1e-4 3e-4; do echo "$T --policy large --lr_large $lr --output_dir $R/grpo-large-lr$lr"; done
} | xargs -P 2 -I{} sh -c "{} > /dev/null 2>&1 || echo failed: {}"
