"""The tiny world's base models, measured as the protocol asks (README, "The paper's claims on a laptop"):
M = 8 samples per held-out prompt at temperature 1 -> accuracy, fraction of prompts with no correct sample
(Figure 1), per-digit accuracy, greedy accuracy; and the partial credit directly: the KD term of Eq. (6),
(1/N) sum_t (log pi_large - log pi_small), of the small model's samples, by how many digits of their answer are
wrong.

    python experiments/base_models.py [--tiny_seed 0] [--tiny_warmup_small 400 ...] [--prompts 500] [--json F]

Flags other than --prompts / --json / --samples are codistill_grpo.py's (the world is built from them).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=500)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--json")
    own, rest = p.parse_known_args()
    a = cg.resolve_tiny(cg.parse_args(["--preset", "tiny", *rest]))
    rows = cg.load_problems(a.eval_dataset, "test")[:own.prompts]
    tok = cg.load_tokenizer(a.small_model)
    models = {n: cg.load_model(getattr(a, f"{n}_model"), torch.float32, "cpu", False) for n in ["small", "large"]}
    eos = cg.eos_ids_of(tok, *models.values())
    M, N, out = own.samples, a.max_completion_length, {}
    ids, mask = cg.encode_prompts(tok, [r["problem"] for r in rows], a.template, a.max_prompt_length, "cpu")
    golds = [r["answer"] for r in rows for _ in range(M)]
    for name, model in models.items():
        torch.manual_seed(0)
        comp = cg.sample(model, ids.repeat_interleave(M, 0), mask.repeat_interleave(M, 0), N, 1.0, eos,
                         tok.pad_token_id, 512)
        cmask = cg.completion_mask(comp, eos)
        texts = cg.decode(tok, comp, cmask)
        acc = torch.tensor(cg.grade_batch(texts, golds, a.template)())  # (P*M,)
        digits = torch.tensor([cg.digit_accuracy(t, g, a.template) for t, g in zip(texts, golds)])
        greedy = cg.complete(model, tok, [r["problem"] for r in rows], a.template, N, a.max_prompt_length, eos, 512)
        greedy_acc = sum(cg.grade_batch(greedy, [r["answer"] for r in rows], a.template)()) / len(rows)
        out[name] = dict(sampled_accuracy=acc.mean().item(), zero_accuracy_frac=(acc.view(-1, M).sum(1) == 0).float()
                         .mean().item(), digit_accuracy=digits.mean().item(), greedy_accuracy=greedy_acc)
        if name == "small":  # the KD term of its samples, by the number of wrong digits
            seqs = dict(prompt_ids=ids.repeat_interleave(M, 0), prompt_mask=mask.repeat_interleave(M, 0), comp=comp,
                        mask=cmask)
            a.micro_batch_size = 256
            logp = {n: cg.score(cg.TokenLogprobs(m), seqs, a)[0] for n, m in models.items()}
            kd = cg.kd_reward(logp["large"], logp["small"], cmask, N)  # (P*M,)
            wrong = torch.round((1 - digits) * len(rows[0]["answer"])).long()  # the tiny answers have 4 digits
            out["kd_by_wrong_digits"] = {int(w): dict(samples=int((wrong == w).sum()), mean_kd=kd[wrong == w].mean()
                                                      .item(), accuracy=acc[wrong == w].mean().item())
                                         for w in wrong.unique()}
    print(json.dumps(out, indent=1))
    if own.json:
        with open(own.json, "w") as f:
            json.dump(dict(settings=rest, prompts=len(rows), samples=M, **out), f, indent=1)


if __name__ == "__main__":
    main()
