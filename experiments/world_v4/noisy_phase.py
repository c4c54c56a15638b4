"""How fragile the small base model's noisy warm-up phase is, and two variants of it that I tried and dropped
(README, "The same world on every machine"). Runs experiments/base_models.py on a world built with the noisy
phase changed:

    python experiments/noisy_phase.py [--noisy_lr 1e-3] [--soft] [--decay] BASE_MODELS_FLAGS...

--noisy_lr  the noisy phase's lr (the world's: 1e-3)
--soft      train each answer digit on its expected noisy target (1 - p on the right digit + p/10 on each of the
            ten) instead of on digits drawn at random with probability p: the same optimum, no label noise
--decay     decay the noisy phase's lr linearly to 0 instead of holding it constant

The rest goes to base_models.py (e.g. --tiny_warmup_small 440 --tiny_noisy_small 270 --tiny_warmup_large 0
--prompts 200 --json F; with --tiny_warmup_large 0 the KD table is meaningless, the small model's figures are not).
The build's check of its small model (and its rebuilds) is off here, so that broken builds can be measured.
"""
import argparse
import os
import random
import sys

import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import base_models  # noqa: E402
import codistill_grpo as cg  # noqa: E402


def variant_warmup(soft, decay):
    clean_warmup = cg.warmup

    def warmup(model, tokenizer, rows, template, steps, lr, seed, batch_size=64, noise=0.0, desc="warm-up"):
        if not noise or not (soft or decay):
            return clean_warmup(model, tokenizer, rows, template, steps, lr, seed, batch_size, noise, desc)
        g = random.Random(seed)
        digits = torch.tensor(tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))  # (10,)
        encode = lambda r: (tokenizer(cg.TEMPLATES[template].format(prompt=r["problem"]))["input_ids"],
                            tokenizer(cg.tiny_solution(r))["input_ids"] + [tokenizer.eos_token_id])
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: min(1.0, (t + 1) / max(1, steps // 20)) * ((1 - t / steps) if decay else 1.0))
        pad = tokenizer.pad_token_id
        model.train()
        for _ in tqdm(range(steps), desc=desc, leave=False):
            batch = [encode(r if soft else cg.corrupt(r, noise, g)) for r in g.choices(rows, k=batch_size)]
            L = max(len(p) + len(s) for p, s in batch)
            ids = torch.tensor([p + s + [pad] * (L - len(p) - len(s)) for p, s in batch])  # (batch, L)
            attn = torch.tensor([[1] * (len(p) + len(s)) + [0] * (L - len(p) - len(s)) for p, s in batch])
            target = torch.tensor([[-100] * len(p) + s + [-100] * (L - len(p) - len(s)) for p, s in batch])[:, 1:]
            logp = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float().log_softmax(-1)  # (batch, L-1, V)
            ce = -logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)  # (batch, L-1)
            if soft:  # the solution's only digits are the answer's
                ce = torch.where(torch.isin(target, digits), (1 - noise) * ce - noise * logp[..., digits].mean(-1), ce)
            solution = target != -100
            ((ce * solution).sum() / solution.sum()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return model
    return warmup


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--noisy_lr", type=float, default=cg.TINY_NOISE["lr"])
    p.add_argument("--soft", action="store_true")
    p.add_argument("--decay", action="store_true")
    own, rest = p.parse_known_args()
    cg.TINY_NOISE = dict(cg.TINY_NOISE, lr=own.noisy_lr, **({"variant": [own.soft, own.decay]}
                                                              if own.soft or own.decay else {}))  # its own cache key
    cg.warmup = variant_warmup(own.soft, own.decay)
    cg.greedy_accuracy = lambda *args: 1.0  # measure broken builds instead of refusing them
    sys.argv = ["base_models.py", *rest]
    base_models.main()


if __name__ == "__main__":
    main()
