"""Probe one candidate base model of the tiny world: a Qwen2 of a given size trained with tiny_world.warmup (lr
decayed to zero at the last step), then measured on the held-out problems as tiny_world.measure does (M = 8
samples at tau = 1, zero-of-8 fraction, digits right, greedy). Used to choose the world's sizes and steps.

    OMP_NUM_THREADS=1 python experiments/probe_model.py --layers 1 --width 64 --steps 2000 --lr 3e-3 --json F
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402
import tiny_world as tw  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--spread", type=float, default=0.0, help="soft targets on answer digits")
    p.add_argument("--nocarry", action="store_true", help="additions without carries (the world's problems)")
    p.add_argument("--json")
    a = p.parse_args()
    train, test = tw.problems(a.seed, carries=not a.nocarry)
    tok = tw.build_tokenizer(train)
    tw.CONFIGS["probe"] = dict(hidden_size=a.width, intermediate_size=4 * a.width, num_hidden_layers=a.layers,
                               num_attention_heads=a.heads, num_key_value_heads=max(1, a.heads // 2))
    model = tw.new_model("probe", tok, a.seed)
    t0 = time.time()
    tw.warmup(model, tok, train, a.steps, a.lr, a.seed, a.batch, spread=a.spread)
    seconds = time.time() - t0
    rows = test[:a.prompts]
    eos = [tok.eos_token_id]
    torch.manual_seed(0)
    texts = cg.complete(model, tok, [r["problem"] for r in rows for _ in range(8)], "boxed", 16, 64, eos, 512, 1.0)
    golds = [r["answer"] for r in rows for _ in range(8)]
    right = [cg.final_answer(t, "boxed") == g for t, g in zip(texts, golds)]
    greedy = cg.complete(model, tok, [r["problem"] for r in rows], "boxed", 16, 64, eos, 512)
    out = dict(vars(a), params=sum(x.numel() for x in model.parameters()), seconds=round(seconds, 1),
               threads=torch.get_num_threads(), sampled=sum(right) / len(right),
               zero8=sum(not any(right[i:i + 8]) for i in range(0, len(right), 8)) / len(rows),
               digits=sum(cg.digit_accuracy(t, g, "boxed") for t, g in zip(texts, golds)) / len(texts),
               greedy=sum(cg.final_answer(t, "boxed") == r["answer"] for t, r in zip(greedy, rows)) / len(rows))
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
