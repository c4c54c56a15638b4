"""
CoDistill-GRPO: a small and a large language model trained together with GRPO: the method and its trainer.

Paper: "CoDistill-GRPO: A Co-Distillation Recipe for Efficient Group Relative Policy Optimization" (2026).
Equation numbers in comments, `# Eq. (N)`, are the paper's. One iteration, per rank, B prompts (codistill_iteration):

    1. rollouts: the small model samples M completions per prompt (early on, the large model writes the first T)
    2. rewards r: accuracy (+ format for the r1 template), graded in a worker process while 3 runs
    3. score: log pi_phi_old and log pi_theta_old of every completion token, no grad
    4. KD reward r~ = r + alpha * (1/N) sum_t (log pi_theta_old - log pi_phi_old)      Eq. (6)
       and downsampling: keep the G/2 highest and the G/2 lowest r~ of the M          Sec. 3.3
    5. advantages over the kept G: A~ = r~ - mean(r~) (small), A = (r - mean r) / (std r + 1e-4)  Eq. (7), (3)
    6. small step: clipped ratio pi_phi / pi_phi_old with A~, sum over tokens / N      Eq. (5)
    7. large step: clipped ratio pi_theta / pi_phi_old with A, sum over tokens / N     Eq. (10)
and around it the loop (train): held-out accuracy when due, a row of metrics.jsonl, a checkpoint when due.

Run it:
    python codistill_grpo.py --preset tiny                  # offline, CPU, minutes: the whole method on a toy task
    python codistill_grpo.py --preset tiny --algo grpo      # baselines in the same loop: grpo | kdrl
    python codistill_grpo.py --preset qwen0.5b              # one GPU, Qwen2.5-0.5B / 1.5B on GSM8K
    python codistill_grpo.py --algo grpo                    # the paper's GRPO baseline (Table 3, G = 8 samples)
    python codistill_grpo.py                                # the paper's Qwen setting (Table 3), one process
    python codistill_grpo.py --output_dir runs/tiny --resume  # continue a stopped run exactly
    torchrun --nproc_per_node=8 codistill_grpo.py --fsdp   # 8 GPUs, both models sharded with FSDP2

The defaults are the paper's wherever it says something; each departure is a flag (README, "Where this code departs
from the paper"). The file reads in the paper's order: arguments, the equations, rewards, rollouts, log-probs, one
optimizer step, then the iteration (the baselines and the KD forms chosen in one place: ITERATIONS, KD_FORMS) and the
loop. A reader who stops at the banner `below: machinery the paper does not describe` has read the whole method; what
the code above it calls from below is machinery only: grade_batch (the grading worker that step 2 waits on),
optimizer_step and StepStats (the gradient clip, AdamW's step and the step's metrics), timer, new_sampler (the
decoding copy that sampler_of refreshes), and the loop's set-up, held-out accuracy, logging and checkpoints (setup,
evaluate, log, save). The files the trainer reads and writes (problems, checkpoints, resume, the run folder) are
trainer_io.py's.
"""

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from trainer_io import (  # the trainer's files and bad input (trainer_io.py): machinery the paper does not describe
    BadInput, Stopped, check_output_dir, check_room, checkpoint_problem, checkpoints_in, find_checkpoint, had_grpo,
    last_boxed, load_problems, load_trainer_state, one_run_at_a_time, open_reporter, print0, problem_key, rank,
    rows_to_keep, save_checkpoint, supersede, training_problems, where_it_stopped, world, write_atomically, write_row)

# ----------------------------------------------------------------------------------------------------------------
# Arguments and presets. The defaults are the paper's Qwen setting (Appendix B, Table 3).

GRADE_TIMEOUT_S = 5.0  # default hard limit of one grading call, in seconds


def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Args:
    preset: str = arg("", "a named set of defaults; flags given with it win", choices=["", "paper-llama", "qwen0.5b",
                                                                                      "tiny"])
    algo: str = arg("codistill", "codistill; grpo (one model, G samples); kdrl (small model, large frozen)",
                    choices=["codistill", "grpo", "kdrl"])
    policy: str = arg("small", "with --algo grpo: the model trained", choices=["small", "large"])
    small_model: str = arg("Qwen/Qwen2.5-Math-1.5B", "small model phi: hub id or local folder")
    large_model: str = arg("Qwen/Qwen2.5-Math-7B", "large model theta: hub id or local folder (kdrl: after GRPO)")
    dataset: str = arg("DigitalLearningGmbH/MATH-lighteval", "training problems: hub id or JSON/JSONL file")
    eval_dataset: str = arg("HuggingFaceH4/MATH-500", "held-out problems (never trained on)")
    eval_size: int = arg(500, "held-out problems scored; 0: no evaluation")
    eval_every: int = arg(20, "held-out accuracy every this many iterations (and at 0 and the end)")
    eval_temperature: float = arg(0.0, "held-out decoding: 0 greedy, > 0 one sample per problem (fixed seed)")
    template: str = arg("r1", "prompt: r1 (Table 4, + format reward) or boxed (Table 5)", choices=["r1", "boxed"])
    chat_template: bool = arg(False, "wrap the prompt in the tokenizer's chat template (Instruct models)")
    output_dir: str = arg("runs/codistill", "where metrics.jsonl and checkpoint-<iteration>/ go")
    cache_dir: str = arg(os.path.join(os.path.expanduser("~"), ".cache", "codistill_grpo"),
                         "where the tiny offline world (tiny_world.py) is built")
    tiny_seed: int = arg(0, "the tiny world's seed (its problems and base models)")
    # the paper's symbols
    batch_size: int = arg(8, "B: prompts per rank (Table 3's 64 per GPU as kept completions: 64 / G)")
    num_samples: int = arg(14, "M: completions sampled per prompt (Table 3: 14; --algo grpo: G unless given)")
    group_size: int = arg(8, "G: completions kept per prompt after downsampling, even (Table 3: 8)")
    max_completion_length: int = arg(3072, "N: max completion tokens, the constant 1/N of Eq. (5), (6), (10)")
    max_prompt_length: int = arg(1024, "max prompt tokens; longer prompts are cut from the left (Table 3)")
    hint_tokens: int = arg(0, "T: hint tokens sampled by the large model early in the run (paper: 0 or 50)")
    hint_share: float = arg(0.125, "share of the planned iterations with hints, from the start: the paper's first "
                            "epoch is 1/--epochs (Table 3: 1 of 8; set it with --epochs)")
    hint_ratio: str = arg("small", "small loss on hint tokens: small (Eq. 5), large (Eq. 8 i), ignore (Eq. 8 ii)",
                          choices=["small", "large", "ignore"])
    large_hint_ratio: str = arg("small", "large loss on its own hint tokens: small (Eq. 10), behaviour (itself)",
                                choices=["small", "behaviour"])
    alpha: float = arg(1.0, "alpha: weight of the KD term (Eq. 6; paper: 1 or 2)")
    kd_form: str = arg("reward", "KD term: reward (Eq. 6), reward_eq4 (Fig. 9), loss (Sec. 3.1), token (beyond); "
                       "ablations of Eq. 6: rank_only (ranks the M, not in A~), advantage_only (in A~, M ranked by r)",
                       choices=["reward", "reward_eq4", "loss", "token", "rank_only", "advantage_only"])
    clip_eps: float = arg(0.2, "eps: clip range of the ratio in Eq. (5), (10)")
    loss_norm: str = arg("auto", "a sequence's token sum is divided by: constant N (Eq. 5), length (Eq. 2); auto: "
                         "length for grpo", choices=["auto", "length", "constant"])
    temperature: float = arg(1.0, "tau: sampling temperature (log-probs at the same)")
    # optimisation
    lr_small: float = arg(5e-6, "learning rate of the small model (Table 3: 5e-6)")
    lr_large: float = arg(5e-6, "learning rate of the large model (Table 3: 5e-6)")
    lr_schedule: str = arg("cosine", "cosine or constant (Table 3: cosine)", choices=["cosine", "constant"])
    warmup_ratio: float = arg(0.05, "share of the iterations with linear lr warm-up (Table 3: 5%)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient-norm clip per model")
    epochs: int = arg(8, "passes over the training problems (Table 3: 8)")
    max_steps: int = arg(0, "iterations to run; 0: as many as --epochs gives")
    micro_batch_size: int = arg(8, "sequences per forward/backward (gradients accumulate; same loss)")
    gen_batch_size: int = arg(128, "sequences per generate call (changes what is sampled)")
    logprob_chunk: int = arg(1024, "tokens per chunk of the fp32 log-softmax (bounds its memory)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass")
    compile_decode: bool = arg(False, "decode with a static KV cache and a torch.compile'd step (CUDA graphs on GPU): "
                               "compiles once per batch shape; off, eager generate")
    dtype: str = arg("auto", "compute dtype (weights, optimizer: fp32): auto = bf16 on GPU, fp32 on CPU",
                     choices=["auto", "float32", "bfloat16"])
    fsdp: bool = arg(False, "under torchrun: shard both models with FSDP2 instead of DDP")
    dist_timeout: float = arg(1200.0, "torchrun: seconds to wait for the other ranks")
    seed: int = arg(0, "random seed: data order and sampling")
    save_every: int = arg(100, "checkpoint every this many iterations (and at the end); 0: only at the end")
    keep_checkpoints: int = arg(3, "keep the newest K checkpoints (the disk needs room for K + 1); 0: all")
    resume: str = arg("", "continue: alone, from --output_dir's newest checkpoint; or from PATH; auto: from the newest "
                      "checkpoint if there is one, else start (for torchrun --max-restarts)", nargs="?",
                      const="latest")
    overwrite: bool = arg(False, "start afresh in an --output_dir that holds a run (its files are deleted)")
    grade_timeout: float = arg(GRADE_TIMEOUT_S, "seconds one answer may take to grade; past it, it scores 0")
    report_to: str = arg("none", "also log to tensorboard or wandb", choices=["none", "tensorboard", "wandb"])


PRESETS = {
    "": {},
    "paper-llama": dict(  # Appendix B, Table 3 and Table 5; hints (if T > 0) in its first epoch of 2
        small_model="meta-llama/Llama-3.2-1B-Instruct", large_model="meta-llama/Llama-3.1-8B-Instruct",
        template="boxed", lr_small=1e-7, lr_large=1e-7, lr_schedule="constant", warmup_ratio=0.0,
        num_samples=12, group_size=8, epochs=2, hint_share=0.5),
    "qwen0.5b": dict(  # one GPU
        small_model="Qwen/Qwen2.5-0.5B-Instruct", large_model="Qwen/Qwen2.5-1.5B-Instruct",
        dataset="openai/gsm8k", eval_dataset="openai/gsm8k", eval_size=200, eval_every=25,
        max_completion_length=512, max_prompt_length=256, batch_size=16, num_samples=8, group_size=4,
        lr_small=1e-6, lr_large=1e-6, epochs=1, max_steps=200, gradient_checkpointing=True),
    "tiny": dict(  # offline, CPU: models and data built locally by tiny_world.py
        small_model="tiny:small", large_model="tiny:large", dataset="tiny:train", eval_dataset="tiny:test",
        template="boxed", eval_size=500, eval_every=25, batch_size=16, num_samples=8, group_size=4,
        max_completion_length=16, max_prompt_length=64, lr_small=1e-4, lr_large=3e-5, lr_schedule="constant",
        warmup_ratio=0.0, epochs=1, max_steps=100, micro_batch_size=32, gen_batch_size=256, save_every=25,
        output_dir="runs/tiny", dtype="float32", eval_temperature=1.0),
}


# ----------------------------------------------------------------------------------------------------------------
# The paper's equations, as pure functions (tensors in, tensors out)


def kd_reward(logp_large, logp_small, mask, max_len):  # Eq. (6), the KD term without alpha
    """(1/N) sum_t mask_t (log pi_theta - log pi_phi): (S, L) each -> (S,)."""
    return ((logp_large - logp_small) * mask).sum(-1) / max_len  # (S,)


def kd_reward_eq4(logp_large, logp_small, mask, max_len):  # App. C, Fig. 9: Eq. (4)'s estimator in the reward
    """-(1/N) sum_t mask_t (rho_t - log rho_t - 1), rho_t = pi_theta / pi_phi: Eq. (4) with pi_ref -> pi_theta, a
    KL estimate >= 0 per token, paid with a minus sign in place of Eq. (6)'s log-ratio. (S, L) each -> (S,)."""
    d = (logp_large - logp_small).clamp(-20.0, 20.0)  # (S, L) log rho_t, clamped as in policy_loss
    return -((d.exp() - d - 1) * mask).sum(-1) / max_len  # (S,)


def token_advantages(advantages, logp_large, logp_small, alpha):  # beyond the paper: on-policy distillation
    """Each token's advantage: its sequence's advantage plus alpha (log pi_theta - log pi_phi) at that token, the
    per-token reward of on-policy distillation (Agarwal et al., 2024; Thinking Machines, 2025). advantages (S,),
    log-probs (S, L) -> (S, L)."""
    return advantages[:, None] + alpha * (logp_large - logp_small)  # (S, L)


