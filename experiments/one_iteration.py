"""One prompt of one iteration, in numbers: a Markdown table of rollouts.jsonl (README, "One iteration, in numbers").

    python experiments/one_iteration.py runs/tiny/rollouts.jsonl [--iteration 1] [--prompt 0]
"""
import argparse
import json


def main():
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--iteration", type=int, default=1)
    p.add_argument("--prompt", type=int, default=0, help="which of the iteration's logged prompts")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.path) if line.strip()]
    row = [r for r in rows if r["iteration"] == a.iteration][a.prompt]
    fmt = lambda v, f="{:+.3f}": "-" if v is None else f.format(v)
    print(f"iteration {row['iteration']}, alpha = {row['alpha']:g}: {row['problem']!r}, gold answer {row['answer']}\n")
    print("| i | completion | r | KD term | r~ = r + alpha KD | kept | A~ | A |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, c in enumerate(row["completions"]):
        print(f"| {i} | `{c['text'].strip()}` | {c['r']:g} | {fmt(c['kd'])} | {fmt(c['r_kd'])} | "
              f"{'yes' if c['kept'] else 'no'} | {fmt(c['A_kd'])} | {fmt(c['A'])} |")


if __name__ == "__main__":
    main()
