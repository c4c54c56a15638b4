"""The robustness gate as a table (experiments/README.md, section 2): each build of experiments/world_gate.sh with its
base models (M = 8 samples on the 500 held-out problems) and its quick start (held-out accuracy at iterations 0 and
100), then the range of each figure across the builds.

    python experiments/world_table.py runs/gate [--json F]
"""
import argparse
import glob
import json
import os


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    for base in sorted(glob.glob(os.path.join(a.root, "*-base.json"))):
        name = os.path.basename(base)[:-len("-base.json")]
        with open(base) as f:
            b = json.load(f)
        qs = os.path.join(a.root, f"{name}-quickstart", "metrics.jsonl")
        test = {}
        if os.path.exists(qs):
            for line in open(qs):
                r = json.loads(line)
                for m in ["small", "large"]:
                    if f"{m}/test_accuracy" in r:
                        test.setdefault(m, {})[r["iteration"]] = r[f"{m}/test_accuracy"]
        seconds = os.path.join(a.root, f"{name}-seconds.json")
        secs = json.load(open(seconds)) if os.path.exists(seconds) else {}
        rows.append(dict(build=name, threads=b["threads"], isa=b["isa"], seed=b["seed"], steps=b["steps"],
                         small=b["small"], large=b["large"], quickstart=test, seconds=secs))
    pct = lambda x: f"{100 * x:.1f}"
    print("| build | threads, kernels | small: sampled | no right of 8 | digits | greedy | large: sampled | no right of 8 | "
          "quick start, small 0 -> 100 | large 0 -> 100 |")
    print("| --- |" + " --- |" * 9)
    for r in rows:
        s, l, q = r["small"], r["large"], r["quickstart"]
        qs = lambda m: (f"{pct(q[m][0])} -> {pct(q[m][max(q[m])])}" + ("" if max(q[m]) == 100 else
                        f" (at {max(q[m])})") if m in q and max(q[m]) > 0 else "-")
        print(f"| {r['build']} | {r['threads']}, {r['isa']} | {pct(s['sampled_accuracy'])} | "
              f"{pct(s['zero_accuracy_frac'])} | {pct(s['digit_accuracy'])} | {pct(s['greedy_accuracy'])} | "
              f"{pct(l['sampled_accuracy'])} | {pct(l['zero_accuracy_frac'])} | {qs('small')} | {qs('large')} |")
    span = lambda xs: f"{100 * min(xs):.1f}-{100 * max(xs):.1f} (mean {100 * sum(xs) / len(xs):.1f})"
    print(f"\n{len(rows)} builds. Small, sampled: {span([r['small']['sampled_accuracy'] for r in rows])}; no right of 8: "
          f"{span([r['small']['zero_accuracy_frac'] for r in rows])}; large, sampled: "
          f"{span([r['large']['sampled_accuracy'] for r in rows])}")
    done = [r for r in rows if "small" in r["quickstart"] and 100 in r["quickstart"]["small"]]
    if done:
        gains = [r["quickstart"]["small"][100] - r["quickstart"]["small"][0] for r in done]
        print(f"Quick starts ({len(done)}): small held-out at 100: {span([r['quickstart']['small'][100] for r in done])},"
              f" gain {span(gains)}; large at 100: {span([r['quickstart']['large'][100] for r in done])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