def downsample(rewards, G):  # Sec. 3.3
    """Per prompt, the indices of the G/2 highest and G/2 lowest rewards: (B, M) -> (B, G). M == G keeps all."""
    B, M = rewards.shape
    if G == M:
        return torch.arange(M, device=rewards.device).expand(B, M)
    order = torch.argsort(rewards, dim=1, descending=True, stable=True)  # (B, M)
    return torch.cat([order[:, :G // 2], order[:, M - G // 2:]], dim=1)  # (B, G)


def group_advantages(rewards, scale_by_std):  # Eq. (3) with scale_by_std, Eq. (7) without
    """Rewards minus their group mean, optionally divided by the group's (unbiased) std + 1e-4: (B, G) -> (B, G).
    Without the std (Eq. 7) it is Dr. GRPO's advantage (Liu et al., 2025; TRL's scale_rewards=False)."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (B, G)
    if scale_by_std:
        return centered / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return centered


def policy_loss(logp, logp_old, advantages, mask, max_len, clip_eps, logp_ref=None, beta=0.0):  # Eq. (2), (5), (10)
    """-(1/S) sum_i (1/N) sum_t mask * [min(rho A, clip(rho, 1-eps, 1+eps) A) - beta D_t], rho = exp(logp - logp_old).

    With max_len = N this is Eq. (5) and (10): every sequence's token sum divided by the same constant N (Dr. GRPO;
    TRL's loss_type="dr_grpo"). With max_len the (S,) lengths |o_i| of the sequences (their mask's sums), each sum is
    divided by its own length: Eq. (2), TRL's "grpo". D_t is Eq. (4)'s estimate of KL(pi || pi_ref) at each token,
    exp(logp_ref - logp) - (logp_ref - logp) - 1; beta = 0 (the paper's setting) leaves it out; --kd_form loss puts
    the large model in pi_ref.
    logp, logp_old, mask: (S, L); advantages: (S,), or (S, L) per token. Log-ratios are clamped to [-20, 20]
    before exp, so that a far off-policy token (Eq. 10 compares two different models) cannot overflow.
    """
    ratio = torch.exp((logp - logp_old).clamp(-20.0, 20.0))  # (S, L)
    A = advantages[:, None] if advantages.dim() == 1 else advantages  # (S, 1) or (S, L)
    objective = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)  # (S, L)
    if beta:
        d = (logp_ref - logp).clamp(-20.0, 20.0)  # (S, L)
        objective = objective - beta * (d.exp() - d - 1)  # Eq. (4)
    per_sequence = (objective * mask).sum(-1) / max_len  # (S,)  sum over tokens, divided by N (or |o_i|)
    return -per_sequence.mean()  # mean over the S sequences


def small_step_terms(logp_small_old, logp_large_old, mask, hint, hint_ratio):  # Eq. (5) and Eq. (8)
    """The small step's ratio denominator and loss mask, (S, L) each. Hint tokens (written by the large model) count
    as the small model's own (small: Eq. (5), the paper's choice), are weighted against pi_theta_old (large: Eq. (8)
    option i), or leave the loss (ignore: option ii; the model still sees them)."""
    hint = hint * mask  # (S, L)
    if hint_ratio == "large":
        return torch.where(hint.bool(), logp_large_old, logp_small_old), mask
    if hint_ratio == "ignore":
        return logp_small_old, mask * (1 - hint)
    return logp_small_old, mask


# ----------------------------------------------------------------------------------------------------------------
# Rewards (Appendix B, Tables 4 and 5): plain functions of strings, so that anyone can check them


TEMPLATES = {
    "r1": ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
           "assistant first thinks about the reasoning process in the mind and then provides the user with the "
           "answer. The reasoning process and answer are enclosed within <think></think> and <answer></answer> tags, "
           "respectively, i.e., <think> reasoning process here </think> and <answer> answer here </answer>. "
           "User: {prompt}. Assistant:"),
    "boxed": "Please reason step by step, and put your final answer within \\boxed{{}}.\nQuestion: {prompt}. Answer:",
}
FORMAT_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(completion):
    """r1 template: 0.25 for each of the four tags that appears exactly once -> float in [0, 1]."""
    return 0.25 * sum(completion.count(tag) == 1 for tag in FORMAT_TAGS)


def format_rewards(completions, template):
    """format_reward of each completion with the r1 template; 0.0 with boxed (Table 5: accuracy reward only)."""
    return [format_reward(c) if template == "r1" else 0.0 for c in completions]


def final_answer(completion, template):
    """The answer a completion gives: r1, the text inside its last <answer>...</answer>; boxed, the content of its
    last \\boxed{} (math-verify alone would take the first) -> str, or None."""
    if template == "r1":
        answers = ANSWER_TAG.findall(completion)
        return answers[-1].strip() if answers else None
    return last_boxed(completion)  # trainer_io.py (MATH's solutions carry their answer there too)


def accuracy_reward(completion, gold, template, timeout=GRADE_TIMEOUT_S):
    """1.0 when the completion's final answer equals the gold answer (math-verify), else 0.0 (see grade_batch)."""
    return grade_batch([completion], [gold], template, timeout)()[0]


# ----------------------------------------------------------------------------------------------------------------
# Rollouts (Sec. 3.1, Fig. 2)


def prompt_texts(tokenizer, problems, template, chat=False):
    """The template of Table 4 or 5 around each problem; with chat, that text is the user turn of the tokenizer's
    chat template, and the assistant turn is opened (the text then carries its own special tokens)."""
    texts = [TEMPLATES[template].format(prompt=p) for p in problems]
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    return texts


def encode_prompts(tokenizer, problems, template, max_prompt_length, device, chat=False):
    """Left-padded prompt ids and mask, (B, P); long prompts keep their last max_prompt_length tokens."""
    texts = prompt_texts(tokenizer, problems, template, chat)
    ids = [x[-max_prompt_length:] for x in tokenizer(texts, add_special_tokens=not chat)["input_ids"]]
    P = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), P), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), P), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, P - len(x):] = torch.tensor(x)
        mask[i, P - len(x):] = 1
    return input_ids.to(device), mask.to(device)  # (B, P), (B, P)


def completion_mask(completion_ids, eos_ids):
    """1 on every token up to and including the first EOS, 0 after it; all 1 when there is no EOS (truncated).
    Built from positions: the tokens after the first EOS are masked whatever they are, so pad == EOS is fine."""
    S, L = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # (S, L)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], L, dtype=torch.long))
    positions = torch.arange(L, device=completion_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long()  # (S, L)


def decoding(max_new_tokens, temperature, eos_ids, pad_id, compiled=False, max_cache_len=None):
    """generate()'s settings: ancestral sampling at the temperature, top_k=0 and top_p=1 (transformers would apply
    top-k 50 and change what is sampled, not the log-probs we train on), or greedy at temperature 0. compiled
    (--compile_decode): a static KV cache of max_cache_len tokens, so that every decoding step has one shape, and
    that step compiled by torch.compile, which generate() does itself (CUDA graphs on a GPU)."""
    from transformers import CompileConfig, GenerationConfig
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    static = {}
    if compiled:
        on_gpu = torch.cuda.is_available()
        compile_config = CompileConfig(dynamic=False, mode="reduce-overhead" if on_gpu else "default")
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        static = dict(cache_implementation="static", max_cache_len=max_cache_len, compile_config=compile_config)
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True,
                            **sampling, **static)


def sample(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_ids, pad_id, batch_size, compiled=False,
           max_cache_len=None):
    """Completions sampled with HF generate (KV cache, ancestral sampling: decoding()) -> (S, L <= N). model: a
    model's sampler (sampler_of), whose weights, and so its KV cache, are in the compute dtype."""
    was_training = model.training
    model.eval()
    config = decoding(max_new_tokens, temperature, eos_ids, pad_id, compiled, max_cache_len)
    P, outs = prompt_ids.shape[1], []
    with torch.inference_mode():
        for i in range(0, len(prompt_ids), batch_size):
            out = model.generate(input_ids=prompt_ids[i:i + batch_size], attention_mask=prompt_mask[i:i + batch_size],
                                 generation_config=config)
            outs.append(out[:, P:])
    model.train(was_training)
    return pad_right(outs, pad_id)  # made outside inference mode: a normal tensor, which autograd may save


def rollout(small, large, prompt_ids, prompt_mask, args, eos_ids, pad_id, hints):
    """M completions per prompt from the small model; with hints, the large model writes their first T tokens.
    -> the rollouts: a dict of (B*M, .) tensors: prompt_ids and prompt_mask (each prompt repeated M times), comp
    (completion ids, L <= N), mask (its completion mask) and hint (1 on the tokens the large model wrote)."""
    M, N, T = args.num_samples, args.max_completion_length, args.hint_tokens
    how = dict(compiled=args.compile_decode, max_cache_len=args.max_prompt_length + N)  # (a prompt, its completion)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(M, 0), prompt_mask.repeat_interleave(M, 0)  # (B*M, P)
    rollouts = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    if not hints:
        comp = sample(small, prompt_ids, prompt_mask, N, args.temperature, eos_ids, pad_id, args.gen_batch_size, **how)
        return dict(rollouts, comp=comp, mask=completion_mask(comp, eos_ids), hint=torch.zeros_like(comp))
    hint = sample(large, prompt_ids, prompt_mask, T, args.temperature, eos_ids, pad_id, args.gen_batch_size,
                  **how)  # (B*M, <=T)
    hint_len = completion_mask(hint, eos_ids).sum(1).tolist()  # a hint that ends in EOS is a whole completion
    # the small model continues prompt + hint: re-pad on the left, since hints differ in length
    rows = [torch.cat([p[m.bool()], h[:n]]) for p, m, h, n in zip(prompt_ids, prompt_mask, hint, hint_len)]
    P = max(len(r) for r in rows)
    ctx = torch.stack([F.pad(r, (P - len(r), 0), value=pad_id) for r in rows])  # (B*M, P')
    ctx_mask = torch.stack([F.pad(torch.ones_like(r), (P - len(r), 0)) for r in rows])
    cont = sample(small, ctx, ctx_mask, N - T, args.temperature, eos_ids, pad_id, args.gen_batch_size,
                  **how)  # (B*M, <=N-T)
    comp = pad_right([torch.cat([h[:n], c]) for h, n, c in zip(hint, hint_len, cont)], pad_id)  # (B*M, L <= N)
    positions = torch.arange(comp.shape[1], device=comp.device)[None]  # (1, L)
    hint_mask = (positions < torch.tensor(hint_len, device=comp.device)[:, None]).long()  # (B*M, L)
    return dict(rollouts, comp=comp, mask=completion_mask(comp, eos_ids), hint=hint_mask)


def take(rollouts, rows):
    """The rollouts of the given rows (a (S,) index tensor): each tensor of the dict indexed along its first axis."""
    return {k: v[rows] for k, v in rollouts.items()}


def decode(tokenizer, completion_ids, mask):
    """Texts of the completions, each up to its mask's length (so up to and including its first EOS)."""
    return [tokenizer.decode(c[:n], skip_special_tokens=True) for c, n in zip(completion_ids, mask.sum(1).tolist())]


def pad_right(seqs, pad_id):
    """List of (s_i, L_i) or 1-D tensors -> one (sum s_i, max L_i) tensor padded on the right."""
    seqs = [s if s.dim() == 2 else s[None] for s in seqs]
    L = max(s.shape[1] for s in seqs)
    return torch.cat([F.pad(s, (0, L - s.shape[1]), value=pad_id) for s in seqs])


# ----------------------------------------------------------------------------------------------------------------
# Token log-probs: the decoder in the compute dtype, then the output head and the log-softmax in fp32 at the sampling
# temperature (a bf16 logit of 20 is off by up to 0.06, an error the ratios and the KD term would carry), in chunks
# of tokens so that a (S, L, vocab) fp32 tensor never exists; with grad, each chunk's logits are recomputed in the
# backward pass instead of stored.


def _chunk_logprobs(lm_head, hidden, targets, temperature):
    with torch.autocast(hidden.device.type, enabled=False):  # the head in fp32, whatever the compute dtype
        bias = None if lm_head.bias is None else lm_head.bias.float()
        logits = F.linear(hidden.float(), lm_head.weight.float(), bias)  # (C, V)
        logp = (logits / temperature).log_softmax(-1)  # (C, V)
        with torch.no_grad():  # entropy of the sampling distribution, a metric: sum_v p log p without a (C, V) product
            entropy = -torch.linalg.vecdot(logp.exp(), logp)  # (C,)
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy  # (C,), (C,)


