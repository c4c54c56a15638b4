#!/usr/bin/env bash
# The tiny world's robustness gate (README, "The world on every machine"): builds of the world at 1 and 2 threads,
# world seeds 0-4, warm-up lengths moved by 10%, and under ../shared/tools/other-cpu (another instruction set, which
# rounds as another CPU would). Each build: its base models measured (experiments/measure.py: M = 8 samples and
# greedy on its 500 held-out problems, split by the skill the small model lacks; and again on one set for every
# build, the preset world's, so that a seed's other problems do not count as another model), then the quick start
# run on it (--preset tiny) with the same threads and kernels. Two builds at a time.
#     bash experiments/world_gate.sh OUT_DIR [OTHER_CPU]          # both stages
#     STAGE=build bash experiments/world_gate.sh OUT_DIR          # the builds and measurements only
#     STAGE=quickstart bash experiments/world_gate.sh OUT_DIR     # the quick starts only (the builds are cached)
# then: python experiments/world_table.py OUT_DIR
set -u
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then sed -n '2,/^set -u/p' "$0" | grep '^#' | cut -c3-; exit 0; fi
R=${1:-runs/gate}; OTHER=${2:-../shared/tools/other-cpu}; STAGE=${STAGE:-all}
export HF_HUB_OFFLINE=1
mkdir -p $R
build() {  # name threads wrapper world-flags...
  name=$1; threads=$2; wrap=$3; shift 3
  C=$R/cache-$name
  if [ $STAGE != quickstart ]; then
    t0=$(date +%s)
    OMP_NUM_THREADS=$threads $wrap python tiny_world.py --cache_dir $C --json $R/$name-world.json "$@" \
      > $R/$name-build.log 2>&1 || { echo "failed build: $name"; return; }
    OMP_NUM_THREADS=$threads $wrap python experiments/measure.py --world $R/$name-world.json --json $R/$name-base.jsonl \
      >> $R/$name-build.log 2>&1 || { echo "failed measure: $name"; return; }
    OMP_NUM_THREADS=$threads $wrap python experiments/measure.py --world $R/$name-world.json --test toy \
      --json $R/$name-common.jsonl >> $R/$name-build.log 2>&1 || { echo "failed measure: $name"; return; }
    echo "{\"build_and_measure_s\": $(($(date +%s) - t0))}" > $R/$name-build-seconds.json
  fi
  if [ $STAGE != build ]; then
    t1=$(date +%s)
    world=$(python -c "import json; d=json.load(open('$R/$name-world.json'))['paths']; print(d['small'], d['large'], d['train'], d['test'])")
    set -- $world
    OMP_NUM_THREADS=$threads $wrap python codistill_grpo.py --preset tiny --small_model $1 --large_model $2 \
      --dataset $3 --eval_dataset $4 --output_dir $R/$name-quickstart --overwrite > $R/$name-quickstart.log 2>&1 \
      || echo "failed quick start: $name"
    echo "{\"quickstart_s\": $(($(date +%s) - t1))}" > $R/$name-quickstart-seconds.json
  fi
}
export -f build; export R OTHER STAGE
{
  echo "seed0-2threads 2 env --seed 0"
  echo "seed0-1thread 1 env --seed 0"
  echo "seed0-othercpu 1 $OTHER --seed 0"
  echo "seed1 1 env --seed 1"
  echo "seed2 1 env --seed 2"
  echo "seed3 1 env --seed 3"
  echo "seed4 1 env --seed 4"
  echo "seed1-othercpu 1 $OTHER --seed 1"
  echo "seed2-othercpu 1 $OTHER --seed 2"
  echo "steps-10pct 1 env --seed 0 --steps_small 1800 --steps_large 1350"
  echo "steps+10pct 1 env --seed 0 --steps_small 2200 --steps_large 1650"
} | xargs -P ${PARALLEL:-2} -L 1 bash -c 'build "$@"' _
