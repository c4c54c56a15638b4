#!/usr/bin/env bash
# How much the tiny world's figures move across builds, as a stand-in for another machine (whose floats differ):
# other warm-up seeds, and the warm-up schedule moved by 10%. For each: the base models (experiments/base_models.py)
# and the quick start itself. Two at a time, one thread each.
#     bash experiments/worlds.sh OUT_DIR [CACHE_DIR]
# The moved schedule broke the small base model; since then the build refuses such a world (README, "The same
# world on every machine"), so its line below now reports 'failed'. Its README row was measured at commit 3f0325c.
set -u
R=${1:-runs/worlds}; C=${2:-$HOME/.cache/codistill_grpo}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p $R
{
  echo "seed1 --tiny_seed 1"
  echo "seed2 --tiny_seed 2"
  echo "schedule --tiny_warmup_small 440 --tiny_noisy_small 270 --tiny_warmup_large 450"
} | xargs -P 2 -L 1 sh -c 'name=$0; shift 0; python experiments/base_models.py --cache_dir '$C' "$@" --json '$R'/$name-base.json > /dev/null 2>&1 && python codistill_grpo.py --preset tiny --cache_dir '$C' "$@" --output_dir '$R'/$name > /dev/null 2>&1 || echo failed: $name'
# More world seeds, the small base model only (200 prompts; --tiny_warmup_large 0 skips the large model's warm-up,
# whose figures these runs do not use)
for s in 3 4 5 6; do echo "seed$s-base-small --tiny_seed $s"; done |
  xargs -P 2 -L 1 sh -c 'name=$0; python experiments/base_models.py --cache_dir '$C' "$@" --tiny_warmup_large 0 --prompts 200 --json '$R'/$name.json > /dev/null 2>&1 || echo failed: $name'
# The noisy warm-up phase (README, second table of "The same world on every machine"): clean + noisy steps, variant
N="--tiny_warmup_large 0 --prompts 200"
{
  echo "lr1e-3_400_270 --tiny_warmup_small 400 --tiny_noisy_small 270"
  echo "lr1e-3_440_100 --tiny_warmup_small 440 --tiny_noisy_small 100"
  echo "lr1e-3_420_300 --tiny_warmup_small 420 --tiny_noisy_small 300"
  echo "lr1e-3_440_270 --tiny_warmup_small 440 --tiny_noisy_small 270"
  for c in 360 400; do echo "lr3e-4_${c}_300 --noisy_lr 3e-4 --tiny_warmup_small $c --tiny_noisy_small 300"; done
  for c in 400 420; do echo "soft_${c}_300 --soft --tiny_warmup_small $c --tiny_noisy_small 300"; done
  for c in 400 440; do echo "soft_decay_${c}_150 --soft --decay --tiny_warmup_small $c --tiny_noisy_small 150"; done
  echo "soft_decay_400_800 --soft --decay --tiny_warmup_small 400 --tiny_noisy_small 800"
  echo "soft_decay_440_770 --soft --decay --tiny_warmup_small 440 --tiny_noisy_small 770"
  for n in 900 1000; do echo "soft_decay_lr3e-3_scratch_$n --soft --decay --noisy_lr 3e-3 --tiny_warmup_small 0 --tiny_noisy_small $n"; done
} | xargs -P 2 -L 1 sh -c 'name=$0; python experiments/noisy_phase.py --cache_dir '$C' "$@" '"$N"' --json '$R'/$name.json > /dev/null 2>&1 || echo failed: $name'