def token_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, chunk,
                   entropy=False):
    """log pi(o_t | q, o_<t) of every completion token -> (S, L), fp32. Grad flows when grad mode is on.
    entropy: also return the entropy of pi(. | q, o_<t) at every position (S, L), no grad -> (logp, entropy)."""
    P = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # (S, P+L)
    attn = torch.cat([prompt_mask, completion_mask], 1)  # (S, P+L)
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)  # as generate() does for left padding
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                                 use_cache=False).last_hidden_state  # (S, P+L, H)
    hidden = hidden[:, P - 1:-1]  # (S, L, H): the states that predict the completion tokens
    S, L, H = hidden.shape
    h, targets = hidden.reshape(S * L, H), completion_ids.reshape(S * L)  # (S*L, H), (S*L,)
    lm_head, out = model.get_output_embeddings(), []
    for i in range(0, S * L, chunk):
        chunk_args = (lm_head, h[i:i + chunk], targets[i:i + chunk], temperature)
        if torch.is_grad_enabled():
            out.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *chunk_args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*chunk_args))
    logp = torch.cat([o[0] for o in out]).view(S, L)  # (S, L)
    return (logp, torch.cat([o[1] for o in out]).view(S, L)) if entropy else logp


def autocast_to(dtype, device):
    """Forward passes in the compute dtype (--dtype) under autocast; the weights, their gradients and the AdamW
    states stay fp32, so that a step of lr 5e-6 is not rounded away (it is below half a bf16 ulp of most weights)."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


class TokenLogprobs(torch.nn.Module):
    """token_logprobs() as the forward of a module: the module DDP and FSDP2 wrap, so that their hooks see each
    forward and backward (token_logprobs calls the decoder and the head apart, to chunk the head). dtype: the compute
    dtype of its forward passes."""

    def __init__(self, lm, dtype=torch.float32):
        super().__init__()
        self.lm, self.dtype = lm, dtype

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, chunk):
        """-> log-probs (S, L) and entropies (S, L, no grad)."""
        with autocast_to(self.dtype, prompt_ids.device):
            logp, entropy = token_logprobs(self.lm, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                           temperature, chunk, entropy=True)
        return logp.clone(), entropy  # .clone(): FSDP2 hooks the backward on the output, which must not be a view


@torch.no_grad()
def old_logprobs(module, rollouts, args):
    """Step 3: the old policy's log-probs of the rollouts, in micro-batches, no grad; module: a model's TokenLogprobs
    (maybe wrapped, see parallelize) -> log-probs (S, L), and the mean entropy per completion token (a float)."""
    was_training = module.training
    module.eval()
    mb, mask = args.micro_batch_size, rollouts["mask"]
    out = [module(*model_inputs(rollouts, slice(i, i + mb)), args.temperature, args.logprob_chunk)
           for i in range(0, len(mask), mb)]
    module.train(was_training)
    entropy = torch.cat([o[1] for o in out])  # (S, L)
    return torch.cat([o[0] for o in out]), ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()


def model_inputs(rollouts, rows):
    """What a TokenLogprobs module reads of the rollouts' rows: prompt ids and mask, completion ids and mask."""
    return (rollouts["prompt_ids"][rows], rollouts["prompt_mask"][rows], rollouts["comp"][rows], rollouts["mask"][rows])


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step on one model


def update(module, opt, sched, rollouts, logp_old, advantages, args, *, own, loss_mask, norm, logp_ref=None, beta=0.0):
    """One clipped policy-gradient step, Eq. (5), (10) or (2), on this rank's S rollouts -> metrics. Each micro-batch's
    loss is weighted by its share of S, so the accumulated gradient is that of the mean over the S sequences (DDP and
    FSDP2 average it over the ranks, which hold equal S: the mean over the global batch).
    logp_old (S, L): the ratio's denominator, except on the tokens of own (S, L, bool), whose pi_old is the model
    itself before this step (on-policy: GRPO on every token, one step per batch; --large_hint_ratio behaviour on the
    hint tokens the large model wrote). advantages: (S,), or (S, L) per token. loss_mask (S, L): the tokens in the
    loss (the model sees every token of the rollouts' mask). norm: each sequence's token sum is divided by the
    constant N ("constant", Eq. 5, 10) or by its own length ("length", Eq. 2). logp_ref, beta: Eq. (2)'s KL term
    (--kd_form loss)."""
    module.train()
    mask, S = rollouts["mask"], len(rollouts["mask"])
    stats = StepStats()
    for i in range(0, S, args.micro_batch_size):
        j = slice(i, i + args.micro_batch_size)
        with gradients_sync_after(module, last=i + args.micro_batch_size >= S):  # DDP: averaged once, at the end
            logp, entropy = module(*model_inputs(rollouts, j), args.temperature, args.logprob_chunk)  # (mb, L) each
            old = torch.where(own[j], logp.detach(), logp_old[j])  # (mb, L)
            divisor = args.max_completion_length if norm == "constant" else loss_mask[j].sum(-1).clamp(min=1)
            ref = None if logp_ref is None else logp_ref[j]  # (mb, L)
            loss = policy_loss(logp, old, advantages[j], loss_mask[j], divisor, args.clip_eps, ref, beta)
            loss = loss * (len(logp) / S)
            loss.backward()
        stats.add(loss, logp, old, advantages[j], loss_mask[j], mask[j], entropy, args.clip_eps)
    return {**stats.summary(), **optimizer_step(module, opt, sched, args)}


def loss_norm(args):
    """What each sequence's token sum is divided by: "constant" N (Eq. 5, 10: Dr. GRPO) or "length", its own (Eq. 2).
    --loss_norm auto: length for --algo grpo (the paper's GRPO baseline), constant otherwise."""
    return args.loss_norm if args.loss_norm != "auto" else "length" if args.algo == "grpo" else "constant"


def make_optimizer(model, lr, args, total_steps):
    """AdamW and its schedule over the run's planned length, total_steps (Table 3): linear warm-up, then constant or
    cosine to 0 at the planned end (a resumed run that goes on past it keeps the schedule's last value). On a GPU the
    fused step, which allocates no temporaries the size of the weights (torch's default there, the foreach step,
    peaks at 4 bytes per parameter more: bench.py); on CPU torch's default (the for-loop step), so that the tiny
    world's numbers stay what they were."""
    fused = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=fused or None)
    warmup = int(args.warmup_ratio * total_steps)

    def lr_lambda(step):
        step = min(step, total_steps)
        if step < warmup:
            return (step + 1) / warmup
        if args.lr_schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


# ----------------------------------------------------------------------------------------------------------------
# One iteration (Sec. 3, Fig. 2), its variants, and the loop


class KDForm(NamedTuple):
    """How the large model's log-probs reach the small step (--kd_form)."""
    term: Callable  # the sequence-level KD term of r~ = r + alpha * term
    ranks: bool  # r~ ranks the M rollouts (Sec. 3.3); otherwise r does
    in_reward: bool  # A~ centres r~ (Eq. 6, 7); otherwise A~ centres r
    in_loss: bool  # the small loss holds Eq. (2)'s KL term towards pi_theta_old, beta = alpha
    per_token: bool  # each token's advantage adds alpha (log pi_theta_old - log pi_phi_old) at that token


KD_FORMS = {
    "reward": KDForm(kd_reward, ranks=True, in_reward=True, in_loss=False, per_token=False),  # Eq. (6): the paper's
    "reward_eq4": KDForm(kd_reward_eq4, ranks=True, in_reward=True, in_loss=False, per_token=False),  # App. C, Fig. 9
    "loss": KDForm(kd_reward, ranks=True, in_reward=False, in_loss=True, per_token=False),  # Sec. 3.1, which it rejects
    "token": KDForm(kd_reward, ranks=True, in_reward=False, in_loss=False, per_token=True),  # beyond: on-policy KD
    # Eq. (6)'s two uses one at a time (ablations): only in the ranking of the M, or only in A~
    "rank_only": KDForm(kd_reward, ranks=True, in_reward=False, in_loss=False, per_token=False),
    "advantage_only": KDForm(kd_reward, ranks=False, in_reward=True, in_loss=False, per_token=False),
}


@dataclass
class Step:
    """What one model's update was given, and its metrics."""
    advantages: torch.Tensor  # (B*G,), or (B*G, L) per token
    logp_old: torch.Tensor  # (B*G, L): the ratio's denominators, where own is False
    own: torch.Tensor  # (B*G, L) bool: tokens whose pi_old is the model itself before the step
    loss_mask: torch.Tensor  # (B*G, L): the tokens in the loss
    norm: str  # each sequence's token sum divided by the constant N ("constant") or its length ("length")
    beta: float  # Eq. (2)'s KL weight (--kd_form loss), towards the large model's old log-probs
    metrics: dict


@dataclass
class Iteration:
    """What one iteration computed, in the order it computed it: B prompts, M rollouts each, G of them kept."""
    hints: bool  # whether the large model wrote the first T tokens
    rollouts: dict  # (B*M, .) tensors: prompt_ids, prompt_mask, comp (ids, L <= N), mask, hint
    texts: list  # (B*M,) completions, up to their first EOS
    accuracy: torch.Tensor  # (B*M,) accuracy reward
    format: torch.Tensor  # (B*M,) format reward (r1 template; 0 with boxed)
    r: torch.Tensor  # (B*M,) r = accuracy + format
    logp_old: dict  # model -> (B*M, L) log pi_old, no grad (step 3; none for grpo, whose pi_old is itself)
    entropy: dict  # model -> mean entropy per completion token of pi_old
    kd: torch.Tensor  # (B*M,) the KD term (grpo: zeros)
    r_kd: torch.Tensor  # (B*M,) r~ = r + alpha * kd, which downsampling ranks unless the KD form says not (grpo: r)
    kept: torch.Tensor  # (B*G,) indices into the B*M of the rollouts kept
    A_kd: torch.Tensor  # (B*G,) A~ before any per-token term: r~ centred (Eq. 7), or r when the KD form keeps the KD
    #                     term out of it (loss, token, rank_only); grpo: A
    A: torch.Tensor  # (B*G,) A, Eq. (3)
    steps: dict  # model -> Step
    times: dict  # phase -> seconds


def codistill_iteration(run, batch, prompts, hints):
    """One iteration of CoDistill-GRPO (Sec. 3, Fig. 2) on this rank's B problems and their (B, P) prompts -> what it
    computed (Iteration). --algo kdrl is the same iteration with the large model frozen: no step 7."""
    args, small, large, form = run.args, run.models["small"], run.models["large"], KD_FORMS[run.args.kd_form]
    B, M, G, N, alpha = args.batch_size, args.num_samples, args.group_size, args.max_completion_length, args.alpha
    times = {}
    # 1. Rollouts (Sec. 3.1): M per prompt from the small model, (B*M, .) each; early on the large model writes T
    with timer(times, "generate"):
        rollouts = rollout(sampler_of(small), sampler_of(large) if hints else None, *prompts, args, run.eos_ids,
                           run.pad_id, hints)
    # 2. Rewards r (App. B): accuracy, + format for r1; graded in a worker process while step 3 runs
    with timer(times, "reward"):
        texts, grading = grade_rollouts(run, rollouts, batch)
    # 3. Old log-probs, no grad: log pi_phi_old and log pi_theta_old of every completion token
    with timer(times, "score"):
        logp_small, entropy_small = old_logprobs(small.module, rollouts, args)  # (B*M, L)
        logp_large, entropy_large = old_logprobs(large.module, rollouts, args)  # (B*M, L)
    with timer(times, "reward"):
        accuracy, fmt = grading()  # (B*M,) each
    r = accuracy + fmt  # (B*M,)
    # 4. KD reward r~ (Eq. 6) and downsampling (Sec. 3.3): per prompt the G/2 highest and G/2 lowest r~ of the M
    kd = form.term(logp_large, logp_small, rollouts["mask"], N)  # (B*M,)
    r_kd = r + alpha * kd  # (B*M,)
    kept = kept_rows(downsample((r_kd if form.ranks else r).view(B, M), G), M)  # (B*G,)
    kept_rollouts = take(rollouts, kept)  # (B*G, .) each
    # 5. Advantages over the kept G: A~ = r~ - mean(r~) (Eq. 7); A = (r - mean r) / (std r + 1e-4) (Eq. 3)
    A_kd = group_advantages((r_kd if form.in_reward else r)[kept].view(B, G), scale_by_std=False).view(-1)  # (B*G,)
    A = group_advantages(r[kept].view(B, G), scale_by_std=True).view(-1)  # (B*G,)
    A_small = token_advantages(A_kd, logp_large[kept], logp_small[kept], alpha) if form.per_token else A_kd
    # 6. Small step, Eq. (5): ratio pi_phi / pi_phi_old with A~; hint tokens as --hint_ratio says (Eq. 8)
    old, loss_mask = small_step_terms(logp_small[kept], logp_large[kept], kept_rollouts["mask"],
                                      kept_rollouts["hint"], args.hint_ratio)  # (B*G, L) each
    steps = {"small": take_step(run, small, kept_rollouts, A_small, old, times, loss_mask=loss_mask,
                                logp_ref=logp_large[kept], beta=alpha if form.in_loss else 0.0)}
    # 7. Large step, Eq. (10): ratio pi_theta / pi_phi_old with A (on the hints it wrote: --large_hint_ratio)
    if large.trained:
        own = kept_rollouts["hint"].bool() & (args.large_hint_ratio == "behaviour")  # (B*G, L)
        steps["large"] = take_step(run, large, kept_rollouts, A, logp_small[kept], times, own=own)
    return Iteration(hints=hints, rollouts=rollouts, texts=texts, accuracy=accuracy, format=fmt, r=r,
                     logp_old=dict(small=logp_small, large=logp_large),
                     entropy=dict(small=entropy_small, large=entropy_large), kd=kd, r_kd=r_kd, kept=kept, A_kd=A_kd,
                     A=A, steps=steps, times=times)


