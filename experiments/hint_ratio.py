"""How far Eq. (10)'s literal ratio is from 1 on hint tokens (README, "--large_hint_ratio"): on the T tokens the
large model wrote, the literal Eq. (10) divides pi_large by pi_small_old, though pi_large_old sampled them. At the
first step pi_large = pi_large_old, so the ratio is exp(log pi_large_old - log pi_small_old) on those tokens.

    python experiments/hint_ratio.py [--prompts 64] [codistill_grpo.py flags, e.g. --tiny_seed 0]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402
import tiny_world  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    own, rest = p.parse_known_args()
    a = tiny_world.resolve(cg.parse_args(["--preset", "tiny", "--hint_tokens", "4", *rest]), cg.TEMPLATES)
    rows = cg.load_problems(a.dataset)[:own.prompts]
    tok = cg.load_tokenizer(a.small_model)
    small, large = (cg.load_model(m, torch.float32, "cpu", False) for m in (a.small_model, a.large_model))
    eos = cg.eos_ids_of(tok, small, large)
    ids, mask = cg.encode_prompts(tok, [r["problem"] for r in rows], a.template, a.max_prompt_length, "cpu")
    torch.manual_seed(0)
    seqs = cg.rollout(small, large, ids, mask, a, eos, tok.pad_token_id, hints=True)  # (B*M, L) each
    with torch.no_grad():
        lp = {n: cg.token_logprobs(m, seqs["prompt_ids"], seqs["prompt_mask"], seqs["comp"], seqs["mask"], 1.0, 1024)
              for n, m in [("small", small), ("large", large)]}
    on_hint = seqs["hint"].bool() & seqs["mask"].bool()
    log_ratio = (lp["large"] - lp["small"])[on_hint]  # (hint tokens,): log pi_large_old - log pi_small_old
    print(f"{on_hint.sum().item()} hint tokens of {len(rows)} prompts x M = {a.num_samples}: mean log-ratio "
          f"{log_ratio.mean():+.3f}, largest ratio {log_ratio.exp().max():.1f}, ratio > 1.2 on "
          f"{(log_ratio.exp() > 1 + a.clip_eps).float().mean():.0%} of them")


if __name__ == "__main__":
    main()
