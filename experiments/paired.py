"""Paired comparison of the tiny runs (README, "The paper's claims on a laptop"). A seed fixes the data order and
the sampling, so methods are compared seed by seed: for each pair, the per-seed difference of a model's held-out
accuracy at the end and averaged over the last three evaluations, with its mean and standard error (std over seeds /
sqrt(seeds)). The criterion, fixed before the comparison ran: a method beats another when its paired mean gain
exceeds twice its standard error in both.

    python experiments/paired.py runs/cmp [--json F]
"""
import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import trainer_io  # noqa: E402

# (model, arm, baseline): the questions each pair answers, fixed before the comparison on world v6 ran
PAIRS = [
    ("small", "codistill-a1", "grpo-g"),        # Table 1's claim: CoDistill beats GRPO on the small model
    ("small", "codistill-a2", "grpo-g"),
    ("small", "codistill-a1", "kdrl"),          # co-training against a frozen, GRPO-trained teacher
    ("small", "kdrl", "grpo-g"),
    ("small", "codistill-a1", "grpo-ds"),       # the KD term against the same M samples ranked by r alone
    ("small", "codistill-hints", "codistill-a1"),
    ("small", "codistill-a1", "ablation-a0"),   # App. C: the KD term and downsampling
    ("small", "kd-token", "codistill-a1"),      # token-level against sequence-level KD
    ("small", "codistill-a1", "kd-loss"),       # Sec. 3.1: KD in the reward against KD in the loss
    ("small", "codistill-a1", "kd-eq4"),        # Sec. 3.1, Fig. 9: Eq. (6) against Eq. (4)'s estimator
    ("small", "kd-rank-only", "codistill-a1"),  # the KD term's two uses, one at a time (world v5's finding)
    ("small", "kd-advantage-only", "codistill-a1"),
    ("small", "kd-rank-only", "grpo-ds"),
    ("small", "kd-advantage-only", "grpo-ds"),
    ("large", "codistill-a1", "grpo-large"),    # Table 2: the large model from the small model's rollouts
    ("large", "ct", "grpo-large"),              # Table 2: CoDistill + CT
    ("large", "ct", "grpo-large-120"),          # the same 120 large-model updates (CT's "end" only)
]


def series(run_dir):
    """{model: {iteration: (held-out accuracy, digit accuracy)}} and the rollouts' zero-accuracy fraction by
    iteration of the small model (or of grpo's policy, under the model it is)."""
    rows = trainer_io.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    prefix = {args.get("policy", "small"): "policy"} if args["algo"] == "grpo" else {"small": "small", "large": "large"}
    test = {m: {r["iteration"]: (r[f"{p}/test_accuracy"], r.get(f"{p}/test_digit_accuracy")) for r in rows
                if f"{p}/test_accuracy" in r} for m, p in prefix.items()}
    p = prefix.get("small", "policy")
    zero = {r["iteration"]: r[f"{p}/zero_accuracy_frac"] for r in rows if f"{p}/zero_accuracy_frac" in r}
    return test, zero


def summary(root, group, seeds, model):
    """Per seed: start, end, mean of the last three evaluations, digits right at the end, and the zero-accuracy
    fraction over the first quarter of the run."""
    out = {}
    for s in seeds:
        path = os.path.join(root, group, str(s))
        if not os.path.exists(os.path.join(path, "metrics.jsonl")):
            continue
        test, zero = series(path)
        evals = sorted(test.get(model, {}))
        if len(evals) < 4:  # not trained, not finished, or not this model
            continue
        last, early = evals[-3:], [i for i in zero if 0 < i <= evals[-1] // 4]
        out[s] = dict(start=test[model][evals[0]][0], end=test[model][evals[-1]][0],
                      last=statistics.mean(test[model][i][0] for i in last), digit_end=test[model][evals[-1]][1],
                      zero_early=statistics.mean(zero[i] for i in early) if early and model == "small" else None)
    return out


def mean_se(xs):
    return statistics.mean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the comparison's folder (compare.sh OUT_DIR): one folder per arm, one per seed in it")
    p.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated (default: %(default)s)")
    p.add_argument("--json", help="also write the figures and the verdicts to this file")
    a = p.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    groups = sorted(d for d in os.listdir(a.root) if os.path.isdir(os.path.join(a.root, d)))
    stats = {m: {g: summary(a.root, g, seeds, m) for g in groups} for m in ["small", "large"]}
    pm = lambda xs: f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.pstdev(xs):.1f}" if xs else "-"
    for model in ["small", "large"]:
        print(f"\n{model} model, held-out accuracy (%), mean ± std over seeds\n")
        print("| run | seeds | start | end | mean of the last 3 evaluations | digits right at the end | "
              "zero-accuracy prompts, first quarter |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for g, per in stats[model].items():
            if per:
                v = list(per.values())
                zero = [x["zero_early"] for x in v if x["zero_early"] is not None]
                zero = f"{statistics.mean(zero):.2f}" if zero else "-"
                print(f"| {g} | {len(v)} | {pm([x['start'] for x in v])} | {pm([x['end'] for x in v])} | "
                      f"{pm([x['last'] for x in v])} | {pm([x['digit_end'] for x in v if x['digit_end'] is not None])} "
                      f"| {zero} |")
    print("\n| model | paired difference (points) | seeds | at the end: mean ± SE | last 3 evaluations: mean ± SE | "
          "> 2 SE in both? |")
    print("| --- | --- | --- | --- | --- | --- |")
    verdicts = {}
    for model, x, y in PAIRS:
        sx, sy = stats[model].get(x, {}), stats[model].get(y, {})
        common = sorted(set(sx) & set(sy))
        if len(common) < 2:
            continue
        d_end = [100 * (sx[s]["end"] - sy[s]["end"]) for s in common]
        d_last = [100 * (sx[s]["last"] - sy[s]["last"]) for s in common]
        (me, se), (ml, sl) = mean_se(d_end), mean_se(d_last)
        verdict = ("yes" if me > 2 * se and ml > 2 * sl else
                   f"no ({y} is ahead)" if -me > 2 * se and -ml > 2 * sl else "no")
        verdicts[f"{model}: {x} - {y}"] = dict(seeds=common, end=d_end, last=d_last, verdict=verdict)
        print(f"| {model} | {x} - {y} | {len(common)} | {me:+.1f} ± {se:.1f} | {ml:+.1f} ± {sl:.1f} | {verdict} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(stats=stats, verdicts=verdicts), f, indent=1)


if __name__ == "__main__":
    main()