def grpo_iteration(run, batch, prompts, hints):
    """The paper's GRPO baseline (Sec. 4; Eq. 2, 3) -> Iteration: one model (--policy) samples G rollouts per prompt
    (M > G: downsampled by r, a control) and steps on r alone. One step per batch, so pi_old is the model as it is:
    its ratio is against itself, and no scoring pass is needed."""
    args, policy = run.args, run.models[run.args.policy]
    B, M, G = args.batch_size, args.num_samples, args.group_size
    times = {}
    # 1. Rollouts: M per prompt from the policy, (B*M, .) each
    with timer(times, "generate"):
        rollouts = rollout(sampler_of(policy), None, *prompts, args, run.eos_ids, run.pad_id, False)
    # 2. Rewards r
    with timer(times, "reward"):
        texts, grading = grade_rollouts(run, rollouts, batch)
        accuracy, fmt = grading()  # (B*M,) each
    r = accuracy + fmt  # (B*M,)
    # 4. Downsampling by r (M > G), 5. advantages, Eq. (3)
    kept = kept_rows(downsample(r.view(B, M), G), M)  # (B*G,)
    kept_rollouts = take(rollouts, kept)  # (B*G, .) each
    A = group_advantages(r[kept].view(B, G), scale_by_std=True).view(-1)  # (B*G,)
    # 6. The step, Eq. (2): the ratio against the policy itself on every token
    mask = kept_rollouts["mask"]
    steps = {args.policy: take_step(run, policy, kept_rollouts, A, torch.zeros_like(mask, dtype=torch.float), times,
                                    own=torch.ones_like(mask, dtype=torch.bool))}
    return Iteration(hints=False, rollouts=rollouts, texts=texts, accuracy=accuracy, format=fmt, r=r, logp_old={},
                     entropy={}, kd=torch.zeros_like(r), r_kd=r, kept=kept, A_kd=A, A=A, steps=steps, times=times)


ITERATIONS = {"codistill": codistill_iteration, "kdrl": codistill_iteration, "grpo": grpo_iteration}  # --algo


def grade_rollouts(run, rollouts, batch):
    """Start grading the rollouts (each prompt's M completions against its problem's answer) in the worker process
    -> (their texts, wait()), where wait() returns the accuracy and format rewards, (B*M,) each."""
    args, M = run.args, run.args.num_samples
    texts = decode(run.tokenizer, rollouts["comp"], rollouts["mask"])
    pending = grade_batch(texts, [row["answer"] for row in batch for _ in range(M)], args.template, args.grade_timeout)

    def rewards():
        return (torch.tensor(pending(), device=run.device),
                torch.tensor(format_rewards(texts, args.template), device=run.device))
    return texts, rewards


def kept_rows(kept, M):
    """Downsampling's (B, G) indices into each prompt's M rollouts -> (B*G,) indices into all B*M."""
    B = kept.shape[0]
    return (kept + M * torch.arange(B, device=kept.device)[:, None]).view(-1)


def take_step(run, model, rollouts, advantages, logp_old, times, own=None, loss_mask=None, logp_ref=None, beta=0.0):
    """update() of one model on its optimizer, timed into times['update_<name>'] -> a Step: what it was given. own
    (tokens whose pi_old is the model itself) is no token unless given; loss_mask every token of the rollouts' mask
    unless given; logp_ref is read only when beta > 0 (--kd_form loss)."""
    own = torch.zeros_like(rollouts["mask"], dtype=torch.bool) if own is None else own
    loss_mask = rollouts["mask"] if loss_mask is None else loss_mask
    norm = loss_norm(run.args)
    with timer(times, f"update_{model.name}"):
        metrics = update(model.module, model.optimizer, model.scheduler, rollouts, logp_old, advantages, run.args,
                         own=own, loss_mask=loss_mask, norm=norm, logp_ref=logp_ref, beta=beta)
    model.stale = model.sampler is not model.lm  # its sampler is refreshed before it next generates
    return Step(advantages, logp_old, own, loss_mask, norm, beta, metrics)


def iteration(run, it):
    """Iteration it (1-based) on this rank's B problems -> (epoch, the problems, what the iteration computed)."""
    epoch, batch, prompts = next_batch(run, it)  # this rank's B problems, their prompts: (B, P) ids and mask
    hints = run.args.hint_tokens > 0 and it <= run.hint_iterations  # the first --hint_share of the planned run
    return epoch, batch, ITERATIONS[run.args.algo](run, batch, prompts, hints)


def sampler_of(model):
    """The model that generate() runs for one of the run's models (rollouts, hints, held-out accuracy): a copy of its
    weights in the compute dtype, as an RL framework's inference engine holds one, so that decoding and its KV cache
    are in that dtype throughout (autocast over fp32 weights would leave the keys in fp32: RoPE promotes them). It is
    refreshed here from the master weights when they have stepped since (under FSDP2 gathered from the shards: every
    rank calls this at the same point). In one fp32 process the sampler is the model itself."""
    if model.stale:
        masters = dict(model.lm.named_parameters())
        with torch.no_grad():
            for name, w in model.sampler.named_parameters():
                w.copy_(masters[name].full_tensor() if hasattr(masters[name], "full_tensor") else masters[name])
        model.stale = False
    return model.sampler


def train(args):
    """The loop: set-up, then per batch of prompts one iteration, held-out accuracy when due, the iteration's row of
    metrics.jsonl, and a checkpoint when due -> the run, its models trained."""
    run = setup(args)  # checks, data, models, optimizers, a checkpoint's state, output files (below the banner)
    if run.start == 1:  # row 0: the starting models' held-out accuracy
        log(run, 0, dict(iteration=0, **run.prompts_cut, **evaluate(run, run.needs)))
    for it in iterations(run):
        t0 = time.perf_counter()
        epoch, batch, done = iteration(run, it)
        metrics = iteration_metrics(run, it, epoch, batch, done, t0)  # (timed before held-out accuracy)
        if evaluation_due(run, it):
            metrics.update(evaluate(run, run.trained))
        log(run, it, metrics, rollout_table(run, batch, done))
        if checkpoint_due(run, it):
            save(run, it)
    return run


# ==================================== below: machinery the paper does not describe ====================================


# ----------------------------------------------------------------------------------------------------------------
# The step's bookkeeping: statistics, DDP's gradient sync, the optimizer step with its guards


def clip_fractions(ratio, advantages, mask, clip_eps):
    """Fractions of the masked tokens whose gradient the clip removes, as TRL reports them: low, rho < 1-eps with
    A < 0; high, rho > 1+eps with A > 0; region, either. ratio, mask: (S, L); advantages (S,) or (S, L) -> 3 floats."""
    A = advantages[:, None] if advantages.dim() == 1 else advantages  # (S, 1) or (S, L)
    low = (ratio < 1 - clip_eps) & (A < 0)  # (S, L)
    high = (ratio > 1 + clip_eps) & (A > 0)  # (S, L)
    n = mask.sum().clamp(min=1)
    return [((x * mask).sum() / n).item() for x in (low, high, low | high)]


class StepStats:
    """The metrics of one update(), summed over its micro-batches: loss, ratio mean and max, TRL's clip fractions
    (per token in the loss) and the entropy (per token the model saw)."""

    def __init__(self):
        self.sums = dict(loss=0.0, ratio_sum=0.0, ratio_max=0.0, low=0.0, high=0.0, region=0.0, entropy=0.0,
                         tokens=0.0, seen=0.0)

    @torch.no_grad()
    def add(self, loss, logp, old, advantages, in_loss, seen, entropy, clip_eps):
        s, n = self.sums, in_loss.sum().item()
        ratio = torch.exp((logp - old).clamp(-20.0, 20.0))  # (mb, L)
        s["loss"] += loss.item()
        s["ratio_sum"] += (ratio * in_loss).sum().item()
        s["ratio_max"] = max(s["ratio_max"], ratio[in_loss.bool()].max().item() if n else 0.0)
        for k, f in zip(["low", "high", "region"], clip_fractions(ratio, advantages, in_loss, clip_eps)):
            s[k] += f * n
        s["entropy"] += (entropy * seen).sum().item()
        s["tokens"] += n
        s["seen"] += seen.sum().item()

    def summary(self):
        s, n = self.sums, max(self.sums["tokens"], 1.0)
        return {"loss": s["loss"], "ratio_mean": s["ratio_sum"] / n, "ratio_max": s["ratio_max"],
                "clip_ratio/low_mean": s["low"] / n, "clip_ratio/high_mean": s["high"] / n,
                "clip_ratio/region_mean": s["region"] / n, "entropy": s["entropy"] / max(s["seen"], 1.0)}


def gradients_sync_after(module, last):
    """DDP averages the gradients across ranks once per step: in no_sync() for every micro-batch but the last."""
    return module.no_sync() if hasattr(module, "no_sync") and not last else nullcontext()


def optimizer_step(module, opt, sched, args):
    """Clip the gradient norm, step (unless it is not finite: NaN/inf gradients leave the weights as they were),
    advance the schedule, zero the gradients -> grad_norm, lr (of this step), skipped_step."""
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), args.max_grad_norm)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP2: DTensor
    lr = sched.get_last_lr()[0]
    skipped = not math.isfinite(grad_norm)
    if skipped:
        tqdm.write(f"warning: non-finite gradient norm ({grad_norm}); this model's step is skipped", file=sys.stderr)
    else:
        opt.step()
    with warnings.catch_warnings():  # the schedule advances on a skipped step too (a skipped first step makes torch
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)  # warn of the order)
        sched.step()
    opt.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "lr": lr, "skipped_step": float(skipped)}


@contextmanager
def timer(times, phase):
    """Adds the seconds spent inside the block to times[phase]."""
    t = time.perf_counter()
    yield
    times[phase] = times.get(phase, 0.0) + time.perf_counter() - t


# ----------------------------------------------------------------------------------------------------------------
# Grading: a worker process, killed past its time limit


def grade_batch(completions, golds, template, timeout=GRADE_TIMEOUT_S):
    """Start grading in the worker process and return at once -> wait(), which returns the scores (1.0 or 0.0 each):
    the trainer scores log-probs meanwhile. Never raises, never hangs: an answer not graded within `timeout` seconds
    of waiting for it scores 0.0 and the worker is killed (math-verify's own SIGALRM cannot stop a hang inside C
    code, e.g. \\\\boxed{9^{9^{9^{9}}}}); a worker that died (a kill, the OOM killer) is treated the same. A fresh
    worker grades the rest; each such answer is counted in GRADER['timeouts']."""
    jobs = [(c, g, template, max(1, int(timeout))) for c, g in zip(completions, golds)]
    send_to_grader(jobs)

    def wait():
        scores = []
        while len(scores) < len(jobs):
            grader = grading_worker()
            try:
                if grader["conn"].poll(timeout):
                    scores.append(grader["conn"].recv())
                    continue
            except (EOFError, OSError):  # the worker died: its pipe is closed
                pass
            stop_grader()
            grader["timeouts"] += 1
            scores.append(0.0)
            if len(scores) < len(jobs):
                send_to_grader(jobs[len(scores):])
        return scores
    return wait


def send_to_grader(jobs):
    """One message to the grading worker (it takes the batch at once); one that died since is replaced first."""
    try:
        grading_worker()["conn"].send(jobs)
    except OSError:  # BrokenPipeError: the worker is gone
        stop_grader()
        grading_worker()["conn"].send(jobs)


def grade(completion, gold, template, soft_timeout=int(GRADE_TIMEOUT_S)):
    """The grader itself, run in the worker, where math-verify's own SIGALRM limits are a first, soft line. The final
    answer is wrapped in $...$ when it has no delimiters and parsed as LaTeX only: math-verify's plain-expression
    parser would hand model text to sympy's parse_expr, which calls eval."""
    from math_verify import LatexExtractionConfig, parse, verify
    answer = final_answer(completion, template)
    if answer is None:
        return 0.0
    if "$" not in answer and "\\boxed" not in answer:
        answer = f"${answer}$"
    latex = [LatexExtractionConfig()]
    try:
        gold_parsed = parse(f"${gold}$", extraction_config=latex, parsing_timeout=soft_timeout)
        pred_parsed = parse(answer, extraction_config=latex, parsing_timeout=soft_timeout)
        return float(verify(gold_parsed, pred_parsed, timeout_seconds=soft_timeout))
    except Exception:  # math-verify raises on pathological input; a wrong answer is the right score for it
        return 0.0


