"""Probe candidate tiny worlds: warm-up curves of the small and large models on k-digit additions.

For each snapshot along the supervised warm-up: greedy and sampled (tau = 1) accuracy on held-out problems, the
fraction of prompts with no correct sample among M = 8, and per-digit accuracy. Used to place the base models.
    OMP_NUM_THREADS=1 python experiments/probe_world.py --digits 3 --model small --steps 2000 --every 100
"""
import argparse, json, os, random, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import codistill_grpo as cg

p = argparse.ArgumentParser()
p.add_argument("--digits", type=int, default=3)
p.add_argument("--model", default="small")
p.add_argument("--config", default="")  # json overriding TINY_CONFIGS[model]
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--every", type=int, default=100)
p.add_argument("--lr", type=float, default=0)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--n_eval", type=int, default=200)
p.add_argument("--noise", type=float, default=0.0)  # probability that each answer digit of a warm-up example is replaced
p.add_argument("--out", default="")
p.add_argument("--reverse", action="store_true")
p.add_argument("--nocarry", action="store_true")
p.add_argument("--clean_steps", type=int, default=0)
p.add_argument("--noisy_lr", type=float, default=0)  # lr of the noisy phase (default: --lr)  # warm up on clean answers first, then on noisy ones  # only pairs whose digits sum to <= 9 in every place  # answer written least-significant digit first
a = p.parse_args()

def problems(seed, k, n_train=20000, n_test=500):
    g = random.Random(seed)
    lo, hi = 10 ** (k - 1), 10 ** k - 1
    seen, rows = set(), []
    n_train = min(n_train, (hi - lo + 1) ** 2 - n_test) if not a.nocarry else n_train
    while len(rows) < n_train + n_test:
        x, y = g.randint(lo, hi), g.randint(lo, hi)
        if a.nocarry:
            xs = [g.randint(1 if i == 0 else 0, 8 if i == 0 else 9) for i in range(k)]
            ys = [g.randint(1 if i == 0 else 0, 9 - d) for i, d in enumerate(xs)]
            x, y = int("".join(map(str, xs))), int("".join(map(str, ys)))
        if (x, y) in seen:
            continue
        seen.add((x, y))
        rows.append({"problem": f"What is {x} + {y}", "answer": str(x + y)[::-1] if a.reverse else str(x + y)})
    return rows[n_test:], rows[:n_test]

train, test = problems(a.seed, a.digits)
tok = cg.build_tiny_tokenizer(train)
from transformers import Qwen2Config, Qwen2ForCausalLM
cfg = dict(cg.TINY_CONFIGS[a.model], **json.loads(a.config or "{}"))
torch.manual_seed(a.seed)
config = Qwen2Config(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **cfg)
model = Qwen2ForCausalLM(config)
print("params", sum(p.numel() for p in model.parameters()), flush=True)
lr = a.lr or cg.TINY_WARMUP_LR[a.model]
eos = [tok.eos_token_id]

def noisy(rows, rng):
    out = []
    for r in rows:
        ans = "".join(rng.choice("0123456789") if rng.random() < a.noise else c for c in r["answer"])
        out.append(dict(r, answer=ans))
    return out

def digit_acc(pred, gold):
    if pred is None or not pred.isdigit():
        return 0.0
    if a.reverse:
        return sum(1 for i in range(len(gold)) if len(pred) > i and pred[i] == gold[i]) / len(gold)
    return sum(1 for i in range(1, len(gold) + 1) if len(pred) >= i and pred[-i] == gold[-i]) / len(gold)

def measure(rows):
    probs = [r["problem"] for r in rows]
    greedy = cg.complete(model, tok, probs, "boxed", 16, 64, eos, 256)
    torch.manual_seed(1234)
    sampled = cg.complete(model, tok, [q for q in probs for _ in range(8)], "boxed", 16, 64, eos, 512, temperature=1.0)
    gp = [cg.last_boxed(t) for t in greedy]
    sp = [cg.last_boxed(t) for t in sampled]
    golds = [r["answer"] for r in rows]
    g_acc = sum(x == y for x, y in zip(gp, golds)) / len(rows)
    s_ok = [sp[i] == golds[i // 8] for i in range(len(sp))]
    s_acc = sum(s_ok) / len(sp)
    zero = sum(not any(s_ok[8 * j:8 * j + 8]) for j in range(len(rows))) / len(rows)
    g_dig = sum(digit_acc(x, y) for x, y in zip(gp, golds)) / len(rows)
    s_dig = sum(digit_acc(sp[i], golds[i // 8]) for i in range(len(sp))) / len(sp)
    return dict(greedy=g_acc, sampled=s_acc, zero_frac=zero, greedy_digit=g_dig, sampled_digit=s_dig)

rng = random.Random(a.seed + 1)
done, t0, log = 0, time.time(), []
while done < a.steps:
    chunk = min(a.every, a.steps - done)
    # warmup() restarts its lr warm-up each call; keep it short relative to chunks by using the constant lr after
    noise_on = a.noise and done >= a.clean_steps
    chunk_lr = a.noisy_lr if noise_on and a.noisy_lr else lr
    cg.warmup(model, tok, noisy(train, rng) if noise_on else train, "boxed", chunk, chunk_lr, a.seed + done, a.batch)
    done += chunk
    m = measure(test[:a.n_eval])
    m.update(step=done, seconds=round(time.time() - t0, 1))
    log.append(m)
    print(json.dumps(m), flush=True)
if a.out:
    json.dump(dict(args=vars(a), log=log), open(a.out, "w"), indent=1)
