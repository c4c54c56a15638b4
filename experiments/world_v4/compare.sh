#!/usr/bin/env bash
# The tiny comparison, once, on seeds 1-5 (the calibration used seed 101). Every run starts from the same base
# models (--tiny_seed 0); a seed fixes the data order and the sampling. Two runs at a time, one thread each; the
# CT runs start from CoDistill's checkpoints, so they go last.
#     bash experiments/compare.sh runs/cmp [CACHE_DIR]
# then: python experiments/paired.py runs/cmp  and  python eval.py --runs runs/cmp/*/* --plot_dir .
set -u
R=${1:-runs/cmp}; C=${2:-$HOME/.cache/codistill_grpo}
T="python codistill_grpo.py --preset tiny --cache_dir $C"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
run() { echo "$T --seed $1 ${@:3} --output_dir $R/$2/$1"; }
{
  for s in 1 2 3 4 5; do
    run $s codistill-a1                                               # CoDistill, alpha = 1, T = 0
    run $s grpo-small --algo grpo --num_samples 4 --group_size 4      # GRPO on the small model, G = 4 samples
    run $s grpo-small-ds --algo grpo                                  # GRPO, M = 8 downsampled to G = 4 by r
    run $s kdrl --algo kdrl                                           # KDRL: the same small step, large frozen
    run $s codistill-a2 --alpha 2
    run $s codistill-hints --hint_tokens 4                            # T = 4 hint tokens in the first epoch
    run $s ablation-a0 --alpha 0 --num_samples 4 --group_size 4       # App. C: no KD term, no downsampling
    run $s grpo-large --algo grpo --policy large --num_samples 4 --group_size 4
  done
} | xargs -P 2 -I{} sh -c "{} > /dev/null 2>&1 || echo failed: {}"
for s in 1 2 3 4 5; do  # CT (Sec. 4.2): 20 iterations of GRPO on the large model from CoDistill's checkpoint
  run $s ct --algo grpo --policy large --num_samples 4 --group_size 4 --max_steps 20 --eval_every 5 \
      --large_model $R/codistill-a1/$s/checkpoint-100/large
done | xargs -P 2 -I{} sh -c "{} > /dev/null 2>&1 || echo failed: {}"