GRADER = {"timeouts": 0}  # the grading worker process, started on first use; "timeouts" counts kills


def grading_worker():
    if "process" not in GRADER:
        import multiprocessing as mp
        import math_verify  # noqa: F401  (imported before forking, so a restarted worker is ready at once)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        GRADER["conn"], child = ctx.Pipe()
        GRADER["process"] = ctx.Process(target=grading_loop, args=(child, GRADER["conn"], os.getpid()), daemon=True)
        GRADER["process"].start()
        child.close()
    return GRADER


def stop_grader():
    GRADER["process"].kill()
    GRADER.pop("process").join()


def grading_loop(conn, parent_end, parent_pid):
    parent_end.close()  # a forked worker inherits the trainer's end too; holding it would hide the trainer's death
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are the trainer's to report
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        while os.getppid() == parent_pid:  # a killed trainer (even SIGKILL) takes its grader with it
            if conn.poll(1.0):
                for job in conn.recv():  # a batch; each score is sent as soon as it is known
                    conn.send(grade(*job))
    except (EOFError, OSError):  # the trainer is gone: nothing to report to
        return


def digit_accuracy(completion, gold, template):
    """Partial credit, a metric for integer answers (the tiny world's): the share of the gold answer's digits that the
    final answer has in the same place, from the units digit; 0.0 with no answer; None when the gold is no integer."""
    if not re.fullmatch(r"-?\d+", gold.strip()):
        return None
    digits, answer = gold.strip().lstrip("-"), (final_answer(completion, template) or "").strip().lstrip("-")
    return sum(len(answer) >= i and answer[-i] == digits[-i] for i in range(1, len(digits) + 1)) / len(digits)


# ----------------------------------------------------------------------------------------------------------------
# Models and tokenizers


def load_tokenizer(name):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise BadInput(f"model {name}: its tokenizer cannot be loaded ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if len(tok) == 0 or tok.eos_token is None or not tok("1 + 1")["input_ids"]:  # e.g. no tokenizer.json there
        raise BadInput(f"model {name}: its tokenizer is empty or has no EOS token (is tokenizer.json missing?)")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_same_tokens(tok_small, tok_large, small_name, large_name):
    """The KD reward compares the two models token by token: both must map every token to the same id."""
    vs, vl = tok_small.get_vocab(), tok_large.get_vocab()
    if vs != vl:
        diff = sorted(set(vs.items()) ^ set(vl.items()), key=str)[:3]
        raise BadInput(f"--small_model {small_name} and --large_model {large_name} tokenize differently "
                       f"({len(vs)} vs {len(vl)} tokens; e.g. {diff}): the KD reward needs one vocabulary")


def load_model(name, dtype, device, gradient_checkpointing):
    """A causal LM with our own generation config: a hub model's (repetition_penalty, top_k) would change what is
    sampled without changing the log-probs we train on. Checkpoints get the model's own back (save_checkpoint)."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as e:  # a folder without weights, a damaged file, an unknown hub id: the user's input
        raise BadInput(f"model {name}: cannot be loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise BadInput(f"model {name}: some of its weights are NaN or infinite (a damaged file, or a diverged run)")
    model = model.to(device)
    model.own_generation_config = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id)
    if gradient_checkpointing:  # active only in train mode: generation (eval mode) keeps its KV cache
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(dict(use_reentrant=False))
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    return model


def compute_dtype(name, device_type):
    """--dtype's torch dtype: auto is bf16 on GPU, fp32 on CPU."""
    return {"auto": torch.bfloat16 if device_type == "cuda" else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16}[name]


def new_sampler(lm, dtype, fsdp):
    """A model's sampler (sampler_of): in one fp32 process the model itself; otherwise a model of its config in the
    compute dtype on its device, built the way from_pretrained(dtype=...) builds one (eval.py loads a checkpoint so,
    and decodes alike), its weights copied from the masters before its first use (stale)."""
    if dtype == torch.float32 and not fsdp:
        return lm
    from transformers import AutoModelForCausalLM
    with torch.device(next(lm.parameters()).device):
        sampler = AutoModelForCausalLM.from_config(lm.config, dtype=dtype)
    sampler.generation_config = lm.generation_config  # ours (load_model)
    return sampler.requires_grad_(False).eval()


def eos_ids_of(tokenizer, *models, chat=False):
    """Every token that ends a completion: the tokenizer's EOS, each model's generation EOS ids, and with chat the
    chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id} | ({end_of_turn_id(tokenizer)} if chat else set())
    for m in models:
        e = m.generation_config.eos_token_id
        ids.update(e if isinstance(e, list) else [e])
    return sorted(i for i in ids if i is not None)


def end_of_turn_id(tokenizer):
    """The special token a chat template puts right after an assistant message (Qwen's <|im_end|>, Llama 3's
    <|eot_id|>), found by rendering one; BadInput when the tokenizer has no chat template or no such token."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(f"--chat_template: the tokenizer of {tokenizer.name_or_path} has no chat template")
    mark = "MARKER-7f3a"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}],
                                         tokenize=False)
    after = tokenizer(text[text.rindex(mark) + len(mark):], add_special_tokens=False)["input_ids"]
    if not after or after[0] not in set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values()):
        raise BadInput(f"--chat_template: the chat template of {tokenizer.name_or_path} ends an assistant turn with "
                       f"no special token ({text[-40:]!r})")
    return after[0]


# ----------------------------------------------------------------------------------------------------------------
# Held-out accuracy (Figure 3)


@torch.inference_mode()
def complete(model, tokenizer, problems, template, max_new_tokens, max_prompt_length, eos_ids, batch_size,
             temperature=0.0, chat=False, compiled=False):
    """Completion texts (up to the first EOS) for a list of problems: greedy when temperature == 0, else sampled at
    that temperature with top_k=0, top_p=1 (decoding()). Shared by the trainer's held-out accuracy and eval.py."""
    was_training = model.training
    model.eval()
    config = decoding(max_new_tokens, temperature, eos_ids, tokenizer.pad_token_id, compiled,
                      max_prompt_length + max_new_tokens)
    device, texts = next(model.parameters()).device, []
    for i in tqdm(range(0, len(problems), batch_size), desc="generating", leave=False,
                  disable=None if len(problems) > batch_size else True):
        ids, mask = encode_prompts(tokenizer, problems[i:i + batch_size], template, max_prompt_length, device, chat)
        comp = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
        texts += decode(tokenizer, comp, completion_mask(comp, eos_ids))
    model.train(was_training)
    return texts


def heldout_accuracy(model, tokenizer, rows, args, eos_ids):
    """Accuracy on held-out problems (Figure 3): greedy, or with --eval_temperature one sample per problem ->
    {'test_accuracy'} and, for integer answers, 'test_digit_accuracy'. The problems are cut into chunks of
    --gen_batch_size, chunk c sampled from seed 1234 + c, and under torchrun rank r decodes chunks r, r + W, ...: every
    evaluation draws the same random numbers, and any number of processes decodes the same completions."""
    R, W, size = rank(), world(), args.gen_batch_size
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    texts, golds = [], []
    for c in range(R, len(chunks), W):
        torch.manual_seed(1234 + c)
        texts += complete(model, tokenizer, [r["problem"] for r in chunks[c]], args.template,
                          args.max_completion_length, args.max_prompt_length, eos_ids, size, args.eval_temperature,
                          chat=args.chat_template, compiled=args.compile_decode)
        golds += [r["answer"] for r in chunks[c]]
    scores = grade_batch(texts, golds, args.template, args.grade_timeout)() if texts else []
    digits = [d for d in (digit_accuracy(t, g, args.template) for t, g in zip(texts, golds)) if d is not None]
    correct, parts, counted = all_reduce([float(sum(scores)), float(sum(digits)), float(len(digits))])
    return dict(test_accuracy=correct / len(rows), **(dict(test_digit_accuracy=parts / counted) if counted else {}))


# ----------------------------------------------------------------------------------------------------------------
# Distributed (torchrun): one process per device, B prompts each. Without torchrun's variables, one process and
# every helper below is a no-op (as are rank(), world() and print0() of trainer_io.py).


def setup_distributed(timeout_s=Args.dist_timeout):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when RANK is set -> this rank's device. Ranks started
    without torchrun (a cluster's launcher) say whom they wait for; the wait ends after timeout_s, or at Ctrl-C."""
    from datetime import timedelta
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and not dist.is_initialized():
        who = (f"rank {os.environ['RANK']} of {os.environ.get('WORLD_SIZE', '?')} at "
               f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}")
        if "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun has already gathered its ranks
            print(f"{who}: waiting for the other ranks (up to {timeout_s:g} s: --dist_timeout)", file=sys.stderr,
                  flush=True)
        # the wait is in C++: Ctrl-C and torchrun's SIGTERM end it at once
        handlers = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
        t = time.time()
        try:
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                    **this_attempts_store(timedelta(seconds=timeout_s)))
        except Exception as e:  # the store's timeout and connection errors have several types across versions
            waited = time.time() - t
            why = (f"did not form within {timeout_s:g} s (--dist_timeout)" if waited >= timeout_s else
                   f"could not form after {waited:.0f} s ({type(e).__name__}: {fault_message(e)})")
            raise BadInput(f"{who}: the process group {why}: are all ranks started with the same MASTER_ADDR, "
                           "MASTER_PORT and WORLD_SIZE, and is the port free?") from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        die_with_the_launcher()
    if not cuda:
        return torch.device("cpu")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", torch.cuda.current_device())


def this_attempts_store(timeout):
    """init_process_group's store for this attempt of a one-node torchrun run, as keyword arguments ({} elsewhere).
    torchrun keeps one store across its restarts and torch's env:// reads it without a prefix per attempt: a restarted
    rank found the dead attempt's gloo addresses (nccl's ids) there and the group failed to form ('Connection
    refused') on every restart. One prefix per attempt; the ranks of one node share their attempt's number. On
    several nodes the numbers can differ between nodes, so there torchrun's own way out is named instead."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    if os.environ.get("GROUP_WORLD_SIZE") != "1":
        if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0" and os.environ.get("RANK") == "0":
            print("note: torchrun's restarts on several nodes reuse one store, and a restarted group can read the last "
                  "attempt's addresses and fail to form: launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                  file=sys.stderr, flush=True)
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dict(store=dist.PrefixStore(f"attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store),
                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def die_with_the_launcher():
    """Under torchrun, ask Linux to send this rank SIGTERM when its launcher dies (even by SIGKILL), so that ranks never
    train on as orphans; elsewhere (no prctl) a no-op."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the launcher died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def check_ranks_agree(args):
    """Under torchrun, every rank must run the same settings (rank 0 records its own; the others would train their
    share with theirs, silently): BadInput naming each flag the ranks disagree on, before any work. --cache_dir may
    differ (a machine's own disk)."""
    if not dist.is_initialized() or world() == 1:
        return
    mine = {k: v for k, v in dataclasses.asdict(args).items() if k != "cache_dir"}
    everyone = [None] * world()
    dist.all_gather_object(everyone, mine)
    differ = [k for k in mine if len({json.dumps(r.get(k)) for r in everyone}) > 1]
    if differ:
        values = lambda k: ", ".join(f"rank {i}: {r.get(k)!r}" for i, r in enumerate(everyone))
        raise BadInput("the ranks were started with different flags: " + "; ".join(f"--{k} ({values(k)})"
                                                                                    for k in differ))


DIST_FAULTS = ("gloo", "nccl", "NCCL", "Connection reset", "Connection closed", "Connection refused", "Timed out",
               "timed out", "Broken pipe", "ProcessGroup", "DistBackendError", "socket")


def fault_message(e):
    """An error's first line without the C++ source location torch puts in front of it."""
    return re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", (str(e).splitlines() or [""])[0]).strip()[:200]


