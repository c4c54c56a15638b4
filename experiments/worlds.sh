#!/usr/bin/env bash
# How much the tiny world's figures move across builds, as a stand-in for another machine (whose floats differ):
# other warm-up seeds, and the warm-up schedule moved by 10%. For each: the base models (experiments/base_models.py)
# and the quick start itself. Two at a time, one thread each.
#     bash experiments/worlds.sh OUT_DIR [CACHE_DIR]
set -u
R=${1:-runs/worlds}; C=${2:-$HOME/.cache/codistill_grpo}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p $R
{
  echo "seed1 --tiny_seed 1"
  echo "seed2 --tiny_seed 2"
  echo "schedule --tiny_warmup_small 440 --tiny_noisy_small 270 --tiny_warmup_large 450"
} | xargs -P 2 -L 1 sh -c 'name=$0; shift 0; python experiments/base_models.py --cache_dir '$C' "$@" --json '$R'/$name-base.json > /dev/null 2>&1 && python codistill_grpo.py --preset tiny --cache_dir '$C' "$@" --output_dir '$R'/$name > /dev/null 2>&1 || echo failed: $name'
