"""The robustness gate as a table (experiments/README.md, section 2): each build of experiments/world_gate.sh with
its base models (experiments/measure.py: M = 8 samples and greedy on the 500 held-out problems, on all of them and
split by the skill the small model lacks) and its quick start (held-out accuracy at iterations 0 and 100), then the
range of each figure across the builds and the gate's criterion: every build within 3 points of the mean.

    python experiments/world_table.py runs/gate [--json F]
"""
import argparse
import glob
import json
import os
import statistics

FIGURES = [("small", "sampled_accuracy"), ("small", "greedy_accuracy"), ("large", "sampled_accuracy"),
           ("large", "greedy_accuracy")]  # what the gate holds within 3 points of the mean


def read_models(path):
    """{model name: its figures} of a measure.py --json file, or {} when there is none."""
    return {row["name"]: row for row in map(json.loads, open(path))} if os.path.exists(path) else {}


def read_build(root, name):
    models, common = read_models(os.path.join(root, f"{name}-base.jsonl")), read_models(
        os.path.join(root, f"{name}-common.jsonl"))
    quick = {}
    path = os.path.join(root, f"{name}-quickstart", "metrics.jsonl")
    for line in open(path) if os.path.exists(path) else []:
        row = json.loads(line)
        for m in ["small", "large"]:
            if f"{m}/test_accuracy" in row:
                quick.setdefault(m, {})[row["iteration"]] = row[f"{m}/test_accuracy"]
    seconds = {}
    for part in ["build", "quickstart"]:
        path = os.path.join(root, f"{name}-{part}-seconds.json")
        seconds.update(json.load(open(path)) if os.path.exists(path) else {})
    world = json.load(open(os.path.join(root, f"{name}-world.json")))
    return dict(build=name, threads=models["small"]["threads"], isa=models["small"]["isa"], seed=world["seed"],
                steps=world["steps"], small=models["small"], large=models["large"], common=common, quickstart=quick,
                seconds=seconds)


def criterion(rows, figures, of=lambda r, model: r[model]):
    """One line per figure: its range over the builds, and whether every build is within 3 points of the mean."""
    span = lambda xs: f"{100 * min(xs):.1f}-{100 * max(xs):.1f} (mean {100 * statistics.mean(xs):.1f})"
    for model, key in figures:
        xs = [of(r, model)[key] for r in rows]
        worst = max(abs(x - statistics.mean(xs)) for x in xs)
        held = "within 3 points of the mean" if worst <= 0.03 else "NOT within 3 points of the mean"
        print(f"  {model} {key}: {span(xs)}; the farthest build {100 * worst:.1f} points from the mean: {held}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the gate's output folder (world_gate.sh OUT_DIR)")
    p.add_argument("--json", help="also write the builds' figures to this file")
    a = p.parse_args()
    names = sorted(os.path.basename(f)[:-len("-base.jsonl")] for f in glob.glob(os.path.join(a.root, "*-base.jsonl")))
    rows = [read_build(a.root, n) for n in names]
    pct = lambda x: f"{100 * x:.1f}"
    print("| build | threads, kernels | small: sampled (skill / rest) | no right of 8 | greedy (skill / rest) | "
          "large: sampled | greedy | quick start, small 0 -> 100 | large 0 -> 100 |")
    print("| --- |" + " --- |" * 8)
    for r in rows:
        s, l, q = r["small"], r["large"], r["quickstart"]
        qs = lambda m: f"{pct(q[m][0])} -> {pct(q[m][max(q[m])])}" if m in q and max(q[m]) > 0 else "-"
        print(f"| {r['build']} | {r['threads']}, {r['isa']} | {pct(s['sampled_accuracy'])} "
              f"({pct(s['skill/sampled_accuracy'])} / {pct(s['rest/sampled_accuracy'])}) | "
              f"{pct(s['zero_accuracy_frac'])} | {pct(s['greedy_accuracy'])} ({pct(s['skill/greedy_accuracy'])} / "
              f"{pct(s['rest/greedy_accuracy'])}) | {pct(l['sampled_accuracy'])} | {pct(l['greedy_accuracy'])} | "
              f"{qs('small')} | {qs('large')} |")
    span = lambda xs: f"{100 * min(xs):.1f}-{100 * max(xs):.1f} (mean {100 * statistics.mean(xs):.1f})"
    print(f"\n{len(rows)} builds. On each build's own held-out problems:")
    criterion(rows, FIGURES + [("small", "zero_accuracy_frac"), ("small", "skill_frac")])
    common = [r for r in rows if r["common"]]
    if common:
        print(f"On one set for every build, the preset world's held-out problems ({len(common)} builds):")
        criterion(common, FIGURES + [("small", "zero_accuracy_frac"), ("small", "skill/sampled_accuracy"),
                                     ("small", "rest/sampled_accuracy")], of=lambda r, model: r["common"][model])
    done = [r for r in rows if 100 in r["quickstart"].get("small", {})]
    if done:
        gains = [r["quickstart"]["small"][100] - r["quickstart"]["small"][0] for r in done]
        print(f"Quick starts ({len(done)}): small held-out at 100: {span([r['quickstart']['small'][100] for r in done])},"
              f" gain {span(gains)}; large at 100: {span([r['quickstart']['large'][100] for r in done])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