def parallelize(model, args, trained, compute_dtype):
    """A model's TokenLogprobs module. One process: as is. torchrun: DDP-wrapped when trained (a frozen model is
    replicated); with --fsdp, sharded by FSDP2: each decoder layer a unit, the root unit holding the embeddings,
    final norm and head (tied embeddings stay in one unit). FSDP2 gathers the fp32 weights and the forward autocasts
    to compute_dtype, as in one process and under DDP, so that every path computes alike (gathering bf16 weights,
    param_dtype=bf16, would halve the traffic but make the residual stream and norms bf16); gradients are reduced in
    fp32. generate() never runs the sharded model: it runs the model's sampler."""
    module, device = TokenLogprobs(model, compute_dtype), next(model.parameters()).device
    if not dist.is_initialized() or not (trained or args.fsdp):
        return module
    if not args.fsdp:
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    if not hasattr(model.get_decoder(), "layers"):
        raise BadInput(f"--fsdp: {type(model).__name__} has no decoder .layers to shard")
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def all_reduce(values, op=dist.ReduceOp.SUM):
    """A list of floats reduced across ranks; as is in one process."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def reduce_metrics(metrics):
    """Metrics of the global batch. Ranks hold equal shares, so means are averaged across ranks (per-token means per
    rank, not per token); maxima and times (the slowest rank) are maxed; throughputs and counts are summed. A metric
    some ranks lack (digits right, when a rank's answers hold no integer) is averaged over the ranks that have it:
    every rank reduces the same keys, in the same order."""
    if not dist.is_initialized():
        return metrics
    everyone = [None] * world()
    dist.all_gather_object(everyone, sorted(k for k, v in metrics.items() if isinstance(v, float)))
    floats = sorted(set().union(*everyone))
    maxed = [k for k in floats if k.endswith("_max") or k.startswith("time/")]
    summed = [k for k in floats if k in ("tokens_per_s", "grade_timeouts", "test_grade_timeouts")]
    means = [k for k in floats if k not in maxed + summed]
    out = dict(metrics)
    out.update(zip(maxed, all_reduce([metrics.get(k, -math.inf) for k in maxed], dist.ReduceOp.MAX)))
    out.update(zip(summed, all_reduce([metrics.get(k, 0.0) for k in summed])))
    totals = all_reduce([metrics.get(k, 0.0) for k in means] + [float(k in metrics) for k in means])
    out.update({k: total / count for k, total, count in zip(means, totals, totals[len(means):])})
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run's state and its set-up: train() calls setup(), iterations(); iteration() calls next_batch()


@dataclass
class Model:
    """One model of the run, as the loop uses it."""
    name: str  # small | large
    prefix: str  # its name in metrics.jsonl and in checkpoints: small, large, or policy (--algo grpo)
    lm: torch.nn.Module  # the Hugging Face model, fp32 master weights (under FSDP2, their shards)
    module: torch.nn.Module  # its TokenLogprobs, which scores and steps (DDP-wrapped, or sharded by FSDP2)
    trained: bool  # kdrl's large model is frozen
    sampler: torch.nn.Module  # what generate() runs: its weights in the compute dtype (sampler_of), or lm itself
    stale: bool = False  # the sampler holds the weights before the last step (sampler_of refreshes it)
    optimizer: torch.optim.Optimizer = None  # AdamW, for a trained model
    scheduler: torch.optim.lr_scheduler.LRScheduler = None


@dataclass
class Run:
    """Everything the loop needs, built by setup() in this order."""
    args: Args
    device: torch.device  # this rank's
    fsdp: bool  # both models sharded by FSDP2 (--fsdp under torchrun)
    train_rows: list  # training problems, {'problem', 'answer'} each (held-out ones left out)
    eval_rows: list  # the --eval_size held-out problems
    data_hash: str  # of train_rows: a resumed run must go on with the same problems
    tokenizer: object
    prompts_cut: dict  # prompts_cut/train, prompts_cut/held_out: how many prompts are cut to --max_prompt_length
    total_steps: int  # the run's last iteration
    planned_steps: int  # the length that the lr schedule and the hint window are planned over (the first run's)
    hint_iterations: int  # hints (T > 0) in iterations 1..hint_iterations
    start: int  # the first iteration to run (1, or the one after a checkpoint's)
    dtype: torch.dtype  # the compute dtype (weights and AdamW states stay fp32)
    models: dict  # 'small' and/or 'large' -> Model, as --algo needs them
    eos_ids: list  # every token that ends a completion
    pad_id: int
    metrics_file: object  # rank 0: metrics.jsonl and rollouts.jsonl, open for appending (other ranks: None)
    rollouts_file: object
    report: Callable  # also to tensorboard or wandb (--report_to)
    grade_timeouts: int  # answers the grader was killed on so far (GRADER['timeouts'] when last counted)
    bar: object = None  # the progress bar over iterations

    @property
    def needs(self):  # the models loaded
        return list(self.models)

    @property
    def trained(self):  # the models that step
        return [n for n, m in self.models.items() if m.trained]


ROLES = {  # --algo -> (models loaded, models trained)
    "codistill": (["small", "large"], ["small", "large"]),
    "kdrl": (["small", "large"], ["small"]),  # the large model, frozen, gives log-probs only
    "grpo": (None, None),  # one model: --policy
}


def setup(args):
    """Everything train() needs before its first iteration -> Run: the arguments checked, the data, the plan, the
    models and their log-prob modules (wrapped for DDP / FSDP2) and optimizers, a checkpoint's state, the output
    files. Every input is checked before any model is loaded, and nothing is deleted before the models have loaded."""
    import transformers
    transformers.utils.logging.disable_progress_bar()  # per-shard bars would drown ours
    check_args(args)
    device = setup_distributed(args.dist_timeout)  # torchrun: one process per device; otherwise one process
    check_ranks_agree(args)
    fsdp = args.fsdp and dist.is_initialized()
    if args.fsdp and not fsdp:
        print("note: --fsdp takes effect under torchrun; one process trains unsharded")
    if any(getattr(args, f).startswith("tiny:") for f in tiny_fields(args)):
        import tiny_world  # the tiny offline world (--preset tiny), built on first use
        tiny_world.resolve(args, TEMPLATES, tiny_fields(args))
    needs, trained = ROLES[args.algo] if args.algo != "grpo" else ([args.policy], [args.policy])
    prefix = {n: ("policy" if args.algo == "grpo" else n) for n in needs}  # metric and checkpoint names
    state = load_trainer_state(args.resume, [prefix[n] for n in trained]) if args.resume else None
    if state:
        keep_the_global_batch(args, state)  # a resume with another number of processes
    train_rows, eval_rows = load_data(args)
    total_steps, planned_steps, data_hash = plan(args, train_rows, state)
    names = {"small": args.small_model, "large": args.large_model}
    if state:  # the trained models continue from the checkpoint; a frozen one comes from where it came from
        names.update({n: os.path.join(args.resume, prefix[n]) for n in trained})
    tokenizer = load_tokenizers(args, names, needs)
    cut = {"prompts_cut/train": float(prompts_cut(tokenizer, train_rows, args)),
           "prompts_cut/held_out": float(prompts_cut(tokenizer, eval_rows, args))}
    kept_rows = rows_to_keep(args, state["iteration"]) if state else None
    if args.algo == "kdrl" and not had_grpo(args.large_model):
        print0(f"note: --algo kdrl freezes {args.large_model} as it is. The paper's KDRL (Sec. 4) freezes a large "
               "model that first had GRPO: run --algo grpo --policy large, then --large_model RUN/checkpoint-K/policy")
    old_run = check_output_dir(args, resuming=state is not None)  # every rank checks (and fails alike)
    torch.manual_seed(args.seed)
    dtype = compute_dtype(args.dtype, device.type)  # weights and AdamW states stay fp32
    models = load_models(args, names, needs, trained, prefix, device, dtype, fsdp, planned_steps, state)
    for path in old_run if rank() == 0 else []:  # --overwrite: only now, with every input loaded; one rank deletes
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    check_room(args, sum(p.numel() for m in models.values() if m.trained for p in m.lm.parameters()))
    if dist.is_initialized():
        dist.barrier()
    start = state["iteration"] + 1 if state else 1
    metrics_file, rollouts_file, report = open_outputs(args, state, kept_rows, start)
    run = Run(args, device, fsdp, train_rows, eval_rows, data_hash, tokenizer, cut, total_steps, planned_steps,
              int(args.hint_share * planned_steps), start, dtype, models,
              eos_ids_of(tokenizer, *(m.lm for m in models.values()), chat=args.chat_template),
              tokenizer.pad_token_id, metrics_file, rollouts_file, report, GRADER["timeouts"])
    announce(run)
    return run


def load_tokenizers(args, names, needs):
    """The models' tokenizer, checked before any model is loaded: both models tokenize alike, and with
    --chat_template the tokenizer has one."""
    tokenizer = load_tokenizer(names[needs[0]])
    if len(needs) == 2:
        check_same_tokens(tokenizer, load_tokenizer(names["large"]), names["small"], names["large"])
    if args.chat_template:
        end_of_turn_id(tokenizer)
    return tokenizer


def load_models(args, names, needs, trained, prefix, device, dtype, fsdp, planned_steps, state):
    """Each model as the run holds it (Model): fp32 master weights, its log-prob module (wrapped for DDP / FSDP2), its
    sampler, and for a trained one AdamW and its schedule, a checkpoint's states restored (BadInput when they do not
    fit: before the caller deletes anything)."""
    models = {}
    for n in needs:
        lm = load_model(names[n], torch.float32, device, args.gradient_checkpointing)
        module = parallelize(lm, args, n in trained, dtype)
        sampler = new_sampler(lm, dtype, fsdp)
        models[n] = m = Model(n, prefix[n], lm, module, n in trained, sampler, stale=sampler is not lm)
        if m.trained:
            m.optimizer, m.scheduler = make_optimizer(module, args.lr_small if n == "small" else args.lr_large, args,
                                                      planned_steps)
            if state:
                restore_optimizer(m, state, args, fsdp)
    return models


def announce(run):
    """What the run is about to do, in a line or two (rank 0)."""
    args, planned_steps, total_steps, start = run.args, run.planned_steps, run.total_steps, run.start
    if args.hint_tokens:  # the paper's first epoch only when --hint_share is 1/--epochs and --max_steps is unset
        print0(f"hints (T = {args.hint_tokens}) in iterations 1..{run.hint_iterations}: --hint_share "
               f"{args.hint_share:g} of the {planned_steps} planned; an epoch is "
               f"{len(run.train_rows) // (args.batch_size * world())} iteration(s)")
    if start > total_steps:  # a finished run resumed as it was
        print0(f"nothing to do: {args.output_dir} has its {total_steps} iterations (a larger --max_steps goes on)")
    else:
        print0(f"algo {args.algo}: training {', '.join(run.trained)} for iterations {start}..{total_steps} "
               f"({len(run.train_rows)} problems, {world()} rank(s) x B={args.batch_size}, M={args.num_samples}, "
               f"G={args.group_size}{', FSDP2' if run.fsdp else ''}) -> {args.output_dir}")


def tiny_fields(args):
    """The flags that may name the tiny world (--eval_dataset only when held-out accuracy is scored)."""
    return ["small_model", "large_model", "dataset"] + ["eval_dataset"] * (args.eval_size > 0)


def load_data(args):
    """The training and held-out problems, each row checked (BadInput) -> (train_rows, eval_rows). Held-out problems
    are never trained on: any of --dataset's rows that is also in --eval_dataset is left out."""
    train_rows = training_problems(args.dataset)
    eval_rows = load_problems(args.eval_dataset, "test") if args.eval_size else []
    held_out = {problem_key(r["problem"]) for r in eval_rows}  # found by content, whatever the whitespace
    if held_out and any(problem_key(r["problem"]) in held_out for r in train_rows):
        kept = [r for r in train_rows if problem_key(r["problem"]) not in held_out]
        print0(f"note: {len(train_rows) - len(kept)} problems of --dataset are also in --eval_dataset and are left "
               "out of training (held-out problems are never trained on)")
        train_rows = kept
    if len(train_rows) < args.batch_size * world():
        raise BadInput(f"--dataset {args.dataset}: {len(train_rows)} problems, fewer than one global batch "
                       f"(--batch_size {args.batch_size} x {world()} ranks)")
    return train_rows, eval_rows[:args.eval_size]


def keep_the_global_batch(args, state):
    """A run resumed with another number of processes goes on with its global batch (processes x B prompts), and so
    with the same problems in the same order: B per rank becomes the global batch over the processes now (recorded
    in args.json and resumes.jsonl), or BadInput when they do not divide it."""
    before = state.get("processes", world())  # (checkpoints before this was recorded: as now)
    global_batch = state.get("global_batch") or before * saved_args(args.resume)["batch_size"]
    if global_batch == args.batch_size * world():
        return
    if global_batch % world():
        raise BadInput(f"--resume {args.resume}: the run's global batch is {global_batch} prompts ({before} processes x "
                       f"B={global_batch // before}), which {world()} processes cannot share equally: resume with a "
                       "number of processes that divides it")
    print0(f"note: the run had {before} process(es), it goes on with {world()}: B = {global_batch // world()} prompts "
           f"per process (was {global_batch // before}), the same global batch of {global_batch} and the same data "
           "order")
    args.batch_size = global_batch // world()


