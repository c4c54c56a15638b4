"""Models of the tiny world measured on its held-out problems, split by the skill the small base model lacks (a
digit pair that sums to 7: tiny_world.needs_skill): M samples per problem at tau = 1 (accuracy, the fraction of
problems with none right: Figure 1), the share of digits right, and greedy accuracy; each on all problems, on the
problems that need the skill (skill/...) and on the rest (rest/...).

    python experiments/measure.py --world runs/gate/seed0.json                # a build's two base models
    python experiments/measure.py runs/tiny/checkpoint-100/small --test TEST.jsonl
    python experiments/measure.py --runs runs/cmp/grpo-g/1 --json F           # every checkpoint of each run

A checkpoint's held-out problems are its run's --eval_dataset (args.json) unless --test names them.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402
import tiny_world  # noqa: E402
import trainer_io  # noqa: E402


def measure(model_dir, rows, samples=8, seed=0):
    """One model on the rows: `samples` completions each at tau = 1 (seeded) and one greedy -> figures()."""
    tok = cg.load_tokenizer(model_dir)
    model = cg.load_model(model_dir, torch.float32, "cpu", False)
    eos = cg.eos_ids_of(tok, model)
    torch.manual_seed(seed)
    texts = cg.complete(model, tok, [r["problem"] for r in rows for _ in range(samples)], "boxed", 16, 64, eos, 512,
                        temperature=1.0) if samples else []
    greedy = cg.complete(model, tok, [r["problem"] for r in rows], "boxed", 16, 64, eos, 512)
    return figures(rows, [texts[i * samples:(i + 1) * samples] for i in range(len(rows))], greedy)


def figures(rows, sampled, greedy):
    """Sampled accuracy, the fraction of rows with no right sample, digits right and greedy accuracy (sampled: a list
    of texts per row, maybe empty; greedy: one text per row), on all rows, on those that need the skill and on the
    rest."""
    right = lambda text, row: cg.final_answer(text, "boxed") == row["answer"]
    out = {"skill_frac": sum(map(tiny_world.needs_skill, rows)) / len(rows)}
    for part, keep in [("", lambda r: True), ("skill/", tiny_world.needs_skill),
                       ("rest/", lambda r: not tiny_world.needs_skill(r))]:
        idx = [i for i, r in enumerate(rows) if keep(r)]
        if not idx:
            continue
        out[f"{part}greedy_accuracy"] = sum(right(greedy[i], rows[i]) for i in idx) / len(idx)
        hits = [[right(t, rows[i]) for t in sampled[i]] for i in idx]
        if sum(map(len, hits)):
            out.update({
                f"{part}sampled_accuracy": sum(map(sum, hits)) / sum(map(len, hits)),
                f"{part}zero_accuracy_frac": sum(not any(h) for h in hits) / len(idx),
                f"{part}digit_accuracy": sum(cg.digit_accuracy(t, rows[i]["answer"], "boxed") for i in idx
                                             for t in sampled[i]) / sum(len(sampled[i]) for i in idx)})
    return out


def checkpoints_of(run):
    """(iteration, model name, folder) of every model of every checkpoint of a run, oldest first."""
    out = []
    for ckpt in trainer_io.checkpoints_in(run):
        it = int(ckpt.rsplit("-", 1)[1])
        out += [(it, n, os.path.join(ckpt, n)) for n in ["small", "large", "policy"] if os.path.isdir(
            os.path.join(ckpt, n))]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="model folders")
    p.add_argument("--world", help="a world's paths as JSON (tiny_world.py --json): its two base models")
    p.add_argument("--runs", nargs="*", default=[], help="run folders: the models of each of their checkpoints")
    p.add_argument("--test", help="held-out problems (JSONL), when no args.json names them; toy: the preset world's "
                   "500 (world seed 0), one set for every build")
    p.add_argument("--prompts", type=int, default=500, help="the first this many held-out problems (default 500)")
    p.add_argument("--samples", type=int, default=8, help="M samples per problem (default 8; 0: greedy only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--json", help="also write one JSON line per model to this file")
    a = p.parse_args()
    todo = [dict(model=m) for m in a.models] + [dict(model=m, iteration=it, name=n) for r in a.runs
                                                 for it, n, m in checkpoints_of(r)]
    test = a.test
    if a.world:
        world = json.load(open(a.world))
        todo += [dict(model=world["paths"][n], name=n, world=a.world) for n in ["small", "large"]]
        test = test or world["paths"]["test"]
    todo = [dict(job, test=test or "its run's") for job in todo]
    if not todo:
        p.error("give model folders, --world or --runs")
    out = open(a.json, "w") if a.json else None
    for job in todo:
        args_json = os.path.join(os.path.dirname(os.path.normpath(job["model"])), "args.json")
        rows_from = test or (json.load(open(args_json)).get("eval_dataset") if os.path.exists(args_json) else None)
        if not rows_from:
            p.error(f"{job['model']}: no args.json beside it names its held-out problems: give --test")
        rows = (tiny_world.problems(0)[1] if rows_from == "toy" else trainer_io.read_jsonl(rows_from))[:a.prompts]
        row = dict(job, threads=torch.get_num_threads(), isa=torch.backends.cpu.get_cpu_capability(),
                   **measure(job["model"], rows, a.samples, a.seed))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
