"""One prompt of one iteration, in numbers: a Markdown table of rollouts.jsonl (README, "One iteration, in numbers"),
and with --tokens I the tokens of completion I (its row in the table) with the large model's log-ratio at each: the
per-token terms that --kd_form token adds to the advantage, beside the one sequence-level term of Eq. (6) that the
paper's form pays.

    python experiments/one_iteration.py runs/tiny/rollouts.jsonl [--iteration 1] [--prompt 0] [--tokens I]
"""
import argparse
import json


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--iteration", type=int, default=1)
    p.add_argument("--prompt", type=int, default=0, help="which of the iteration's logged prompts")
    p.add_argument("--tokens", type=int, help="also the per-token log-ratios of this completion")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.path) if line.strip()]
    row = [r for r in rows if r["iteration"] == a.iteration][a.prompt]
    fmt = lambda v, f="{:+.3f}": "-" if v is None else f.format(v)
    code = lambda text: "`" + text.replace("|", "\\|") + "`"  # a | in a Markdown table cell must be escaped
    print(f"iteration {row['iteration']}, alpha = {row['alpha']:g}: {row['problem']!r}, gold answer {row['answer']}\n")
    print("| i | completion | r | KD term | r~ = r + alpha KD | kept | A~ | A |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, c in enumerate(row["completions"]):
        print(f"| {i} | {code(c['text'].strip())} | {c['r']:g} | {fmt(c['kd'])} | {fmt(c['r_kd'])} | "
              f"{'yes' if c['kept'] else 'no'} | {fmt(c['A_kd'])} | {fmt(c['A'])} |")
    if a.tokens is not None:
        c = row["completions"][a.tokens]
        print(f"\ncompletion {a.tokens}, `{c['text'].strip()}` (r = {c['r']:g}): Eq. (6) pays it one term, "
              f"{fmt(c['kd'])} = (1/N) x the sum of the row below; --kd_form token adds each token's own term "
              f"(times alpha) to its advantage instead\n")
        print("| token | " + " | ".join(code(t.strip() or repr(t)) for t in c["tokens"]) + " |")
        print("| --- |" + " --- |" * len(c["tokens"]))
        print("| log pi_large - log pi_small | " + " | ".join(f"{d:+.2f}" for d in c["kd_tokens"]) + " |")


if __name__ == "__main__":
    main()
