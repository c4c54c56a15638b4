"""Where the small model's gain comes from, and how far its teacher stays ahead, from the comparison's checkpoints
(experiments/README.md, section 3's "also reported"):

(a) for the named arms, the small model's sampled (M = 8) and greedy accuracy on the problems that need the skill
    it lacks (a digit pair summing to 7) and on the rest, at every checkpoint; the paired differences of each part at
    the end (the criterion of paired.py: mean gain over twice its standard error);
(b) for every arm, the teacher's margin at every evaluation: the large model's held-out accuracy minus the small
    one's, sampled (metrics.jsonl: one sample per problem) and greedy (its checkpoints). An arm that trains no large
    model is measured against its teacher as it stands: the base large model (GRPO) or KDRL's frozen one.

    python experiments/skills.py runs/cmp [--arms grpo-g,grpo-ds,codistill-a1,kdrl] [--json F]

Each checkpoint's figures are kept in RUN/skills.jsonl, so a second call measures only what is new.
"""
import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import trainer_io  # noqa: E402
from measure import checkpoints_of, measure  # noqa: E402

PAIRS = [("codistill-a1", "grpo-g"), ("codistill-a1", "grpo-ds"), ("codistill-a1", "kdrl"), ("kdrl", "grpo-g")]


PROMPTS = {"n": 500}  # held-out problems measured (--prompts)


def measured(run, samples):
    """{(iteration, model name): figures} of every checkpoint of a run, measured once and kept in RUN/skills.jsonl."""
    path = os.path.join(run, "skills.jsonl")
    done = {(r["iteration"], r["name"], r["samples"]): r for r in trainer_io.read_jsonl(path, missing_ok=True)}
    args = json.load(open(os.path.join(run, "args.json")))
    rows = trainer_io.read_jsonl(args["eval_dataset"])[:PROMPTS["n"]]
    for it, name, folder in checkpoints_of(run):
        if (it, name, samples) not in done:
            row = dict(iteration=it, name=name, samples=samples, **measure(folder, rows, samples))
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            done[(it, name, samples)] = row
    return {(it, name): r for (it, name, s), r in done.items() if s == samples}


def small_name(run):
    args = json.load(open(os.path.join(run, "args.json")))
    return "policy" if args["algo"] == "grpo" else "small"


def mean_se(xs):
    return statistics.mean(xs), statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def skill_split(root, arms, seeds):
    """(a): per arm and iteration, mean over seeds of the small model's figures on each part; paired verdicts."""
    per = {arm: {s: measured(os.path.join(root, arm, str(s)), 8) for s in seeds
                 if os.path.isdir(os.path.join(root, arm, str(s)))} for arm in arms}
    keys = ["skill/sampled_accuracy", "rest/sampled_accuracy", "skill/greedy_accuracy", "rest/greedy_accuracy"]
    print("small model, held-out (%), mean ± std over seeds: sampled (M = 8) and greedy, on the skill problems and "
          "the rest\n")
    print("| arm | iteration | " + " | ".join(k.replace("_accuracy", "") for k in keys) + " |")
    print("| --- | --- |" + " --- |" * len(keys))
    table = {}
    for arm, seeds_of in per.items():
        name = small_name(os.path.join(root, arm, str(next(iter(seeds_of)))))
        iterations = sorted({it for figs in seeds_of.values() for it, n in figs if n == name})
        for it in iterations:
            vals = {k: [100 * figs[(it, name)][k] for figs in seeds_of.values() if k in figs.get((it, name), {})]
                    for k in keys}
            table[(arm, it)] = vals
            print(f"| {arm} | {it} | " + " | ".join(f"{statistics.mean(v):.1f} ± {statistics.pstdev(v):.1f}" if v
                                                      else "-" for v in vals.values()) + " |")
    print("\n| paired difference at the end (points) | part | seeds | mean ± SE | > 2 SE? |\n| --- | --- | --- | --- | --- |")
    verdicts = {}
    for x, y in PAIRS:
        if x not in per or y not in per:
            continue
        common = sorted(set(per[x]) & set(per[y]))
        nx, ny = small_name(os.path.join(root, x, str(common[0]))), small_name(os.path.join(root, y, str(common[0])))
        for k in keys[:2]:
            end = lambda figs, n: figs[max(it for it, m in figs if m == n), n][k]
            d = [100 * (end(per[x][s], nx) - end(per[y][s], ny)) for s in common]
            m, se = mean_se(d)
            verdict = "yes" if m > 2 * se else f"no ({y} is ahead)" if -m > 2 * se else "no"
            verdicts[f"{x} - {y}: {k}"] = dict(differences=d, verdict=verdict)
            print(f"| {x} - {y} | {k.split('/')[0]} | {len(common)} | {m:+.1f} ± {se:.1f} | {verdict} |")
    return table, verdicts


