"""KDRL's teacher, as the paper picks it (Sec. 4): "we first run GRPO on the large model, select several
well-performing checkpoints ... We report the results with the best performing checkpoint". Here: every checkpoint
of a GRPO run on the large model, scored on a validation split of the training problems (never the held-out set:
the last 500 of the world's train.jsonl), decoded as held-out accuracy is (one sample per problem at tau = 1, fixed
seed); the best one's path is printed last.

    python experiments/teacher.py RUN_DIR [--up_to K] [--validation N] [--json F]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402
import trainer_io  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--validation", type=int, default=500, help="the last N training problems")
    p.add_argument("--up_to", type=int, default=0, help="only checkpoints up to this iteration (the budget)")
    p.add_argument("--json")
    a = p.parse_args()
    with open(os.path.join(a.run, "args.json")) as f:
        args = cg.Args(**{k: v for k, v in json.load(f).items() if k in cg.Args.__dataclass_fields__})
    assert args.algo == "grpo" and args.policy == "large", "a GRPO run on the large model"
    rows = cg.load_problems(args.dataset)[-a.validation:]
    scores = {}
    for ckpt in trainer_io.checkpoints_in(a.run):
        if a.up_to and int(ckpt.rsplit("-", 1)[1]) > a.up_to:
            continue
        model_dir = os.path.join(ckpt, "policy")
        tok = cg.load_tokenizer(model_dir)
        model = cg.load_model(model_dir, torch.float32, "cpu", False)
        torch.manual_seed(1234)  # the held-out evaluation's seed
        texts = cg.complete(model, tok, [r["problem"] for r in rows], args.template, args.max_completion_length,
                            args.max_prompt_length, cg.eos_ids_of(tok, model), 512, args.eval_temperature)
        scores[ckpt] = sum(cg.grade_batch(texts, [r["answer"] for r in rows], args.template)()) / len(rows)
        print(f"{ckpt}: {100 * scores[ckpt]:.1f}% of {len(rows)} validation problems")
    best = max(scores, key=scores.get)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(scores=scores, best=best, validation=len(rows)), f, indent=1)
    print(os.path.join(best, "policy"))


if __name__ == "__main__":
    main()
