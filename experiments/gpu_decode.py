"""Rollout speed against its floor on a GPU: tokens/s of codistill_grpo.sample (HF generate, eager) at batch 1 and
at a training batch, for a model folder, against the memory-bandwidth floor of a decode step (every weight read once
per step; the bandwidth measured here with a device-to-device copy).

    python experiments/gpu_decode.py MODEL_DIR [--batches 1,128] [--tokens 256]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402


def bandwidth(gb=4):
    """Bytes read + written per second by a large device-to-device copy."""
    x = torch.empty(int(gb * 2**30), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--batches", default="1,128")
    p.add_argument("--tokens", type=int, default=256)
    a = p.parse_args()
    bw = bandwidth()
    model = cg.load_model(a.model, torch.bfloat16, "cuda", False)
    tok = cg.load_tokenizer(a.model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_s = weight_bytes / bw  # one decode step reads every weight once (the tied head included)
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, bandwidth_gb_s=bw / 1e9,
               weight_gb=weight_bytes / 1e9, floor_ms_per_step=1e3 * floor_s, runs=[])
    for b in [int(x) for x in a.batches.split(",")]:
        ids, mask = cg.encode_prompts(tok, [f"What is {i} + {i + 7}" for i in range(b)], "boxed", 64, "cuda")
        eos = cg.eos_ids_of(tok, model)
        cg.sample(model, ids, mask, 16, 1.0, eos, tok.pad_token_id, b)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        comp = cg.sample(model, ids, mask, a.tokens, 1.0, eos, tok.pad_token_id, b)
        torch.cuda.synchronize()
        s = time.perf_counter() - t
        steps = comp.shape[1]
        tokens = cg.completion_mask(comp, eos).sum().item()
        out["runs"].append(dict(batch=b, steps=steps, tokens=tokens, seconds=s, tokens_per_s=tokens / s,
                                ms_per_step=1e3 * s / steps, floor_tokens_per_s=b / floor_s,
                                fraction_of_floor=(floor_s * steps) / s))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
