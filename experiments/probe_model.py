"""Probe one candidate base model of the tiny world: a Qwen2 of a given size trained with tiny_world.warmup (lr
decayed to zero at the last step), then measured on the held-out problems as experiments/measure.py measures (M = 8
samples at tau = 1, zero-of-8 fraction, digits right, greedy, split by the skill). Used to choose the worlds' sizes,
steps and soft targets (a whole world with other targets: tiny_world.py --spread_small S --mistake_small M).

    OMP_NUM_THREADS=1 python experiments/probe_model.py --layers 1 --width 64 --steps 2000 --spread 0.4 --mistake 0.85
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402
import tiny_world as tw  # noqa: E402
from measure import measure  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--spread", type=float, default=0.0, help="s: soft targets on answer digits")
    p.add_argument("--mistake", type=float, default=0.0, help="m: the share of a 7's target put on 8")
    p.add_argument("--nocarry", action="store_true", help="additions without carries (the world's problems)")
    p.add_argument("--json")
    a = p.parse_args()
    train, test = tw.problems(a.seed, carries=not a.nocarry)
    tok = tw.build_tokenizer(train, cg.TEMPLATES)
    tw.CONFIGS["probe"] = dict(hidden_size=a.width, intermediate_size=4 * a.width, num_hidden_layers=a.layers,
                               num_attention_heads=a.heads, num_key_value_heads=max(1, a.heads // 2))
    model = tw.new_model("probe", tok, a.seed)
    t0 = time.time()
    tw.warmup(model, tok, train, a.steps, a.lr, a.seed, cg.TEMPLATES["boxed"], a.batch, spread=a.spread,
              mistake=a.mistake)
    seconds = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:  # measured as a world's base model is: by path
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        figures = measure(tmp, test[:a.prompts])
    out = dict(vars(a), params=sum(x.numel() for x in model.parameters()), seconds=round(seconds, 1),
               threads=torch.get_num_threads(), **figures)
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
