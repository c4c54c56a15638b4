"""Paired comparison of the tiny runs (README, "The paper's claims on a laptop"). A seed fixes the data order and
the sampling, so methods are compared seed by seed: for each pair, the per-seed difference of the small model's
held-out accuracy at the end (iteration 100) and averaged over the last evaluations (50, 75, 100), with its mean and
standard error (std over seeds / sqrt(seeds)). The criterion, fixed before the comparison ran: a method beats
another when its paired mean gain exceeds twice its standard error in both.

    python experiments/paired.py runs/cmp [--json F]
"""
import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402

PAIRS = [("codistill-a1", "grpo-small"), ("kdrl", "grpo-small"), ("codistill-a1", "kdrl"),
         ("codistill-a1", "grpo-small-ds"), ("codistill-a2", "grpo-small")]
LAST = (50, 75, 100)


def small_series(run_dir):
    """{iteration: (held-out accuracy, digit accuracy)} of the small model, and the rollouts' zero-accuracy fraction
    and accuracy by iteration."""
    rows = cg.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    p = "policy" if any("policy/accuracy" in r for r in rows) else "small"
    test = {r["iteration"]: (r[f"{p}/test_accuracy"], r.get(f"{p}/test_digit_accuracy")) for r in rows
            if f"{p}/test_accuracy" in r}
    zero = {r["iteration"]: r[f"{p}/zero_accuracy_frac"] for r in rows if f"{p}/zero_accuracy_frac" in r}
    return test, zero


def summary(root, group, seeds):
    out = {}
    for s in seeds:
        path = os.path.join(root, group, str(s))
        if os.path.exists(os.path.join(path, "metrics.jsonl")):
            test, zero = small_series(path)
            if all(i in test for i in (0, *LAST)):
                out[s] = dict(start=test[0][0], end=test[100][0], last=statistics.mean(test[i][0] for i in LAST),
                              digit_end=test[100][1], zero_early=statistics.mean(zero[i] for i in range(1, 26)))
    return out


def mean_se(xs):
    return statistics.mean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--json")
    a = p.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    groups = sorted(d for d in os.listdir(a.root) if os.path.isdir(os.path.join(a.root, d)))
    stats = {g: summary(a.root, g, seeds) for g in groups}
    print("| run | seeds | start (%) | end (%) | mean of 50/75/100 (%) | digits right at the end (%) | "
          "zero-accuracy prompts, iterations 1-25 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    pm = lambda xs: f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.pstdev(xs):.1f}"
    for g, per in stats.items():
        if per:
            v = list(per.values())
            print(f"| {g} | {len(v)} | {pm([x['start'] for x in v])} | {pm([x['end'] for x in v])} | "
                  f"{pm([x['last'] for x in v])} | {pm([x['digit_end'] for x in v if x['digit_end'] is not None])} | "
                  f"{statistics.mean(x['zero_early'] for x in v):.2f} |")
    print("\n| paired difference (points) | seeds | at the end: mean ± SE | last evaluations: mean ± SE | "
          "> 2 SE in both? |")
    print("| --- | --- | --- | --- | --- |")
    verdicts = {}
    for x, y in PAIRS:
        common = sorted(set(stats.get(x, {})) & set(stats.get(y, {})))
        if len(common) < 2:
            continue
        d_end = [100 * (stats[x][s]["end"] - stats[y][s]["end"]) for s in common]
        d_last = [100 * (stats[x][s]["last"] - stats[y][s]["last"]) for s in common]
        (me, se), (ml, sl) = mean_se(d_end), mean_se(d_last)
        wins = me > 2 * se and ml > 2 * sl
        verdicts[f"{x} - {y}"] = dict(seeds=common, end=d_end, last=d_last, wins=wins)
        print(f"| {x} - {y} | {len(common)} | {me:+.1f} ± {se:.1f} | {ml:+.1f} ± {sl:.1f} | {'yes' if wins else 'no'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(stats=stats, verdicts=verdicts), f, indent=1)


if __name__ == "__main__":
    main()