def plan(args, train_rows, state):
    """-> (total_steps, planned_steps, data_hash): the run's last iteration, the length its lr schedule and hint
    window are planned over, and the training data's hash; a resume is checked against what its checkpoint planned."""
    total_steps = args.max_steps or args.epochs * (len(train_rows) // (args.batch_size * world()))
    # The lr schedule and the hint window are planned over the run's first length; a resume with another
    # --max_steps changes where the run stops, not the plan (so the lr never jumps)
    planned_steps = state.get("planned_steps") or total_steps if state else total_steps
    data_hash = hashlib.sha1(json.dumps(train_rows).encode()).hexdigest()
    if state and state.get("data", data_hash) != data_hash:  # a resumed run goes on with the same problems
        raise BadInput(f"--resume {args.resume}: --dataset {args.dataset} is not what the run trained on (it has "
                       f"changed since: {len(train_rows)} problems now); start a new run from its models")
    if state and total_steps < state["iteration"]:
        raise BadInput(f"--max_steps {total_steps} is below iteration {state['iteration']}, where {args.resume} "
                       "stopped")
    if total_steps > planned_steps and args.lr_schedule == "cosine":
        raise BadInput(f"--max_steps {total_steps}: this run's cosine schedule was planned for {planned_steps} "
                       f"iterations and its learning rate is 0 past them; to train on, start a new run from the "
                       f"models in {args.resume}")
    return total_steps, planned_steps, data_hash


def restore_optimizer(model, state, args, fsdp):
    """A checkpoint's whole optimizer and scheduler state into a model's (under FSDP2: this rank's shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model.module, model.optimizer, state["optimizers"][model.prefix],
                             options=StateDictOptions(full_state_dict=fsdp))
    model.scheduler.load_state_dict(state["schedulers"][model.prefix])
    opt = model.optimizer
    if any(opt.state.get(p, {}).get("exp_avg", p).shape != p.shape for g in opt.param_groups for p in g["params"]):
        raise BadInput(f"--resume {args.resume}: the {model.prefix} model's optimizer state does not fit it")


def prompts_cut(tokenizer, rows, args):
    """How many of the rows' prompts are longer than --max_prompt_length (cut from the left, they lose the template's
    start), with a warning; BadInput when the length cannot hold the template itself."""
    template = len(tokenizer(prompt_texts(tokenizer, [""], args.template, args.chat_template)[0],
                             add_special_tokens=not args.chat_template)["input_ids"])
    if args.max_prompt_length <= template:
        raise BadInput(f"--max_prompt_length {args.max_prompt_length} cannot hold the {args.template} template itself "
                       f"({template} tokens) and a problem")
    texts = prompt_texts(tokenizer, [r["problem"] for r in rows], args.template, args.chat_template)
    ids = tokenizer(texts, add_special_tokens=not args.chat_template)["input_ids"] if rows else []
    cut = sum(len(x) > args.max_prompt_length for x in ids)
    if cut:
        print0(f"warning: {cut} of {len(rows)} prompts are longer than --max_prompt_length {args.max_prompt_length} "
               "tokens: they are cut from the left, losing the start of the template and of the problem")
    return cut


def open_outputs(args, state, kept_rows, start):
    """args.json, metrics.jsonl and rollouts.jsonl (rank 0 writes the run's files) -> (metrics file, rollouts file,
    reporter). A resumed run keeps the rows up to its checkpoint (the later ones it writes again, identically), copied
    over when it forks into another folder; resumes.jsonl records each resume: from where, and which flags changed. A
    file that cannot be written: Stopped."""
    if rank() != 0:
        return None, None, lambda m, step: None
    paths = {name: os.path.join(args.output_dir, f"{name}.jsonl") for name in ["metrics", "rollouts", "resumes"]}
    saved = saved_args(args.resume) if state else {}  # read (and checked) before anything is written
    try:
        if state and os.path.samefile(args.output_dir, os.path.dirname(os.path.abspath(args.resume))):
            supersede(args.output_dir, state["iteration"])  # checkpoints newer than the one resumed from move aside
            write_atomically(os.path.join(args.output_dir, "latest"), os.path.basename(os.path.normpath(args.resume)))
        write_atomically(os.path.join(args.output_dir, "args.json"),
                         json.dumps(dict(dataclasses.asdict(args), processes=world()), indent=1))
        for name, rows in (kept_rows or {}).items():
            write_atomically(paths[name], "".join(json.dumps(r) + "\n" for r in rows))
        if state:
            changed = {k: [saved.get(k), v] for k, v in dataclasses.asdict(args).items() if k != "resume" and
                       saved.get(k) != v}
            with open(paths["resumes"], "a") as f:
                f.write(json.dumps(dict(iteration=start - 1, checkpoint=args.resume, changed=changed,
                                        processes=[state.get("processes"), world()],
                                        time=time.strftime("%Y-%m-%d %H:%M:%S"))) + "\n")
        metrics_file, rollouts_file = (open(paths[name], "a") for name in ["metrics", "rollouts"])
    except OSError as e:
        raise Stopped(f"cannot write {e.filename} in --output_dir ({e.strerror})") from None
    return metrics_file, rollouts_file, open_reporter(args)


def batch_indices(n_rows, batch_size, seed, iteration, rank=0, world=1):
    """This rank's rows of an iteration (1-based): each epoch is a permutation seeded by (seed, epoch), cut into
    global batches of world x batch_size rows; rank r takes the r-th share. A pure function of the iteration, so that
    a resumed run sees the same batches. -> (epoch, list of row indices)"""
    global_batch = batch_size * world
    epoch, step = divmod(iteration - 1, n_rows // global_batch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = step * global_batch + rank * batch_size
    return epoch, order[start:start + batch_size].tolist()


def next_batch(run, it):
    """This rank's problems of iteration it -> (epoch, rows, their prompts as (B, P) ids and mask). Sampling is seeded
    by (seed, iteration, rank): a run resumed with the same number of processes samples what the straight run would
    have."""
    args = run.args
    epoch, rows = batch_indices(len(run.train_rows), args.batch_size, args.seed, it, rank(), world())
    torch.manual_seed(hash((args.seed, it, rank())) % 2**63)  # (the hash of a tuple of ints is not randomised)
    batch = [run.train_rows[i] for i in rows]
    prompts = encode_prompts(run.tokenizer, [r["problem"] for r in batch], args.template, args.max_prompt_length,
                             run.device, args.chat_template)  # (B, P) each
    return epoch, batch, prompts


def iterations(run):
    """The iterations still to run, with a progress bar (rank 0, in a terminal)."""
    run.bar = tqdm(range(run.start, run.total_steps + 1), desc=run.args.algo, dynamic_ncols=True,
                   initial=run.start - 1, total=run.total_steps, disable=None if rank() == 0 else True)
    yield from run.bar


# ----------------------------------------------------------------------------------------------------------------
# The loop's output: an iteration's metrics, held-out accuracy, the row written, a checkpoint


def iteration_metrics(run, it, epoch, batch, done, t0):
    """The iteration's metrics: of its rollouts (under the name of the model that wrote them), of each model's step
    (under its name), and its timings: the step's time (from t0), its phases, tokens/s, the grader's kills, memory."""
    args = run.args
    metrics = dict(iteration=it, epoch=epoch, **{f"{run.models[n].prefix}/entropy": e for n, e in done.entropy.items()})
    metrics.update(rollout_metrics(run, batch, done))
    for n, step in done.steps.items():  # the scoring pass's entropy (all M rollouts) before the step's (the kept)
        p = run.models[n].prefix
        metrics.update({f"{p}/{k}": v for k, v in step.metrics.items() if f"{p}/{k}" not in metrics})
    metrics.update({f"time/{k}": done.times.get(k, 0.0) for k in PHASES}, **{"time/step": time.perf_counter() - t0})
    tokens = metrics[f"{run.models[run.trained[0]].prefix}/completion_length"] * args.batch_size * args.num_samples
    metrics["tokens_per_s"] = tokens / max(metrics["time/generate"], 1e-9)  # sampled this iteration, on this rank
    metrics["grade_timeouts"], run.grade_timeouts = float(GRADER["timeouts"] - run.grade_timeouts), GRADER["timeouts"]
    warn_timeouts(metrics["grade_timeouts"], args.batch_size * args.num_samples, f"iteration {it}'s answers", args)
    if run.device.type == "cuda":  # the peak since the run began, on this rank (the slowest rank's under torchrun)
        metrics["memory/allocated_gb_max"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics


PHASES = ["generate", "reward", "score", "update_small", "update_large"]  # time/<phase> in metrics.jsonl


def evaluation_due(run, it):
    """Held-out accuracy (when --eval_size > 0) and rollouts.jsonl's rows are due at iteration 0 (the starting
    models), every --eval_every iterations, and at the end."""
    args = run.args
    return it == 0 or bool(args.eval_every and it % args.eval_every == 0) or it == run.total_steps


def evaluate(run, names):
    """Held-out accuracy of the named models -> their metrics (under their names), with the held-out answers the
    grader was killed on. Every rank calls it: the reductions are collective."""
    metrics = {}
    if not run.eval_rows:
        return metrics
    for n in names:
        accuracy = heldout_accuracy(sampler_of(run.models[n]), run.tokenizer, run.eval_rows, run.args, run.eos_ids)
        metrics.update({f"{run.models[n].prefix}/{k}": v for k, v in accuracy.items()})
    metrics["test_grade_timeouts"] = float(GRADER["timeouts"] - run.grade_timeouts)  # held-out answers scored 0
    warn_timeouts(metrics["test_grade_timeouts"], len(run.eval_rows) * len(names), "held-out answers", run.args)
    run.grade_timeouts = GRADER["timeouts"]
    return metrics


def log(run, it, metrics, table=None):
    """An iteration's row of metrics.jsonl, reduced over the ranks (rank 0 writes it), rollouts.jsonl at iteration 1
    and with each held-out evaluation (table: a function giving its rows), the progress bar, one line per evaluation.
    Every rank calls it: the reductions are collective."""
    metrics = reduce_metrics(metrics)
    if rank() == 0:
        write_row(run.metrics_file, metrics)
        for row in table() if table is not None and (evaluation_due(run, it) or it == 1) else []:
            write_row(run.rollouts_file, dict(iteration=it, **row))
        run.report(metrics, it)
    p = run.models[run.trained[0]].prefix
    if it > 0:
        run.bar.set_postfix({k.split("/")[-1][:8]: f"{v:.3f}" for k, v in metrics.items() if k in (
            f"{p}/accuracy", f"{p}/zero_accuracy_frac", f"{p}/test_accuracy", "time/step")})
    if rank() == 0 and any(k.endswith("test_accuracy") for k in metrics):
        tqdm.write(f"iteration {it}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                  if k.endswith("test_accuracy")))


def checkpoint_due(run, it):
    return (run.args.save_every and it % run.args.save_every == 0) or it == run.total_steps


def save(run, it):
    """checkpoint-<it>/ (trainer_io.save_checkpoint): the trained models, their optimizers, the plan."""
    trained = [run.models[n] for n in run.trained]
    save_checkpoint({m.prefix: m.module for m in trained}, {m.prefix: (m.optimizer, m.scheduler) for m in trained},
                    run.tokenizer, run.args, it, dict(planned_steps=run.planned_steps, data=run.data_hash,
                                                      processes=world(), global_batch=run.args.batch_size * world()))


def warn_timeouts(timeouts, answers, what, args):
    """A warning when most answers scored 0 because grading timed out: their rewards say nothing."""
    if timeouts > answers / 2:
        tqdm.write(f"warning: {timeouts:.0f} of {answers} {what} were not graded within --grade_timeout "
                   f"{args.grade_timeout:g} s and scored 0: is the limit too small?", file=sys.stderr)


def rollout_metrics(run, batch, done):
    """Metrics of one iteration's rollouts, under the name of the model that wrote them (small, or grpo's policy)."""
    args, acc, r, kept, mask, comp = run.args, done.accuracy, done.r, done.kept, done.rollouts["mask"], \
        done.rollouts["comp"]
    B, M, p = len(batch), args.num_samples, "policy" if args.algo == "grpo" else "small"
    digit_accuracies = [digit_accuracy(t, batch[i // M]["answer"], args.template) for i, t in enumerate(done.texts)]
    lengths = mask.sum(1).float()  # (B*M,)
    ended = torch.isin(comp, torch.tensor(run.eos_ids, device=comp.device)).any(1)  # (B*M,)
    metrics = {f"{p}/accuracy": acc.mean().item(),
               f"{p}/zero_accuracy_frac": (acc.view(B, M).sum(1) == 0).float().mean().item(),  # Figures 1 and 4
               f"{p}/reward": r.mean().item(),
               f"{p}/completion_length": lengths.mean().item(),
               f"{p}/truncated_frac": 1.0 - ended.float().mean().item(),  # stopped at N tokens without EOS
               f"{p}/empty_frac": (ended & (lengths <= 1)).float().mean().item(),  # EOS first: an empty answer
               f"{p}/equal_reward_groups_frac": (r[kept].view(B, -1).std(1) == 0).float().mean().item()}  # A = 0
    if args.template == "r1":
        metrics[f"{p}/format_reward"] = done.format.mean().item()
    digits = [d for d in digit_accuracies if d is not None]
    if digits:  # partial credit, next to the whole answer's: integer answers only
        metrics[f"{p}/digit_accuracy"] = sum(digits) / len(digits)
    if done.logp_old:  # the KD term over all M, and log pi_theta - log pi_phi per kept token
        metrics["small/kd_reward"] = done.kd.mean().item()
        diff = (done.logp_old["large"] - done.logp_old["small"])[kept]  # (B*G, L)
        metrics["small/kd_log_ratio"] = (diff * mask[kept]).sum().item() / max(mask[kept].sum().item(), 1)
        metrics["large/accuracy"] = acc[kept].mean().item()  # the rollouts the large model learns from
    if done.hints:
        metrics["small/hint_length"] = done.rollouts["hint"].sum(1).float().mean().item()
    return metrics


def rollout_table(run, batch, done, prompts=2):
    """One iteration in numbers -> a function giving the rows of rollouts.jsonl: for the first prompts of the batch,
    each of its M completions with r, the KD term, r~, kept or not, A~ (before any per-token term) and A (None where
    they do not apply), and its tokens with log pi_theta_old - log pi_phi_old at each (kd_tokens: what --kd_form token
    adds to A~, times alpha)."""
    def rows():
        args, M, with_kd = run.args, run.args.num_samples, bool(done.logp_old)
        where = {i: j for j, i in enumerate(done.kept.tolist())}  # rollout -> its row among the kept
        diff = done.logp_old["large"] - done.logp_old["small"] if with_kd else None  # (B*M, L)
        out = []
        for b, problem in enumerate(batch[:prompts]):
            completions = []
            for i in range(b * M, (b + 1) * M):
                j, n = where.get(i), int(done.rollouts["mask"][i].sum())
                completions.append(dict(
                    text=done.texts[i], r=done.r[i].item(), kd=done.kd[i].item() if with_kd else None,
                    r_kd=done.r_kd[i].item(), kept=j is not None,
                    A_kd=None if j is None or not with_kd else done.A_kd[j].item(),
                    A=None if j is None else done.A[j].item(),
                    tokens=[run.tokenizer.decode(t) for t in done.rollouts["comp"][i, :n].tolist()],
                    kd_tokens=[round(x, 4) for x in diff[i, :n].tolist()] if with_kd else None))
            out.append(dict(problem=problem["problem"], answer=problem["answer"], alpha=args.alpha,
                            kd_form=args.kd_form, completions=completions))
        return out
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    """Args from the command line: dataclass defaults < preset < (with --resume) the run's saved args < flags given.
    --algo grpo samples G unless --num_samples is given (Sec. 4: GRPO generates and updates with G rollouts)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Args):
        kw = dict(help=f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%"), default=argparse.SUPPRESS)
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            extra = {k: f.metadata[k] for k in ["choices", "nargs", "const"] if k in f.metadata}
            p.add_argument(f"--{f.name}", type=f.type, **extra, **kw)
    given = vars(p.parse_args(argv))
    base = PRESETS[given.get("preset", "")]
    output_dir = given.get("output_dir", base.get("output_dir", Args.output_dir))
    restart = given.get("resume") == "auto"  # a restarted torchrun worker runs its first command line again
    if restart:  # from the newest checkpoint, if there is one; else from the start
        if os.path.isdir(output_dir) and any(not checkpoint_problem(c) for c in checkpoints_in(output_dir)):
            given["resume"] = "latest"
        else:
            del given["resume"]
    if given.get("resume"):
        ckpt = find_checkpoint(output_dir if given["resume"] == "latest" else given["resume"])
        base = saved_args(ckpt)
        global_batch = base["batch_size"] * read_json_object(os.path.join(ckpt, "args.json")).get("processes", 1)
        changed = [f"--{k} {base[k]!r} -> {v!r}" for k, v in given.items() if k not in RESUMABLE and base.get(k) != v
                   and not str(v).startswith("tiny:")  # (a tiny: name is resolved again, to the same world)
                   and not (k == "batch_size" and v * int(os.environ.get("WORLD_SIZE", 1)) == global_batch)]
        if changed:  # args.json, and eval.py's grouping of runs, must describe the whole run
            raise BadInput(f"--resume {ckpt}: a resumed run keeps the settings that define it; these differ from "
                           f"its args.json: {', '.join(changed)} (start a new run to change them)")
        base.update(output_dir=os.path.dirname(os.path.abspath(ckpt)), resume=ckpt)
        given.pop("resume")
    elif {**base, **given}.get("algo") == "grpo" and "num_samples" not in given:
        given["num_samples"] = given.get("group_size", base.get("group_size", Args.group_size))
    args = Args(**{**base, **given})
    if restart and not args.resume:
        args.overwrite = restarting_the_same_run(args)
    return args


def restarting_the_same_run(args):
    """--resume auto with no checkpoint yet: whether --output_dir holds nothing, or only this run's own first attempt
    (its args.json as ours), which a restart may replace; BadInput when it holds another run."""
    path = os.path.join(args.output_dir, "args.json")
    if not os.path.exists(path):
        return False
    saved = checked_args(read_json_object(path), path, complete=False)
    ours = dataclasses.asdict(args)
    differ = [k for k in saved if k not in RESUMABLE and saved[k] != ours[k] and not str(ours[k]).startswith("tiny:")]
    if differ:
        raise BadInput(f"--resume auto: --output_dir {args.output_dir} holds another run (its {', '.join(differ[:3])} "
                       "differ) and no checkpoint of it: choose another folder")
    return True


# What a resumed run may change: how long it runs, how often it evaluates and saves, how it fits in memory (not
# gen_batch_size: it changes what is sampled), where it writes (another --output_dir forks the run).
RESUMABLE = {"max_steps", "eval_every", "eval_size", "save_every", "keep_checkpoints", "report_to", "grade_timeout",
             "micro_batch_size", "logprob_chunk", "gradient_checkpointing", "fsdp", "cache_dir", "output_dir",
             "overwrite", "dist_timeout", "preset", "resume"}


def read_json_object(path):
    """A JSON object from a file, or BadInput naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        assert isinstance(saved, dict)
    except (OSError, ValueError, RecursionError, AssertionError) as e:
        raise BadInput(f"{path} cannot be read ({type(e).__name__})") from None
    return saved


def saved_args(ckpt):
    """The arguments a checkpoint was saved with (its args.json): every setting that defines the run, each of its
    flag's type, or BadInput (a missing one would silently become the default, which may not be what the run used)."""
    try:
        saved = read_json_object(os.path.join(ckpt, "args.json"))
    except BadInput as e:
        raise BadInput(f"--resume {ckpt}: {e}") from None
    return checked_args(saved, f"--resume {ckpt}: its args.json")


def checked_args(saved, where, complete=True):
    """The Args fields of a saved args.json, each of its flag's type; BadInput for a wrong type or (complete) a missing
    setting that defines the run."""
    kinds = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}
    out = {}
    for f in dataclasses.fields(Args):
        if f.name not in saved:
            if complete and f.name not in RESUMABLE:
                raise BadInput(f"{where} has no {f.name} (made by another version?): start a new run")
            continue
        v = saved[f.name]
        if not isinstance(v, kinds[f.type]) or (f.type is not bool and isinstance(v, bool)):
            raise BadInput(f"{where}: {f.name} is {v!r}, not a {f.type.__name__}")
        out[f.name] = v
    return out


