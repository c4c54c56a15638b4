"""What the KD term does to the small model's rollouts, from the comparison's rollouts.jsonl (experiments/README.md,
section 4): (1) the mean per-token KD log-ratio (log pi_large - log pi_small) on right and on wrong answer digits, by
iteration: is the dense signal aligned with the reward?; (2) among wrong answers in groups that have a right one
(iterations 1-50), the share of digits right in those kept by the downsampling and in those dropped: which wrong
answers does ranking by r~ (or by r, for grpo-ds) push down?; (3) the mean |A~| of the kept rollouts (iterations
1-50) in groups whose kept rewards are all equal (A~ is the KD term's alone there) and in mixed groups.
rollouts.jsonl holds the first two prompts of iteration 1 and of each evaluation, so each figure pools those over
the seeds.

    python experiments/kd_signal.py runs/cmp codistill-a1 kdrl kd-token grpo-ds
"""
import argparse
import glob
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402
import trainer_io  # noqa: E402


def main(root, arms):
    for arm in arms:
        right, wrong, kept, dropped, adv = {}, {}, [], [], {"equal": [], "mixed": []}
        for path in sorted(glob.glob(os.path.join(root, arm, "*", "rollouts.jsonl"))):
            for row in trainer_io.read_jsonl(path):
                gold, it, group = row["answer"], row["iteration"], row["completions"]
                for c in group:
                    digits = [(t, k) for t, k in zip(c["tokens"], c.get("kd_tokens") or []) if t.isdigit()]
                    if len(digits) == len(gold):  # one token per digit, as the tiny tokenizer writes them
                        for (t, k), g in zip(digits, gold):
                            (right if t == g else wrong).setdefault(it, []).append(k)
                kept_c = [c for c in group if c.get("kept") and c.get("A_kd") is not None]
                if it <= 50 and kept_c:
                    equal = min(c["r"] for c in kept_c) == max(c["r"] for c in kept_c)
                    adv["equal" if equal else "mixed"] += [abs(c["A_kd"]) for c in kept_c]
                if it <= 50 and any(c["r"] > 0 for c in group):
                    for c in group:
                        if c["r"] == 0:
                            (kept if c.get("kept") else dropped).append(cg.digit_accuracy(c["text"], gold, "boxed"))
        print(f"{arm}")
        for it in sorted(right):
            print(f"  iteration {it:3d}: KD log-ratio on right digits {statistics.mean(right[it]):+.3f} "
                  f"({len(right[it])}), on wrong digits {statistics.mean(wrong.get(it, [float('nan')])):+.3f} "
                  f"({len(wrong.get(it, []))})")
        if kept and dropped:
            print(f"  wrong answers beside a right one, iterations 1-50: digits right {statistics.mean(kept):.2f} in "
                  f"the kept ({len(kept)}), {statistics.mean(dropped):.2f} in the dropped ({len(dropped)})")
        if adv["equal"] and adv["mixed"]:
            print(f"  mean |A~| of the kept, iterations 1-50: {statistics.mean(adv['equal']):.3f} in groups of equal r "
                  f"({len(adv['equal'])}), {statistics.mean(adv['mixed']):.3f} in mixed groups ({len(adv['mixed'])})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the comparison's folder (compare.sh OUT_DIR)")
    p.add_argument("arms", nargs="+", help="arms (folders in it) to read")
    a = p.parse_args()
    main(a.root, a.arms)
