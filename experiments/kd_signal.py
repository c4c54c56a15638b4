"""What the KD term does to the small model's rollouts, from the comparison's rollouts.jsonl (experiments/README.md,
section 4): (1) the mean per-token KD log-ratio (log pi_large - log pi_small) on right and on wrong answer digits, by
iteration: is the dense signal aligned with the reward?; (2) among wrong answers in groups that have a right one
(iterations 1-50), the share of digits right in those kept by the downsampling and in those dropped: which wrong
answers does ranking by r~ (or by r, for grpo-ds) push down? rollouts.jsonl holds the first two prompts of
iteration 1 and of each evaluation, so each figure pools those over the seeds.

    python experiments/kd_signal.py runs/cmp codistill-a1 kdrl kd-token grpo-ds
"""
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402


def main(root, arms):
    for arm in arms:
        right, wrong, kept, dropped = {}, {}, [], []
        for path in sorted(glob.glob(os.path.join(root, arm, "*", "rollouts.jsonl"))):
            for row in cg.read_jsonl(path):
                gold, it, group = row["answer"], row["iteration"], row["completions"]
                for c in group:
                    digits = [(t, k) for t, k in zip(c["tokens"], c.get("kd_tokens") or []) if t.isdigit()]
                    if len(digits) == len(gold):  # one token per digit, as the tiny tokenizer writes them
                        for (t, k), g in zip(digits, gold):
                            (right if t == g else wrong).setdefault(it, []).append(k)
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


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