def teacher_margin(root, seeds, teacher=None, base_large=None):
    """(b): per arm and evaluation, the mean over seeds of (large - small) held-out accuracy, sampled and greedy."""
    print("\nthe teacher's margin, large minus small held-out accuracy (points), mean over seeds: sampled / greedy\n")
    arms = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d != "ct")
    out, columns = {}, set()
    fixed = {}  # the greedy accuracy of a teacher that does not train, measured once
    for arm in arms:
        margins = {}
        for s in seeds:
            run = os.path.join(root, arm, str(s))
            if not os.path.exists(os.path.join(run, "metrics.jsonl")):
                continue
            args = json.load(open(os.path.join(run, "args.json")))
            if args["algo"] == "grpo" and args.get("policy") == "large":
                continue
            rows = trainer_io.read_jsonl(os.path.join(run, "metrics.jsonl"))
            small = "policy" if args["algo"] == "grpo" else "small"
            greedy = measured(run, 0)
            teacher_dir = args["large_model"] if args["algo"] != "codistill" else None
            for r in rows:
                if f"{small}/test_accuracy" not in r:
                    continue
                it = r["iteration"]
                large = r.get("large/test_accuracy", teacher_sampled(root, args, rows, s))
                g_small = greedy.get((it, small), {}).get("greedy_accuracy")
                if args["algo"] == "codistill":
                    g_large = greedy.get((it, "large"), {}).get("greedy_accuracy")
                else:
                    if teacher_dir not in fixed:
                        fixed[teacher_dir] = measure(teacher_dir, trainer_io.read_jsonl(args["eval_dataset"])[
                            :PROMPTS["n"]], 0)
                    g_large = fixed[teacher_dir]["greedy_accuracy"]
                sampled = None if large is None else 100 * (large - r[f"{small}/test_accuracy"])
                greedy_margin = None if g_small is None or g_large is None else 100 * (g_large - g_small)
                margins.setdefault(it, []).append((sampled, greedy_margin))
        if margins:
            out[arm] = margins
            columns |= set(margins)
    its = sorted(columns)
    print("| arm | " + " | ".join(str(i) for i in its) + " |\n| --- |" + " --- |" * len(its))
    fmt = lambda xs: f"{statistics.mean(xs):+.1f}" if xs else "-"
    for arm, margins in out.items():
        cells = [f"{fmt([a for a, _ in margins[i] if a is not None])} / {fmt([b for _, b in margins[i] if b is not None])}"
                 if i in margins else "" for i in its]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    return out


def teacher_sampled(root, args, rows, seed):
    """The sampled held-out accuracy of a teacher that does not train, as its runs measured it at iteration 0:
    KDRL's in its own row 0; GRPO's (the base large model) in the row 0 of CoDistill's run of the same seed."""
    if args["algo"] == "kdrl":
        return rows[0].get("large/test_accuracy")
    path = os.path.join(root, "codistill-a1", str(seed), "metrics.jsonl")
    return trainer_io.read_jsonl(path)[0].get("large/test_accuracy") if os.path.exists(path) else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the comparison's folder (compare.sh OUT_DIR)")
    p.add_argument("--arms", default="grpo-g,grpo-ds,codistill-a1,kdrl", help="arms split by skill (default: %(default)s)")
    p.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=500, help="the first this many held-out problems (default 500)")
    p.add_argument("--json", help="also write the figures and verdicts to this file")
    a = p.parse_args()
    PROMPTS["n"] = a.prompts
    seeds = [int(x) for x in a.seeds.split(",")]
    table, verdicts = skill_split(a.root, a.arms.split(","), seeds)
    margins = teacher_margin(a.root, seeds)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(skills={f"{arm} {it}": v for (arm, it), v in table.items()}, verdicts=verdicts,
                           margins=margins), f, indent=1)


if __name__ == "__main__":
    main()