def check_args(args):
    """Reject bad settings before anything is loaded or deleted; each message names the flag."""
    for f in dataclasses.fields(Args):  # NaN and inf are never a setting
        v = getattr(args, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise BadInput(f"--{f.name} must be a finite number, got {v}")
    for name in ["batch_size", "micro_batch_size", "gen_batch_size", "logprob_chunk", "epochs", "max_prompt_length",
                 "max_completion_length", "temperature", "grade_timeout", "max_grad_norm", "dist_timeout"]:
        if getattr(args, name) <= 0:
            raise BadInput(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ["lr_small", "lr_large"]:  # a frozen large model is --algo kdrl, not lr 0
        if getattr(args, name) <= 0:
            raise BadInput(f"--{name} must be > 0, got {getattr(args, name)} (to train the small model with the large "
                           "one frozen, use --algo kdrl)")
    for name in ["alpha", "weight_decay", "hint_tokens", "max_steps", "eval_size", "eval_every", "save_every",
                 "keep_checkpoints", "eval_temperature"]:
        if getattr(args, name) < 0:
            raise BadInput(f"--{name} must be >= 0, got {getattr(args, name)}")
    M, G, N, T = args.num_samples, args.group_size, args.max_completion_length, args.hint_tokens
    if G < 2 or G % 2:
        raise BadInput(f"--group_size must be even and >= 2 (G/2 highest and G/2 lowest are kept), got {G}")
    if G > M:
        raise BadInput(f"--group_size G={G} must be <= --num_samples M={M}")
    if T >= N:
        raise BadInput(f"--hint_tokens T={T} must be < --max_completion_length N={N}")
    if args.algo == "grpo" and (T > 0 or args.kd_form != "reward"):
        raise BadInput(f"--{'hint_tokens' if T else 'kd_form'} needs a large model: use --algo codistill or kdrl")
    if not 0 <= args.clip_eps < 1:
        raise BadInput(f"--clip_eps must be in [0, 1), got {args.clip_eps}")
    for name in ["warmup_ratio", "hint_share"]:
        if not 0 <= getattr(args, name) <= 1:
            raise BadInput(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    for name, (low, high) in LIMITS.items():  # finite but beyond what the run can take: it would fail mid-run
        v = getattr(args, name)
        if not low <= abs(v) <= high and not (v == 0 and name == "eval_temperature"):
            show = lambda x: f"{x:,}" if isinstance(x, int) else f"{x:g}"
            bound = f"between {show(low)} and {show(high)}" if low else f"at most {show(high)}"
            raise BadInput(f"--{name} {show(v)}: must be {bound}{' in size' if name.endswith('seed') else ''}")
    if args.batch_size * args.num_samples > 2**24:
        raise BadInput(f"--batch_size x --num_samples = {args.batch_size * args.num_samples} rollouts per rank: at "
                       f"most {2**24}")
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise BadInput(f"--report_to {args.report_to}: the {args.report_to} package is not installed "
                       f"(pip install {args.report_to})")


LIMITS = {"temperature": (1e-3, 1e3), "eval_temperature": (1e-3, 1e3), "lr_small": (0, 1), "lr_large": (0, 1),
          "alpha": (0, 1e6), "grade_timeout": (0, 86400.0), "dist_timeout": (0, 1e7), "weight_decay": (0, 1),
          "max_grad_norm": (0, 1e9), **{f.name: (0, 2**31 - 1) for f in dataclasses.fields(Args) if f.type is int}}


def main(argv=None):
    args, main_thread = None, threading.current_thread() is threading.main_thread()  # signals: main thread only
    terminate = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        args = parse_args(argv)
        with one_run_at_a_time(args.output_dir):
            train(args)
    except (BadInput, Stopped) as e:
        if rank() == 0 or os.environ.get("LOCAL_RANK") == "0":  # one line per machine: a machine's own disk or cache
            print(f"error: {f'rank {rank()}: ' if rank() else ''}{e}", file=sys.stderr)  # may fail alone
        sys.exit(2 if isinstance(e, BadInput) else 1)
    except RuntimeError as e:
        where = f": {where_it_stopped(args.output_dir)}" if args else ""
        if "probability tensor contains" in str(e):
            print(f"error: sampling met NaN or infinite probabilities: a model's weights have diverged (lower the "
                  f"learning rate and resume from an earlier checkpoint){where}", file=sys.stderr)
            sys.exit(1)
        if dist.is_initialized() and world() > 1 and any(k in str(e) for k in DIST_FAULTS):  # every rank says it
            print(f"error: rank {rank()} of {world()} lost the other ranks ({fault_message(e)}): one of them died or hung "
                  f"past --dist_timeout {args.dist_timeout if args else Args.dist_timeout:g} s{where}", file=sys.stderr)
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(1)  # destroy_process_group would wait for the lost ranks
        raise
    except (KeyboardInterrupt, Terminated) as e:
        # Ctrl-C reaches every rank of a terminal's job, and rank 0 speaks; SIGTERM is also what torchrun sends the
        # others when a rank dies (rank 0 too, maybe), so then each names where the run stopped
        if rank() == 0 or isinstance(e, Terminated):
            what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            who = f"rank {rank()} of {world()}: " if world() > 1 else ""
            print(f"\n{what}{'' if args is None else f': {who}' + where_it_stopped(args.output_dir)}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, terminate)
        if dist.is_initialized():
            dist.destroy_process_group()


class Terminated(BaseException):
    """SIGTERM (what schedulers send before they kill a job): handled as Ctrl-C is."""


def raise_terminated(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    main()
