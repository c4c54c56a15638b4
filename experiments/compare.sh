#!/usr/bin/env bash
# The tiny comparison (README, "The paper's claims on a laptop"; protocol in experiments/README.md, section 3), once,
# on seeds 1-5. Every run starts from the same base models (the preset's world, --tiny_seed 0); a seed fixes the data
# order and the sampling; every checkpoint is kept (experiments/measure.py reads them). Two runs at a time, one
# thread each. KDRL's teacher is GRPO on the large model (calibration seed 101, its best checkpoint on a validation
# split of the training problems: experiments/teacher.py), so it runs after the calibration; the CT runs start from
# CoDistill's checkpoints, so they go last.
#     bash experiments/compare.sh runs/cmp TEACHER [CACHE_DIR] [SEEDS]
# Run it again after a stop: it goes on where each run was.
# then: python experiments/paired.py runs/cmp --json experiments/results/comparison.json, and the plots:
#       python eval.py --runs $(ls -d runs/cmp/*/* | grep -v "/ct/") --plot_dir experiments/results
set -u
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then sed -n '2,/^set -u/p' "$0" | grep '^#' | cut -c3-; exit 0; fi
R=${1:-runs/cmp}; TEACHER=$2; C=${3:-$HOME/.cache/codistill_grpo}; SEEDS=${4:-"1 2 3 4 5"}
T="python codistill_grpo.py --preset tiny --cache_dir $C --keep_checkpoints 0"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
run() {  # a run that was stopped continues from its newest checkpoint (a finished one then does nothing); one
         # stopped before its first checkpoint starts afresh
  d=$R/$2/$1; again=""
  if [ -f $d/latest ]; then again=--resume; elif [ -d $d ]; then again=--overwrite; fi
  echo "$T --seed $1 ${@:3} --output_dir $d $again"
}
{
  for s in $SEEDS; do
    run $s codistill-a1                                     # CoDistill, alpha = 1, T = 0 (Table 1's main row)
    run $s grpo-g --algo grpo                               # GRPO on the small model, G samples (Sec. 4)
    run $s grpo-ds --algo grpo --num_samples 8              # GRPO, M = 8 downsampled to G = 4 by r (a control)
    run $s kdrl --algo kdrl --large_model $TEACHER          # KDRL: the small step against a frozen GRPO-trained teacher
    run $s codistill-a2 --alpha 2
    run $s codistill-hints --hint_tokens 4                  # T = 4 hint tokens in the first 1/8 of the run
    run $s ablation-a0 --alpha 0 --num_samples 4            # App. C, Fig. 7: no KD term, no downsampling
    run $s kd-eq4 --kd_form reward_eq4                      # App. C, Fig. 9: Eq. (4)'s estimator in the reward
    run $s kd-loss --kd_form loss                           # Sec. 3.1, Discussion: the KD term in the loss
    run $s kd-token --kd_form token                         # beyond the paper: token-level on-policy distillation
    run $s kd-rank-only --kd_form rank_only                 # Eq. (6) ranks the M, A~ from r (one use of two)
    run $s kd-advantage-only --kd_form advantage_only       # Eq. (6) in A~, the M ranked by r (the other use)
    run $s grpo-large --algo grpo --policy large            # GRPO on the large model, G samples (Table 2)
  done
} | xargs -P 2 -I{} sh -c "{} > /dev/null 2>&1 || echo failed: {}"
for s in $SEEDS; do  # CT (Sec. 4.2): GRPO on the large model from CoDistill's large checkpoint, a fifth of the budget
  last=$(cat $R/codistill-a1/$s/latest)
  run $s ct --algo grpo --policy large --max_steps 20 --eval_every 5 --large_model $R/codistill-a1/$s/$last/large
done | xargs -P 2 -I{} sh -c "{} > /dev/null 2>&1 || echo failed: {}"
for s in $SEEDS; do  # GRPO on the large model given CT's 20 iterations more: both arms end after 120 large-model
  d=$R/grpo-large-120/$s  # updates (a copy of grpo-large, resumed)
  [ -d $d ] || { mkdir -p $R/grpo-large-120 && cp -r $R/grpo-large/$s $d; }
  echo "python codistill_grpo.py --resume $d --max_steps 120"
done | xargs -P 2 -I{} sh -c "{} > /dev/null 2>&1 || echo failed: {}"
