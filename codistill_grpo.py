"""
CoDistill-GRPO: a small and a large language model trained together with GRPO, in one readable file.

Paper: "CoDistill-GRPO: A Co-Distillation Recipe for Efficient Group Relative Policy Optimization" (2026).
Equation numbers in comments, `# Eq. (N)`, are the paper's. One iteration, per rank, B prompts (train() below):

    1. rollouts: the small model samples M completions per prompt (in epoch 1 the large model writes the first T)
    2. rewards r: accuracy (+ format for the r1 template), graded in a worker process while 3 runs
    3. score: log pi_phi_old and log pi_theta_old of every completion token, no grad
    4. KD reward r~ = r + alpha * (1/N) sum_t (log pi_theta_old - log pi_phi_old)      Eq. (6)
       and downsampling: keep the G/2 highest and the G/2 lowest r~ of the M          Sec. 3.3
    5. advantages over the kept G: A~ = r~ - mean(r~) (small), A = (r - mean r) / std r (large)   Eq. (7), (3)
    6. small step: clipped ratio pi_phi / pi_phi_old with A~, sum over tokens / N      Eq. (5)
    7. large step: clipped ratio pi_theta / pi_phi_old with A, sum over tokens / N     Eq. (10)
    8. log (metrics.jsonl, rollouts.jsonl), held-out accuracy, checkpoint

Run it:
    python codistill_grpo.py --preset tiny                  # offline, CPU, minutes: the whole method on a toy task
    python codistill_grpo.py --preset tiny --algo grpo      # baselines in the same loop: grpo | kdrl
    python codistill_grpo.py --preset qwen0.5b              # one GPU, Qwen2.5-0.5B / 1.5B on GSM8K
    python codistill_grpo.py                                # the paper's Qwen setting (Table 3), one process
    python codistill_grpo.py --output_dir runs/tiny --resume  # continue a stopped run exactly
    torchrun --nproc_per_node=8 codistill_grpo.py          # 8 GPUs: DDP, B prompts per rank
    torchrun --nproc_per_node=8 codistill_grpo.py --fsdp   # 8 GPUs: both models sharded with FSDP2

Deliberate choices where the paper is silent (each is a flag):
- clip range eps = 0.2 and sampling temperature tau = 1.0 (the usual GRPO values; the paper gives neither).
- Hint tokens are scored in the small model's loss as if the small model had sampled them (the paper's choice,
  end of Sec. 3.1); `--hint_ratio large|ignore` gives the two alternatives of Eq. (8) and Appendix C. In the large
  model's loss, the hint tokens it sampled itself are weighted against itself (`--large_hint_ratio behaviour`).
- One optimizer step per model per batch (so pi_old is the model that sampled), no reference model (beta = 0).
- `--lr_small` and `--lr_large` are separate (both 5e-6 in the paper).
- The GRPO baseline divides each sequence by its length, as Eq. (2) is written (`--loss_norm`).

The file reads in that order: arguments, the equations, rollouts, log-probs, one optimizer step, the loop. Below
the banner `below: machinery the paper does not describe` come grading, data, the tiny offline world, models,
distributed training, checkpoints and `main`: a reader who stops at the banner has read the whole method.
"""

import argparse
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------------------
# Arguments and presets. The defaults are the paper's Qwen setting (Appendix B, Table 3).

GRADE_TIMEOUT_S = 5.0  # default hard limit of one grading call, in seconds


def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Args:
    preset: str = arg("", "a named set of defaults: paper-llama | qwen0.5b | tiny; flags given with it win",
                      choices=["", "paper-llama", "qwen0.5b", "tiny"])
    algo: str = arg("codistill", "codistill (both models), grpo (one model), kdrl (small model, frozen large)",
                    choices=["codistill", "grpo", "kdrl"])
    policy: str = arg("small", "with --algo grpo: which model is trained, small or large",
                      choices=["small", "large"])
    small_model: str = arg("Qwen/Qwen2.5-Math-1.5B", "small model phi: hub id or local folder")
    large_model: str = arg("Qwen/Qwen2.5-Math-7B", "large model theta: hub id or local folder")
    dataset: str = arg("DigitalLearningGmbH/MATH-lighteval",
                       "training problems: hub id or local JSON/JSONL with 'problem' and 'answer'")
    eval_dataset: str = arg("HuggingFaceH4/MATH-500", "held-out problems for test accuracy (never trained on)")
    eval_size: int = arg(500, "number of held-out problems scored; 0 disables evaluation")
    eval_every: int = arg(20, "score held-out accuracy every this many iterations (and at 0 and the end)")
    eval_temperature: float = arg(0.0, "held-out decoding: 0 greedy; > 0 one sample per problem at this temperature "
                                  "(top_k=0, top_p=1), from a fixed seed")
    template: str = arg("r1", "prompt template: r1 (Table 4, accuracy + format reward) or boxed (Table 5, accuracy)",
                        choices=["r1", "boxed"])
    chat_template: bool = arg(False, "wrap the template's text as the user turn of the tokenizer's chat template and "
                              "open the assistant turn (Instruct models); completions also end at its end-of-turn "
                              "token. Off: raw prompts, as the paper's Tables 4 and 5")
    output_dir: str = arg("runs/codistill", "where metrics.jsonl and checkpoint-<iteration>/ go")
    cache_dir: str = arg(os.path.join(os.path.expanduser("~"), ".cache", "codistill_grpo"),
                         "where the tiny offline world is built and cached")
    tiny_seed: int = arg(0, "tiny world: seed of its problems and base models, apart from --seed so that runs with "
                         "different seeds start from the same base models")
    tiny_warmup_small: int = arg(0, "tiny world: supervised warm-up steps that make the small model a base model")
    tiny_warmup_large: int = arg(0, "tiny world: supervised warm-up steps of the large model (longer: a stronger base)")
    tiny_noisy_small: int = arg(0, "tiny world: then this many warm-up steps of the small model on answers whose "
                                "digits are each random with probability 1/2 (it keeps the right answer most likely "
                                "but spreads its probability: a weaker base model)")
    # the paper's symbols
    batch_size: int = arg(64, "B: prompts per rank per iteration (Table 3: 64 per GPU)")
    num_samples: int = arg(14, "M: completions sampled per prompt before downsampling (Table 3: 14)")
    group_size: int = arg(8, "G: completions kept per prompt after downsampling, even, <= M (Table 3: 8)")
    max_completion_length: int = arg(3072, "N: max completion tokens, also the constant 1/N of Eq. (5), (6), (10)")
    max_prompt_length: int = arg(1024, "max prompt tokens; longer prompts are cut from the left (Table 3: 1024)")
    hint_tokens: int = arg(0, "T: hint tokens sampled by the large model in the first epoch (paper: 0 or 50)")
    hint_ratio: str = arg("small", "importance ratio on hint tokens in the small loss: small (Eq. 5, the paper's "
                          "choice), large (Eq. 8 option i), ignore (option ii: hint tokens left out)",
                          choices=["small", "large", "ignore"])
    large_hint_ratio: str = arg("behaviour", "denominator of the large model's ratio on hint tokens, which it sampled "
                                "itself: behaviour (the policy that sampled each token: pi_theta_old on hints, "
                                "pi_phi_old after them; the off-policy correction of Sec. 3.2) or small (the literal "
                                "Eq. 10: pi_phi_old on every token). The paper is silent",
                                choices=["behaviour", "small"])
    alpha: float = arg(1.0, "alpha: weight of the on-policy KD reward in Eq. (6) (paper: 1 or 2)")
    clip_eps: float = arg(0.2, "eps: clip range of the importance ratio in Eq. (5) and (10)")
    loss_norm: str = arg("auto", "each sequence's token sum in the loss is divided by: constant N (Eq. 5, 10: "
                         "Dr. GRPO), or length |o_i| (Eq. 2, the paper's GRPO baseline); auto: length for --algo "
                         "grpo, constant for codistill and kdrl", choices=["auto", "length", "constant"])
    temperature: float = arg(1.0, "tau: sampling temperature; log-probs are taken at the same temperature")
    # optimisation
    lr_small: float = arg(5e-6, "learning rate of the small model (Table 3: 5e-6)")
    lr_large: float = arg(5e-6, "learning rate of the large model (Table 3: 5e-6)")
    lr_schedule: str = arg("cosine", "cosine or constant (Table 3: cosine for Qwen)", choices=["cosine", "constant"])
    warmup_ratio: float = arg(0.05, "fraction of iterations with linear warm-up (Table 3: 5%)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient-norm clip per model")
    epochs: int = arg(8, "passes over the training problems (Table 3: 8)")
    max_steps: int = arg(0, "iterations to run; 0 = as many as --epochs gives")
    micro_batch_size: int = arg(8, "sequences per forward/backward; gradients accumulate (loss scale unchanged)")
    gen_batch_size: int = arg(128, "sequences per generate call")
    logprob_chunk: int = arg(1024, "tokens per chunk of the fp32 log-softmax (bounds its memory)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (never while generating)")
    dtype: str = arg("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16",
                     choices=["auto", "float32", "bfloat16"])
    fsdp: bool = arg(False, "under torchrun: shard both models with FSDP2 (each decoder layer, then the root) "
                     "instead of DDP; with bf16 (--dtype auto on GPU) fp32 master weights, bf16 compute, fp32 "
                     "gradient reduction")
    dist_timeout: float = arg(1200.0, "torchrun: seconds to wait for the other ranks to join (and for any "
                              "collective) before giving up with an error")
    seed: int = arg(0, "random seed (data order, sampling)")
    save_every: int = arg(100, "save a checkpoint every this many iterations (and at the end); 0 = only at the end")
    keep_checkpoints: int = arg(3, "keep only the newest this many checkpoints; 0 keeps all")
    resume: str = arg("", "continue a run: alone, from the newest complete checkpoint in --output_dir; or from PATH "
                      "(a checkpoint or run folder). Its saved arguments stay; only length, cadence, memory knobs "
                      "and the output folder (a fork) may change", nargs="?", const="latest")
    overwrite: bool = arg(False, "start afresh in an --output_dir that already holds a run (its files are deleted)")
    grade_timeout: float = arg(GRADE_TIMEOUT_S, "hard time limit of one grading call in seconds; past it the answer "
                               "scores 0 and is counted")
    report_to: str = arg("none", "also log to tensorboard or wandb", choices=["none", "tensorboard", "wandb"])


PRESETS = {
    "": {},
    "paper-llama": dict(  # Appendix B, Table 3 and Table 5
        small_model="meta-llama/Llama-3.2-1B-Instruct", large_model="meta-llama/Llama-3.1-8B-Instruct",
        template="boxed", lr_small=1e-7, lr_large=1e-7, lr_schedule="constant", warmup_ratio=0.0,
        num_samples=12, group_size=8, epochs=2),
    "qwen0.5b": dict(  # one GPU
        small_model="Qwen/Qwen2.5-0.5B-Instruct", large_model="Qwen/Qwen2.5-1.5B-Instruct",
        dataset="openai/gsm8k", eval_dataset="openai/gsm8k", eval_size=200, eval_every=25,
        max_completion_length=512, max_prompt_length=256, batch_size=16, num_samples=8, group_size=4,
        lr_small=1e-6, lr_large=1e-6, epochs=1, max_steps=200, gradient_checkpointing=True),
    "tiny": dict(  # offline, CPU: models and data built locally by build_tiny_world()
        small_model="tiny:small", large_model="tiny:large", dataset="tiny:train", eval_dataset="tiny:test",
        template="boxed", eval_size=500, eval_every=25, batch_size=16, num_samples=8, group_size=4,
        max_completion_length=16, max_prompt_length=64, lr_small=1e-4, lr_large=3e-5, lr_schedule="constant",
        warmup_ratio=0.0, epochs=1, max_steps=100, micro_batch_size=32, gen_batch_size=256, save_every=0,
        output_dir="runs/tiny", dtype="float32", tiny_warmup_small=400, tiny_noisy_small=300, tiny_warmup_large=500,
        eval_temperature=1.0),
}


# ----------------------------------------------------------------------------------------------------------------
# The paper's equations, as pure functions (tensors in, tensors out)


def kd_reward(logp_large, logp_small, mask, max_len):  # Eq. (6), the KD term without alpha
    """(1/N) sum_t mask_t (log pi_theta - log pi_phi): (S, L) each -> (S,)."""
    return ((logp_large - logp_small) * mask).sum(-1) / max_len  # (S,)


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


def policy_loss(logp, logp_old, advantages, mask, max_len, clip_eps):  # Eq. (5), (10); Eq. (2) with max_len None
    """-(1/S) sum_i (1/N) sum_t mask * min(rho A_i, clip(rho, 1-eps, 1+eps) A_i), rho = exp(logp - logp_old).

    With max_len = N this is Eq. (5) and (10): every sequence's token sum divided by the same constant N, which is
    Dr. GRPO (Liu et al., 2025; TRL's loss_type="dr_grpo"). With max_len None each sequence's sum is divided by its
    own length |o_i| (its mask's sum): the paper's Eq. (2), TRL's loss_type="grpo".
    logp, logp_old, mask: (S, L); advantages: (S,). The log-ratio is clamped to [-20, 20] before exp so that a far
    off-policy token (Eq. 10 compares two different models) cannot overflow.
    """
    ratio = torch.exp((logp - logp_old).clamp(-20.0, 20.0))  # (S, L)
    A = advantages[:, None]  # (S, 1)
    objective = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)  # (S, L)
    length = mask.sum(-1).clamp(min=1) if max_len is None else max_len  # (S,) or the constant N
    per_sequence = (objective * mask).sum(-1) / length  # (S,)  sum over tokens, divided by N (or |o_i|)
    return -per_sequence.mean()  # mean over the S sequences


def clip_fractions(ratio, advantages, mask, clip_eps):
    """Fractions of the masked tokens whose gradient the clip removes, as TRL reports them: low, rho < 1-eps with
    A < 0; high, rho > 1+eps with A > 0; region, either. ratio, mask: (S, L); advantages: (S,) -> 3 floats."""
    A = advantages[:, None]  # (S, 1)
    low = (ratio < 1 - clip_eps) & (A < 0)  # (S, L)
    high = (ratio > 1 + clip_eps) & (A > 0)  # (S, L)
    n = mask.sum().clamp(min=1)
    return [((x * mask).sum() / n).item() for x in (low, high, low | high)]


def small_step_terms(logp_small_old, logp_large_old, mask, hint, hint_ratio):  # Eq. (5) and Eq. (8)
    """The small step's ratio denominator and loss mask, (S, L) each. Hint tokens (hint: written by the large model)
    count as the small model's own (small: Eq. (5), the paper's choice), are weighted against pi_theta_old (large:
    Eq. (8) option i), or leave the loss (ignore: option ii; the model still sees them)."""
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
    return last_boxed(completion)


def digit_accuracy(completion, gold, template):
    """Partial credit, for integer answers (the tiny world's): the share of the gold answer's digits that the final
    answer has in the same place, counted from the units digit; 0.0 with no answer; None when the gold is not an
    integer. A metric, never a reward."""
    if not re.fullmatch(r"-?\d+", gold.strip()):
        return None
    digits, answer = gold.strip().lstrip("-"), (final_answer(completion, template) or "").strip().lstrip("-")
    return sum(len(answer) >= i and answer[-i] == digits[-i] for i in range(1, len(digits) + 1)) / len(digits)


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

    Built from positions: the tokens after the first EOS are masked whatever they are, so pad == EOS is fine.
    """
    S, L = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # (S, L)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], L, dtype=torch.long))
    positions = torch.arange(L, device=completion_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long()  # (S, L)


def sample(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_ids, pad_id, batch_size, synced=False):
    """Completions sampled with HF generate (KV cache, ancestral sampling: top_k=0, top_p=1) -> (S, L <= N).
    synced (FSDP2): ranks keep stepping together until all are done, as their layers gather in step."""
    from transformers import GenerationConfig
    was_training = model.training
    model.eval()
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True)
    P, outs = prompt_ids.shape[1], []
    with torch.inference_mode():
        for i in range(0, len(prompt_ids), batch_size):
            out = model.generate(input_ids=prompt_ids[i:i + batch_size], attention_mask=prompt_mask[i:i + batch_size],
                                 generation_config=config, synced_gpus=synced)
            outs.append(out[:, P:])
    model.train(was_training)
    return pad_right(outs, pad_id)  # made outside inference mode: a normal tensor, which autograd may save


def rollout(small, large, prompt_ids, prompt_mask, a, eos_ids, pad_id, hints, synced=False):
    """M completions per prompt from the small model; with hints, the large model writes their first T tokens.

    -> the rollouts as a dict of (B*M, .) tensors: prompt_ids and prompt_mask (each prompt repeated M times),
    comp (completion ids, L <= N), mask (its completion mask) and hint (1 on the tokens the large model wrote).
    """
    M, N, T = a.num_samples, a.max_completion_length, a.hint_tokens
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(M, 0), prompt_mask.repeat_interleave(M, 0)  # (B*M, P)
    seqs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    if not hints:
        comp = sample(small, prompt_ids, prompt_mask, N, a.temperature, eos_ids, pad_id, a.gen_batch_size, synced)
        return dict(seqs, comp=comp, mask=completion_mask(comp, eos_ids), hint=torch.zeros_like(comp))
    hint = sample(large, prompt_ids, prompt_mask, T, a.temperature, eos_ids, pad_id, a.gen_batch_size,
                  synced)  # (B*M, <=T)
    hint_len = completion_mask(hint, eos_ids).sum(1).tolist()  # a hint that ends in EOS is a whole completion
    # the small model continues prompt + hint: re-pad on the left, since hints differ in length
    rows = [torch.cat([p[m.bool()], h[:n]]) for p, m, h, n in zip(prompt_ids, prompt_mask, hint, hint_len)]
    P = max(len(r) for r in rows)
    ctx = torch.stack([F.pad(r, (P - len(r), 0), value=pad_id) for r in rows])  # (B*M, P')
    ctx_mask = torch.stack([F.pad(torch.ones_like(r), (P - len(r), 0)) for r in rows])
    cont = sample(small, ctx, ctx_mask, N - T, a.temperature, eos_ids, pad_id, a.gen_batch_size,
                  synced)  # (B*M, <=N-T)
    comp = pad_right([torch.cat([h[:n], c]) for h, n, c in zip(hint, hint_len, cont)], pad_id)  # (B*M, L <= N)
    positions = torch.arange(comp.shape[1], device=comp.device)[None]  # (1, L)
    hint_mask = (positions < torch.tensor(hint_len, device=comp.device)[:, None]).long()  # (B*M, L)
    return dict(seqs, comp=comp, mask=completion_mask(comp, eos_ids), hint=hint_mask)


def take(seqs, rows):
    """The rollouts of the given rows (a (S,) index tensor): each tensor of the dict indexed along its first axis."""
    return {k: v[rows] for k, v in seqs.items()}


def decode(tokenizer, completion_ids, mask):
    """Texts of the completions, each up to its mask's length (so up to and including its first EOS)."""
    return [tokenizer.decode(c[:n], skip_special_tokens=True) for c, n in zip(completion_ids, mask.sum(1).tolist())]


def pad_right(seqs, pad_id):
    """List of (s_i, L_i) or 1-D tensors -> one (sum s_i, max L_i) tensor padded on the right."""
    seqs = [s if s.dim() == 2 else s[None] for s in seqs]
    L = max(s.shape[1] for s in seqs)
    return torch.cat([F.pad(s, (0, L - s.shape[1]), value=pad_id) for s in seqs])


# ----------------------------------------------------------------------------------------------------------------
# Token log-probs: fp32 log-softmax at the sampling temperature, in chunks of tokens so that a (S, L, vocab)
# fp32 tensor never exists; with grad, each chunk's logits are recomputed in the backward pass instead of stored.


def _chunk_logprobs(lm_head, hidden, targets, temperature):
    logp = (lm_head(hidden).float() / temperature).log_softmax(-1)  # (C, V)
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
        args = (lm_head, h[i:i + chunk], targets[i:i + chunk], temperature)
        if torch.is_grad_enabled():
            out.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    logp = torch.cat([o[0] for o in out]).view(S, L)  # (S, L)
    return (logp, torch.cat([o[1] for o in out]).view(S, L)) if entropy else logp


class TokenLogprobs(torch.nn.Module):
    """token_logprobs() as the forward of a module: the module DDP and FSDP2 wrap, so that their hooks see each
    forward and backward (token_logprobs calls the decoder and the head separately, to chunk the head)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, chunk):
        """-> log-probs (S, L) and entropies (S, L, no grad)."""
        logp, entropy = token_logprobs(self.lm, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                       temperature, chunk, entropy=True)
        return logp.clone(), entropy  # .clone(): FSDP2 hooks the backward on the output, which must not be a view


@torch.no_grad()
def score(scorer, seqs, a):
    """Old-policy log-probs of the rollouts, in micro-batches, no grad: scorer is a model's TokenLogprobs (maybe
    wrapped, see parallelize) -> log-probs (S, L), and the mean entropy per completion token (a float)."""
    was_training = scorer.training
    scorer.eval()
    mb, mask = a.micro_batch_size, seqs["mask"]
    out = [scorer(seqs["prompt_ids"][i:i + mb], seqs["prompt_mask"][i:i + mb], seqs["comp"][i:i + mb],
                  mask[i:i + mb], a.temperature, a.logprob_chunk) for i in range(0, len(mask), mb)]
    scorer.train(was_training)
    entropy = torch.cat([o[1] for o in out])  # (S, L)
    return torch.cat([o[0] for o in out]), ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step on one model


def loss_norm(a):
    """'constant' (1/N: Eq. 5, 10, Dr. GRPO) or 'length' (1/|o_i|: Eq. 2) -- --loss_norm, auto resolved by --algo."""
    if a.loss_norm != "auto":
        return a.loss_norm
    return "length" if a.algo == "grpo" else "constant"


def update(scorer, opt, sched, seqs, logp_old, advantages, a, loss_mask=None, own=None, keep_logp=False):
    """One clipped policy-gradient step over this rank's S rollouts in micro-batches -> metrics. The loss of each
    micro-batch is weighted by its share of S, so the accumulated gradient is that of the mean over S sequences;
    DDP / FSDP2 average it over the ranks (equal S each): the mean over the global batch.

    seqs: rollouts (see rollout); their mask is what the model sees. loss_mask (S, L), default that mask: the tokens
    that count in the loss (hint tokens left out by --hint_ratio ignore are still seen).
    logp_old (S, L): the ratio's denominator. None: the model itself sampled the rollouts just before this one step,
    so pi_old is the model as it is, and its log-probs are this forward pass's, detached: no scoring pass (grpo).
    own (S, L): the same token by token (the large model's own hint tokens, --large_hint_ratio behaviour).
    keep_logp: the metrics also hold 'logp', the model's log-probs before the step (S, L), no grad."""
    scorer.train()
    mask = seqs["mask"]
    S, mb, eps = len(mask), a.micro_batch_size, a.clip_eps
    max_len = a.max_completion_length if loss_norm(a) == "constant" else None  # Eq. (5), (10) / Eq. (2)
    loss_mask = mask if loss_mask is None else loss_mask
    stats = dict(loss=0.0, ratio_sum=0.0, ratio_max=0.0, low=0.0, high=0.0, region=0.0, entropy=0.0, tokens=0.0,
                 seen=0.0)  # tokens: in the loss; seen: in the attention mask (entropy is over these)
    kept = []
    for i in range(0, S, mb):
        j = slice(i, i + mb)
        last = i + mb >= S  # DDP: gradients are averaged once, after the last micro-batch
        with scorer.no_sync() if hasattr(scorer, "no_sync") and not last else nullcontext():
            logp, entropy = scorer(seqs["prompt_ids"][j], seqs["prompt_mask"][j], seqs["comp"][j], mask[j],
                                   a.temperature, a.logprob_chunk)  # (mb, L) each
            old = logp.detach() if logp_old is None else logp_old[j]  # (mb, L)
            if own is not None:
                old = torch.where(own[j].bool(), logp.detach(), old)  # (mb, L)
            kept += [logp.detach()] if keep_logp else []
            loss = policy_loss(logp, old, advantages[j], loss_mask[j], max_len, eps) * (len(logp) / S)
            loss.backward()
        with torch.no_grad():
            lm, n = loss_mask[j], loss_mask[j].sum().item()
            ratio = torch.exp((logp - old).clamp(-20.0, 20.0))  # (mb, L)
            stats["loss"] += loss.item()
            stats["ratio_sum"] += (ratio * lm).sum().item()
            stats["ratio_max"] = max(stats["ratio_max"], ratio[lm.bool()].max().item() if n else 0.0)
            for k, f in zip(["low", "high", "region"], clip_fractions(ratio, advantages[j], lm, eps)):
                stats[k] += f * n
            stats["entropy"] += (entropy * mask[j]).sum().item()
            stats["tokens"] += n
            stats["seen"] += mask[j].sum().item()
    grad_norm = torch.nn.utils.clip_grad_norm_(scorer.parameters(), a.max_grad_norm)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP2: DTensor
    lr = sched.get_last_lr()[0]
    skipped = not math.isfinite(grad_norm)  # a NaN/inf loss or gradient: skip the step, keep the weights
    if skipped:
        tqdm.write(f"warning: non-finite gradient norm ({grad_norm}); this model's step is skipped", file=sys.stderr)
    else:
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    n = max(stats["tokens"], 1.0)
    return {"loss": stats["loss"], "ratio_mean": stats["ratio_sum"] / n, "ratio_max": stats["ratio_max"],
            "clip_ratio/low_mean": stats["low"] / n, "clip_ratio/high_mean": stats["high"] / n,
            "clip_ratio/region_mean": stats["region"] / n, "entropy": stats["entropy"] / max(stats["seen"], 1.0),
            "grad_norm": grad_norm, "lr": lr, "skipped_step": float(skipped),
            **(dict(logp=torch.cat(kept)) if keep_logp else {})}


def make_optimizer(model, lr, a, total_steps):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=a.weight_decay)
    warmup = int(a.warmup_ratio * total_steps)

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        if a.lr_schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


# ----------------------------------------------------------------------------------------------------------------
# The training loop (Sec. 3, Fig. 2)

PHASES = ["generate", "reward", "score", "update_small", "update_large"]  # time/<phase> in metrics.jsonl


@contextmanager
def timer(m, phase):
    """Adds the seconds spent inside the block to m['time/<phase>']."""
    t = time.perf_counter()
    yield
    m[f"time/{phase}"] = m.get(f"time/{phase}", 0.0) + time.perf_counter() - t


def train(a):
    """The paper's loop, one iteration per batch of prompts, numbered as in the module docstring. Its set-up
    (checks, data, models, optimizers, resume, output files) is machinery: setup(), below the banner."""
    run = setup(a)
    B, M, G, N = a.batch_size, a.num_samples, a.group_size, a.max_completion_length
    # Who does what, decided once; the baselines differ from CoDistill only here. codistill: the small model samples,
    # both models score and step. kdrl: the same, the large model frozen. grpo: one model (--policy) samples and
    # steps on r alone, against itself (pi_old is itself: no scoring pass). With M == G every rollout is kept, so
    # the large step (7) needs no r~ and runs first: its forward pass gives log pi_theta_old, one pass fewer.
    sampler, with_kd = a.policy if a.algo == "grpo" else "small", a.algo != "grpo"
    large_first = a.algo == "codistill" and M == G
    scored = (["small"] if large_first else ["small", "large"]) if with_kd else []
    own_hints = a.large_hint_ratio == "behaviour"  # the large model's ratio on the hints it wrote: against itself
    for it in iterations(run):  # (first, row 0: the starting models' held-out accuracy)
        epoch, batch, prompts = next_batch(run, it)  # this rank's B problems and their prompts, (B, P) ids and mask
        m, stats = {"iteration": it, "epoch": epoch, "t0": time.perf_counter()}, {}  # t0: for time/step
        hints = a.hint_tokens > 0 and epoch == 0
        # 1. Rollouts (Sec. 3.1): M per prompt from the small model; in epoch 1 the large model writes the first T
        #    tokens of each -> B*M rollouts: prompt_ids, prompt_mask, comp, mask, hint, (B*M, .) each
        with timer(m, "generate"), generating(run, [sampler] + ["large"] * hints):
            seqs = rollout(run.models[sampler], run.models.get("large"), *prompts, a, run.eos_ids, run.pad_id, hints,
                           run.fsdp)
        # 2. Rewards r (App. B): accuracy, + format for r1. Grading runs in a worker process while step 3 scores.
        with timer(m, "reward"):
            texts = decode(run.tokenizer, seqs["comp"], seqs["mask"])
            grading = grade_batch(texts, [r["answer"] for r in batch for _ in range(M)], a.template, a.grade_timeout)
        # 3. Old log-probs, no grad: log pi_phi_old and log pi_theta_old of every completion token, (B*M, L) each
        logp_old = {}
        with timer(m, "score"):
            for n in scored:
                logp_old[n], m[f"{n}/entropy"] = score(run.scorers[n], seqs, a)  # entropy: nats per token
        with timer(m, "reward"):
            acc, fmt = (torch.tensor(x, device=run.device) for x in (grading(), format_rewards(texts, a.template)))
            r = acc + fmt  # (B*M,)
        if large_first:  # step 7 now: on all M = G rollouts with A of Eq. (3); its log-probs before the step are kept
            A_all = group_advantages(r.view(B, M), scale_by_std=True).view(-1)  # (B*M,)
            stats["large"] = step(run, "large", m, seqs, logp_old["small"], A_all,
                                  own=seqs["hint"] if own_hints else None, keep_logp=True)
            logp_old["large"] = stats["large"].pop("logp")  # (B*M, L)
        # 4. KD reward r~ (Eq. 6); downsampling by r~ (Sec. 3.3): per prompt the G/2 highest and G/2 lowest of M
        kd = kd_reward(logp_old["large"], logp_old["small"], seqs["mask"], N) if with_kd else None  # (B*M,)
        r_kd = r + a.alpha * kd if with_kd else r  # (B*M,)  grpo downsamples by r
        kept = (downsample(r_kd.view(B, M), G) + M * torch.arange(B, device=r.device)[:, None]).view(-1)  # (B*G,)
        k = take(seqs, kept)  # the kept rollouts, (B*G, .) each
        # 5. Advantages over the kept G: A~ = r~ - mean(r~) (Eq. 7); A = (r - mean r) / (std r + 1e-4) (Eq. 3)
        A_kd = group_advantages(r_kd[kept].view(B, G), scale_by_std=False).view(-1)  # (B*G,)
        A = group_advantages(r[kept].view(B, G), scale_by_std=True).view(-1)  # (B*G,)
        # 6. Small step, Eq. (5): ratio pi_phi / pi_phi_old with A~, hint tokens as --hint_ratio says (Eq. 8)
        if "small" in run.trained:
            old, loss_mask = (small_step_terms(logp_old["small"][kept], logp_old["large"][kept], k["mask"], k["hint"],
                                               a.hint_ratio) if with_kd else (None, None))  # grpo: against itself
            stats["small"] = step(run, "small", m, k, old, A_kd if with_kd else A, loss_mask=loss_mask)
        # 7. Large step, Eq. (10): ratio pi_theta / pi_phi_old with A (grpo on the large model: against itself)
        if "large" in run.trained and not large_first:
            stats["large"] = step(run, "large", m, k, logp_old["small"][kept] if with_kd else None, A,
                                  own=k["hint"] if own_hints else None)
        # 8. Log: metrics of the rollouts and the steps; held-out accuracy, rollouts.jsonl, a checkpoint when due
        m.update(rollout_metrics(seqs, texts, batch, acc, r, fmt, kept, logp_old, kd, a, run.eos_ids, hints))
        finish_iteration(run, it, m, stats, lambda: rollout_table(batch, texts, r, kd, r_kd, kept, A_kd, A, a))
    return run.models


def step(run, name, m, seqs, logp_old, advantages, **kw):
    """update() of one model, on its own optimizer, timed into m['time/update_<name>'] -> its metrics."""
    with timer(m, f"update_{name}"):
        return update(run.scorers[name], *run.optims[name], seqs, logp_old, advantages, run.a, **kw)


def rollout_metrics(seqs, texts, batch, acc, r, fmt, kept, logp_old, kd, a, eos_ids, hints):
    """Metrics of one iteration's rollouts, under the name of the model that wrote them (small, or grpo's policy)."""
    B, M, p = len(batch), a.num_samples, "policy" if a.algo == "grpo" else "small"
    digit_accuracies = [digit_accuracy(t, batch[i // M]["answer"], a.template) for i, t in enumerate(texts)]
    mask, comp = seqs["mask"], seqs["comp"]
    lengths = mask.sum(1).float()  # (B*M,)
    ended = torch.isin(comp, torch.tensor(eos_ids, device=comp.device)).any(1)  # (B*M,)
    m = {f"{p}/accuracy": acc.mean().item(),
         f"{p}/zero_accuracy_frac": (acc.view(B, M).sum(1) == 0).float().mean().item(),  # Figures 1 and 4
         f"{p}/reward": r.mean().item(),
         f"{p}/completion_length": lengths.mean().item(),
         f"{p}/truncated_frac": 1.0 - ended.float().mean().item(),  # stopped at N tokens without EOS
         f"{p}/empty_frac": (ended & (lengths <= 1)).float().mean().item(),  # EOS first: an empty answer
         f"{p}/equal_reward_groups_frac": (r[kept].view(B, -1).std(1) == 0).float().mean().item()}  # A = 0
    if a.template == "r1":
        m[f"{p}/format_reward"] = fmt.mean().item()
    digits = [d for d in digit_accuracies if d is not None]
    if digits:  # partial credit, next to the whole answer's: integer answers only
        m[f"{p}/digit_accuracy"] = sum(digits) / len(digits)
    if kd is not None:  # the KD term of Eq. (6) over all M, and log pi_theta - log pi_phi per kept token
        m["small/kd_reward"] = kd.mean().item()
        diff = (logp_old["large"] - logp_old["small"])[kept]  # (B*G, L)
        m["small/kd_log_ratio"] = (diff * mask[kept]).sum().item() / max(mask[kept].sum().item(), 1)
        m["large/accuracy"] = acc[kept].mean().item()  # the rollouts the large model learns from
    if hints:
        m["small/hint_length"] = seqs["hint"].sum(1).float().mean().item()
    return m


def rollout_table(batch, texts, r, kd, r_kd, kept, A_kd, A, a, prompts=2):
    """One iteration in numbers: for the first prompts of the batch, each of its M completions with r, the KD term,
    r~, whether it was kept, A~ and A (None where they do not apply) -> rows for rollouts.jsonl."""
    M, where = a.num_samples, {i: j for j, i in enumerate(kept.tolist())}  # rollout -> its row among the kept
    rows = []
    for b, problem in enumerate(batch[:prompts]):
        completions = []
        for i in range(b * M, (b + 1) * M):
            j = where.get(i)
            completions.append(dict(text=texts[i], r=r[i].item(), kd=None if kd is None else kd[i].item(),
                                    r_kd=r_kd[i].item(), kept=j is not None,
                                    A_kd=None if j is None or kd is None else A_kd[j].item(),
                                    A=None if j is None else A[j].item()))
        rows.append(dict(problem=problem["problem"], answer=problem["answer"], alpha=a.alpha, completions=completions))
    return rows


# ==================================== below: machinery the paper does not describe ====================================


# ----------------------------------------------------------------------------------------------------------------
# Bad input


class BadInput(Exception):
    """Bad user input: main() prints the one-line message and exits with status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Grading: a worker process, killed past its time limit


def grade_batch(completions, golds, template, timeout=GRADE_TIMEOUT_S):
    """Start grading in the worker process and return at once -> wait(), which returns the scores (1.0 or 0.0
    each). The trainer scores log-probs in between, so grading is off the critical path. Never raises, never
    hangs: an answer not graded within `timeout` seconds of waiting for it scores 0.0, and the worker is killed
    (math-verify's own SIGALRM cannot stop a hang inside C code, e.g. \\boxed{9^{9^{9^{9}}}}); a fresh one grades
    the rest."""
    jobs = [(c, g, template, max(1, int(timeout))) for c, g in zip(completions, golds)]
    grading_worker()["conn"].send(jobs)  # one message: the worker takes it at once, the trainer goes on

    def wait():
        scores = []
        while len(scores) < len(jobs):
            grader = grading_worker()
            if grader["conn"].poll(timeout):
                scores.append(grader["conn"].recv())
                continue
            grader["process"].kill()  # a hang: this answer scores 0, a fresh worker takes the rest
            grader["process"].join()
            grader["timeouts"] += 1
            grader.pop("process")
            scores.append(0.0)
            if len(scores) < len(jobs):
                grading_worker()["conn"].send(jobs[len(scores):])
        return scores
    return wait


def grade(completion, gold, template, soft_timeout=int(GRADE_TIMEOUT_S)):
    """The grader itself; it runs in the worker, where math-verify's own SIGALRM limits are a first, soft line.
    The final answer is extracted first (final_answer). It is wrapped in $...$ when it has no delimiters and parsed
    as LaTeX only: math-verify's plain-expression parser would hand model text to sympy's parse_expr,
    which calls eval."""
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


def grading_loop(conn, parent_end, parent_pid):
    parent_end.close()  # a forked worker inherits the trainer's end too; holding it would hide the trainer's death
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to report; the worker ends with it
    while os.getppid() == parent_pid:  # a killed trainer (even SIGKILL) takes its grader with it
        if conn.poll(1.0):
            try:
                for job in conn.recv():  # a batch; each score is sent as soon as it is known
                    conn.send(grade(*job))
            except (EOFError, BrokenPipeError):
                return


def last_boxed(text):
    """Content of the last \\boxed{...} with balanced braces (MATH solutions carry their answer there)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Data: local JSON/JSONL files and hub datasets; the order of the batches


HUB_DATASETS = {
    "DigitalLearningGmbH/MATH-lighteval": ("default", {"train": ["train", "test"], "test": ["test"]}, "problem",
                                           lambda row: last_boxed(row["solution"])),
    "HuggingFaceH4/MATH-500": (None, {"train": ["test"], "test": ["test"]}, "problem", lambda row: row["answer"]),
    "openai/gsm8k": ("main", {"train": ["train"], "test": ["test"]}, "question",
                     lambda row: row["answer"].split("####")[-1].strip().replace(",", "")),
    # the benchmarks of the paper's Tables 1 and 2 (eval.py)
    "math-ai/minervamath": (None, {"test": ["test"]}, "question", lambda row: row["answer"]),
    "math-ai/amc23": (None, {"test": ["test"]}, "question", lambda row: row["answer"]),
    "math-ai/olympiadbench": (None, {"test": ["test"]}, "question",  # final_answer is a list of one string
                              lambda row: row["final_answer"][0] if isinstance(row["final_answer"], list)
                              else row["final_answer"]),
}


MATH500_ID = "HuggingFaceH4/MATH-500"


def load_problems(name, split="train"):
    """-> list of {'problem', 'answer'} from a local JSON/JSONL file or a hub dataset. BadInput names the file and
    the line (JSONL) or the row (JSON list, hub; 1-based) of a row without a problem or an answer that can be graded."""
    if os.path.isfile(name) and name.endswith(".json"):
        try:
            rows = json.loads(read_text(name))
        except json.JSONDecodeError as e:
            raise BadInput(f"dataset {name}: line {e.lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise BadInput(f"dataset {name}: a JSON list of rows with 'problem' and 'answer' expected")
        where, places = name, [f"row {i}" for i in range(1, len(rows) + 1)]
    elif os.path.isfile(name):
        numbered = read_jsonl(name, numbered=True)
        where, places, rows = name, [f"line {i}" for i, _ in numbered], [r for _, r in numbered]
    else:
        import datasets
        config, splits, pcol, answer_of = HUB_DATASETS.get(name, (None, {}, "problem", lambda r: r["answer"]))
        splits = splits.get(split, [split])
        try:
            parts = [datasets.load_dataset(name, config, split=s) for s in splits]
        except Exception as e:
            raise BadInput(f"dataset {name}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        rows = [{"problem": r.get(pcol), "answer": answer_or_none(answer_of, r)} for p in parts for r in p]
        where, places = f"{name} ({'+'.join(splits)})", [f"row {i}" for i in range(1, len(rows) + 1)]
    if not rows:
        raise BadInput(f"dataset {where}: no rows")
    return [checked_row(r, f"dataset {where}: {place}") for r, place in zip(rows, places)]


def checked_row(row, where):
    """{'problem': str, 'answer': str} of a row, or BadInput: a problem must be text; an answer text or a number (a
    list, a boolean or a blank would be turned into a string that can never be graded correct)."""
    if not isinstance(row, dict):
        raise BadInput(f"{where} is not an object with 'problem' and 'answer'")
    problem, answer = row.get("problem"), row.get("answer")
    if not isinstance(problem, str) or not problem.strip():
        raise BadInput(f"{where}: 'problem' must be non-blank text, got {str(problem)[:40]!r}")
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer)
    if not number and not (isinstance(answer, str) and answer.strip()):
        raise BadInput(f"{where}: 'answer' must be non-blank text or a number, got {str(answer)[:40]!r}")
    return {"problem": problem, "answer": str(answer).strip()}


def answer_or_none(answer_of, row):
    try:
        return answer_of(row)
    except (KeyError, TypeError, AttributeError):
        return None


def training_problems(name):
    """Training rows; MATH (train + test = 12,500) without the 500 problems of MATH500, which we evaluate on."""
    rows = load_problems(name, "train")
    if name == "DigitalLearningGmbH/MATH-lighteval":
        held_out = {r["problem"].strip() for r in load_problems(MATH500_ID, "test")}
        kept = [r for r in rows if r["problem"].strip() not in held_out]
        print(f"training set: {len(rows)} MATH problems, {len(rows) - len(kept)} of MATH500 left out -> {len(kept)}")
        rows = kept
    return rows


def batch_indices(n_rows, batch_size, seed, iteration, rank=0, world=1):
    """This rank's rows of an iteration (1-based): each epoch is a permutation seeded by (seed, epoch), cut into
    global batches of world x batch_size rows, and rank r takes the r-th share. A pure function of the iteration,
    so that a resumed run sees the same batches. -> (epoch, list of row indices)"""
    global_batch = batch_size * world
    epoch, step = divmod(iteration - 1, n_rows // global_batch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = step * global_batch + rank * batch_size
    return epoch, order[start:start + batch_size].tolist()


def read_jsonl(path, missing_ok=False, numbered=False):
    """Rows of a JSONL file (dicts), BadInput naming the file and the line (1-based, blank lines counted) of a line
    that is not a JSON object or not UTF-8. A half-written last line (a crash while writing it) is dropped.
    numbered: (line, row) pairs."""
    if missing_ok and not os.path.exists(path):
        return []
    lines = read_text(path).split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: the last line was still being written
                break
            raise BadInput(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise BadInput(f"{path}: line {i} is not a JSON object")
        rows.append((i, row) if numbered else row)
    return rows


def read_text(path):
    """A UTF-8 text file, BadInput naming the file and the line of the first byte that is not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadInput(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise BadInput(f"{path}: line {line} is not UTF-8 text") from None


# ----------------------------------------------------------------------------------------------------------------
# The tiny offline world: a tokenizer, two Qwen2 models and additions, built locally and saved, so that
# `--preset tiny` goes through the same from_pretrained path as real models.


TINY_CONFIGS = {  # small ~0.5M params, large ~4M params
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "large": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
}
TINY_WARMUP_LR = {"small": 3e-3, "large": 5e-4}
TINY_NOISE = dict(p=0.5, lr=1e-3)  # the small model's last warm-up steps: each answer digit random with probability p
NOISY_TRIES = 3  # builds of the small model (each from another initialisation) until that phase leaves it working
TINY_DIGITS = 4
TINY_EOS = "<|endoftext|>"  # EOS and pad are the same token, as in Qwen2.5 base models
TINY_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's ChatML, no system turn


def tiny_problems(seed, n_train=10_000, n_test=500, digits=TINY_DIGITS):
    """Additions of two `digits`-digit numbers without carries (each pair of digits sums to at most 9), so that every
    digit of the answer is a part of its own: the sum of the two digits above it. Shuffled by seed, distinct; the
    first n_test are the held-out set."""
    g, seen, rows = random.Random(seed), set(), []
    while len(rows) < n_train + n_test:
        x = [g.randint(1 if i == 0 else 0, 8 if i == 0 else 9) for i in range(digits)]
        y = [g.randint(1 if i == 0 else 0, 9 - d) for i, d in enumerate(x)]
        a, b = int("".join(map(str, x))), int("".join(map(str, y)))
        if (a, b) not in seen:
            seen.add((a, b))
            rows.append({"problem": f"What is {a} + {b}", "answer": str(a + b)})
    return rows[n_test:], rows[:n_test]


def tiny_solution(row):
    return f" \\boxed{{{row['answer']}}}"  # answer-only: 4 digits, each a part of the answer


def corrupt(row, p, g):
    """The row with each digit of its answer replaced, with probability p, by a random digit."""
    return dict(row, answer="".join(str(g.randrange(10)) if g.random() < p else c for c in row["answer"]))


def build_tiny_tokenizer(rows):
    """A byte-level BPE tokenizer (digits kept single) trained on the task's prompts and solutions, with Qwen's EOS
    and chat tokens and a ChatML chat template (for --chat_template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [TEMPLATES[t].format(prompt=r["problem"]) + tiny_solution(r) for t in TEMPLATES for r in rows[:2000]]
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", TINY_EOS])  # EOS last, as in Qwen: id 0 is "!"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_EOS, pad_token=TINY_EOS,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=TINY_CHAT)


def warmup(model, tokenizer, rows, template, steps, lr, seed, batch_size=64, noise=0.0, desc="warm-up"):
    """Supervised warm-up on prompt + solution (loss on the solution and its EOS): random weights -> a base model.
    AdamW (0.9, 0.98), linear lr warm-up over the first 5% of the steps then constant, grad-norm clip 1. noise: each
    answer digit of each example drawn is replaced by a random digit with this probability."""
    g = random.Random(seed)
    encode = lambda r: (tokenizer(TEMPLATES[template].format(prompt=r["problem"]))["input_ids"],
                        tokenizer(tiny_solution(r))["input_ids"] + [tokenizer.eos_token_id])
    data = [encode(r) for r in rows] if not noise else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(1, steps // 20)))
    pad = tokenizer.pad_token_id
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=steps < 50 or rank() != 0):
        batch = g.choices(data, k=batch_size) if not noise else [encode(corrupt(r, noise, g))
                                                                  for r in g.choices(rows, k=batch_size)]
        L = max(len(p) + len(s) for p, s in batch)
        ids = torch.tensor([p + s + [pad] * (L - len(p) - len(s)) for p, s in batch])  # (batch, L), right-padded
        attn = torch.tensor([[1] * (len(p) + len(s)) + [0] * (L - len(p) - len(s)) for p, s in batch])
        labels = torch.tensor([[-100] * len(p) + s + [-100] * (L - len(p) - len(s)) for p, s in batch])
        model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model


def build_tiny_world(cache_dir, seed, warmup_steps=(0, 0), noisy_steps=0):
    """Build once (cached, keyed by its settings) the tiny tokenizer, data and models -> paths {'small', 'large',
    'train', 'test'}. Both models warm up on clean answers, warmup_steps = (small, large) steps; then the small one
    takes noisy_steps more on answers whose digits are each random with probability TINY_NOISE['p']: it keeps the
    right answer most likely but spreads its probability over near misses, a stand-in for a weaker base model. That
    phase is checked, and the small model built again if it broke it (tiny_base_model)."""
    settings = [TINY_CONFIGS, seed, list(warmup_steps), noisy_steps, TINY_WARMUP_LR, TINY_NOISE, TINY_DIGITS, "v4"]
    key = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:10]  # bump "v4" when the world changes
    root = os.path.join(cache_dir, f"tiny-{key}")
    paths = {name: os.path.join(root, name) for name in ["small", "large"]}
    paths.update(train=os.path.join(root, "train.jsonl"), test=os.path.join(root, "test.jsonl"))
    if os.path.exists(os.path.join(root, "DONE")):
        print0(f"tiny offline world: {root} (cached)")
        return paths
    print(f"building the tiny offline world in {root} (once; later runs take it from there)")
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    train, test = tiny_problems(seed)
    for split, rows in [("train", train), ("test", test)]:
        with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    tokenizer = build_tiny_tokenizer(train)
    try:
        for name, steps in zip(TINY_CONFIGS, warmup_steps):
            model = tiny_base_model(name, tokenizer, train, test[:100], steps, noisy_steps, seed)
            if model is None:
                raise BadInput(f"the tiny world's small base model came out broken {NOISY_TRIES} times: its noisy "
                               f"warm-up is chaotic. Build another world with --tiny_seed {seed + 1}, or another "
                               f"--tiny_warmup_small / --tiny_noisy_small (nothing was cached)")
            model.save_pretrained(os.path.join(tmp, name))
            tokenizer.save_pretrained(os.path.join(tmp, name))
    except BaseException:  # broken, interrupted (Ctrl-C) or failed: leave nothing half-built in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    open(os.path.join(tmp, "DONE"), "w").close()
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return paths


def tiny_base_model(name, tokenizer, train, check_rows, steps, noisy_steps, seed):
    """One of the tiny world's base models: random weights, `steps` warm-up steps on clean answers, and for the small
    one noisy_steps more on noisy answers -> the model, or None. That noisy phase is chaotic (README, "The same world
    on every machine"): the rounding of another thread count or CPU, or a few clean steps more, decide whether it
    spreads the model's probability over near misses, as meant, or wipes out the addition the clean phase taught.
    So the small model is checked (greedy accuracy on check_rows; healthy builds: 74-100%, broken ones: 2-27%) and,
    under 50%, built again from another initialisation and data order, up to NOISY_TRIES times."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    noisy = name == "small" and noisy_steps > 0
    for attempt in range(NOISY_TRIES if noisy and steps else 1):
        s = seed + 1000 * attempt  # the first try is the world's seed
        torch.manual_seed(s)
        config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **TINY_CONFIGS[name])
        model = warmup(Qwen2ForCausalLM(config), tokenizer, train, "boxed", steps, TINY_WARMUP_LR[name], s,
                       desc=f"warm-up ({name} model)")
        if not noisy:
            return model
        warmup(model, tokenizer, train, "boxed", noisy_steps, TINY_NOISE["lr"], s + 1, noise=TINY_NOISE["p"],
               desc="warm-up (small model, noisy answers)")
        greedy = greedy_accuracy(model, tokenizer, check_rows) if steps else 1.0  # random weights: nothing to lose
        if greedy >= 0.5:
            return model
        print(f"the noisy warm-up broke the small model (greedy accuracy {greedy:.0%} on {len(check_rows)} held-out "
              f"additions, try {attempt + 1} of {NOISY_TRIES})" + ("; building it again from another initialisation"
                                                                  if attempt + 1 < NOISY_TRIES else ""))
    return None


def greedy_accuracy(model, tokenizer, rows):
    """Share of the tiny world's problems a model answers right, greedy, as a check of its build."""
    texts = complete(model, tokenizer, [r["problem"] for r in rows], "boxed", 16, 64, [tokenizer.eos_token_id],
                     len(rows))
    return sum(final_answer(t, "boxed") == r["answer"] for t, r in zip(texts, rows)) / len(rows)


def resolve_tiny(a):
    """Replace the preset's 'tiny:NAME' placeholders by the paths of the built tiny world."""
    fields = ["small_model", "large_model", "dataset", "eval_dataset"]
    if any(getattr(a, f).startswith("tiny:") for f in fields):
        try:
            os.makedirs(a.cache_dir, exist_ok=True)
        except OSError as e:
            raise BadInput(f"--cache_dir {a.cache_dir}: not a writable folder ({e.strerror})") from None
        build = lambda: build_tiny_world(a.cache_dir, a.tiny_seed, (a.tiny_warmup_small, a.tiny_warmup_large),
                                         a.tiny_noisy_small)
        if dist.is_initialized():  # torchrun: one process per machine builds it, the others then read it
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                build()
            dist.barrier()
        paths = build()
        for f in fields:
            v = getattr(a, f)
            if v.startswith("tiny:"):
                if v[5:] not in paths:
                    raise BadInput(f"--{f} {v}: the tiny world has {', '.join('tiny:' + k for k in paths)}")
                setattr(a, f, paths[v[5:]])
    return a


# ----------------------------------------------------------------------------------------------------------------
# Models and tokenizers


def load_tokenizer(name):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise BadInput(f"model {name}: its tokenizer cannot be loaded ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]})") from None
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
    from transformers import AutoModelForCausalLM, GenerationConfig
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as e:  # a folder without weights, a damaged file, an unknown hub id: the user's input
        raise BadInput(f"model {name}: cannot be loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    model = model.to(device)
    # Our own generation config: a hub model's (e.g. repetition_penalty, top_k) would change what is sampled
    # without changing the log-probs we train on. Checkpoints get the model's own back (save_checkpoint).
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
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    if not after or after[0] not in special:
        raise BadInput(f"--chat_template: the chat template of {tokenizer.name_or_path} ends an assistant turn with "
                       f"no special token ({text[-40:]!r})")
    return after[0]


# ----------------------------------------------------------------------------------------------------------------
# Held-out accuracy (Figure 3)


@torch.inference_mode()
def complete(model, tokenizer, problems, template, max_new_tokens, max_prompt_length, eos_ids, batch_size,
             temperature=0.0, synced=False, chat=False):
    """Completion texts (up to the first EOS) for a list of problems: greedy when temperature == 0, else sampled
    at that temperature with top_k=0, top_p=1. Shared by the trainer's held-out accuracy and eval.py."""
    from transformers import GenerationConfig
    was_training = model.training
    model.eval()
    sampling = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0
                else dict(do_sample=False))
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                              **sampling)
    device = next(model.parameters()).device
    texts = []
    for i in tqdm(range(0, len(problems), batch_size), desc="generating", leave=False,
                  disable=len(problems) <= batch_size):
        ids, mask = encode_prompts(tokenizer, problems[i:i + batch_size], template, max_prompt_length, device, chat)
        comp = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                              synced_gpus=synced)[:, ids.shape[1]:]
        texts += decode(tokenizer, comp, completion_mask(comp, eos_ids))
    model.train(was_training)
    return texts


def heldout_accuracy(model, tokenizer, rows, a, eos_ids, synced=False):
    """Accuracy on held-out problems (the paper's Figure 3): greedy, or with --eval_temperature one sample per problem
    from a fixed seed (every run and evaluation draws the same random numbers) -> {'test_accuracy'} and, for integer
    answers, 'test_digit_accuracy'. Under torchrun each rank scores every world()-th problem; the shares are padded
    to one length (padding not counted) so that ranks stay in step."""
    R, W = rank(), world()
    idx = list(range(R, -(-len(rows) // W) * W, W))  # this rank's problems; indices past the end are padding
    torch.manual_seed(1234 + R)
    texts = complete(model, tokenizer, [rows[i % len(rows)]["problem"] for i in idx], a.template,
                     a.max_completion_length, a.max_prompt_length, eos_ids, a.gen_batch_size, a.eval_temperature,
                     synced=synced, chat=a.chat_template)
    golds = [rows[i % len(rows)]["answer"] for i in idx]
    scores = grade_batch(texts, golds, a.template, a.grade_timeout)()
    digits = [digit_accuracy(t, g, a.template) for t, g in zip(texts, golds)]
    real = [i < len(rows) for i in idx]
    correct, parts, counted = all_reduce([sum(s for s, r in zip(scores, real) if r),
                                          sum(d for d, r in zip(digits, real) if r and d is not None),
                                          float(sum(r and d is not None for d, r in zip(digits, real)))])
    return dict(test_accuracy=correct / len(rows), **(dict(test_digit_accuracy=parts / counted) if counted else {}))


# ----------------------------------------------------------------------------------------------------------------
# Distributed (torchrun): one process per device, B prompts each. Without torchrun's variables, one process
# and every helper below is a no-op.


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
        interrupt = signal.signal(signal.SIGINT, signal.SIG_DFL)  # the wait is in C++: let Ctrl-C end it at once
        try:
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # the store's timeout and connection errors have several types across versions
            raise BadInput(f"{who}: the process group did not form within {timeout_s:g} s (--dist_timeout): are all "
                           f"ranks started with the same MASTER_ADDR and WORLD_SIZE? ({type(e).__name__})") from None
        finally:
            signal.signal(signal.SIGINT, interrupt)
    if not cuda:
        return torch.device("cpu")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", torch.cuda.current_device())


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kw):
    if rank() == 0:
        print(*args, **kw)


def parallelize(model, a, trained, compute_dtype):
    """The log-prob module of a model. One process: as is. torchrun: DDP-wrapped when trained (a frozen model is
    simply replicated); with --fsdp, sharded by FSDP2: each decoder layer a unit, the root unit holding the
    embeddings, final norm and head (tied embeddings stay in one unit), compute in compute_dtype, fp32 reduction."""
    scorer, device = TokenLogprobs(model), next(model.parameters()).device
    if not dist.is_initialized() or not (trained or a.fsdp):
        return scorer
    if not a.fsdp:
        device_ids = [device] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(scorer, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    if not hasattr(model.get_decoder(), "layers"):
        raise BadInput(f"--fsdp: {type(model).__name__} has no decoder .layers to shard")
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(scorer, mp_policy=mp)
    # FSDP2 takes the first module run as its root, and generate() runs the layers without the root: one token
    # through the root now makes it the root
    one = torch.ones((1, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        scorer(one, one, one, one, 1.0, 1)
    scorer.reshard()  # the root keeps its parameters gathered after a forward; the optimizer must get the shards
    return scorer


@contextmanager
def generating(run, names):
    """FSDP2 around generate(), which runs the inner model and not the root's forward: the root unit's parameters
    (embeddings, norm, head) are gathered here, and each layer keeps its parameters gathered from its first
    decoding step to the end, rather than gathering them again at every token. Elsewhere a no-op."""
    from torch.distributed.fsdp import FSDPModule
    roots = [run.scorers[n] for n in names if isinstance(run.scorers[n], FSDPModule)]
    layers = [m for r in roots for m in r.modules() if isinstance(m, FSDPModule) and m is not r]
    for m in layers:
        if hasattr(m, "set_reshard_after_forward"):  # older torch: gathered again at each token (slower, same result)
            m.set_reshard_after_forward(False, recurse=False)
    for r in roots:
        r.unshard()
    try:
        yield
    finally:
        for m in layers:
            if hasattr(m, "set_reshard_after_forward"):
                m.set_reshard_after_forward(True, recurse=False)
            m.reshard()
        for r in roots:
            r.reshard()


def full_state_dict(scorer):
    """A model's whole state dict on CPU with Hugging Face names; under FSDP2 gathered from the shards (a
    collective: every rank calls it, rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in sd.items()}


def all_reduce(values, op=dist.ReduceOp.SUM):
    """A list of floats reduced across ranks; as is in one process."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def reduce_metrics(m):
    """Metrics of the global batch. Ranks hold equal shares, so means are averaged across ranks; maxima and
    times (the slowest rank) are maxed; throughputs and counts are summed. Per-token means (ratio_mean,
    clip_frac) are averaged per rank, not per token. Every rank has the same keys, so they line up."""
    if not dist.is_initialized():
        return m
    out = dict(m)
    floats = sorted(k for k, v in m.items() if isinstance(v, float))
    maxed = [k for k in floats if k.endswith("_max") or k.startswith("time/")]
    summed = [k for k in floats if k in ("tokens_per_s", "grade_timeouts")]
    means = [k for k in floats if k not in maxed + summed]
    out.update(zip(maxed, all_reduce([m[k] for k in maxed], dist.ReduceOp.MAX)))
    out.update(zip(summed, all_reduce([m[k] for k in summed])))
    out.update({k: v / world() for k, v in zip(means, all_reduce([m[k] for k in means]))})
    return out


def lm_of(scorer):
    """The Hugging Face model inside a (maybe DDP-wrapped) TokenLogprobs."""
    return getattr(scorer, "module", scorer).lm


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, resume and the run folder


def optimizer_state(scorer, opt):
    """An optimizer's state keyed by parameter names, whole, on CPU (under FSDP2 gathered: every rank calls it):
    it loads into any world size, with or without --fsdp."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(scorer, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(scorer, opt, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp import FSDPModule
    options = StateDictOptions(full_state_dict=isinstance(scorer, FSDPModule))  # whole -> this rank's shards
    set_optimizer_state_dict(scorer, opt, optim_state_dict=state, options=options)


def save_checkpoint(scorers, optims, tokenizer, a, iteration):
    """OUTPUT_DIR/checkpoint-<iteration>/: a Hugging Face folder per trained model, trainer_state.pt (optimizers,
    schedulers, iteration) and args.json; written aside and renamed into place, then the `latest` pointer, then
    older checkpoints beyond --keep_checkpoints are removed. A crash at any point leaves the previous checkpoint
    whole. Under torchrun every rank calls it (FSDP2 gathers the shards) and rank 0 writes."""
    weights = {n: full_state_dict(s) for n, s in scorers.items()}  # whole on rank 0
    optimizers = {n: optimizer_state(scorers[n], opt) for n, (opt, sched) in optims.items()}
    final = os.path.join(a.output_dir, f"checkpoint-{iteration}")
    if rank() != 0:
        dist.barrier()  # wait until rank 0 has written it
        return final
    for name, sd in weights.items():  # NaN weights never reach a checkpoint
        if not all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()):
            raise RuntimeError(f"the {name} model has non-finite weights at iteration {iteration}: not saved")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, scorer in scorers.items():
        model = lm_of(scorer)
        model.save_pretrained(os.path.join(tmp, name), state_dict=weights[name])
        tokenizer.save_pretrained(os.path.join(tmp, name))
        if hasattr(model, "own_generation_config"):  # users of the checkpoint get the model's own settings
            model.own_generation_config.save_pretrained(os.path.join(tmp, name))
    torch.save(dict(iteration=iteration, optimizers=optimizers,
                    schedulers={n: sched.state_dict() for n, (opt, sched) in optims.items()}),
               os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(a) | dict(iteration=iteration), f, indent=1)
    shutil.rmtree(final, ignore_errors=True)  # the same iteration saved by an earlier attempt of this run
    os.replace(tmp, final)
    write_atomically(os.path.join(a.output_dir, "latest"), os.path.basename(final) + "\n")
    if a.keep_checkpoints:
        for old in checkpoints_in(a.output_dir)[:-a.keep_checkpoints]:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return final


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def checkpoints_in(run_dir):
    """Complete checkpoints of a run, oldest first (a folder still being written ends in .tmp)."""
    found = [(int(m.group(1)), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return [path for _, path in sorted(found)]


def find_checkpoint(path):
    """The checkpoint to resume from: PATH itself, or the newest complete checkpoint of the run in PATH (a newer,
    incomplete one is named and passed over)."""
    if not os.path.isdir(path):
        raise BadInput(f"--resume {path}: no such folder")
    if os.path.exists(os.path.join(path, "trainer_state.pt")) or re.fullmatch(r"checkpoint-\d+", os.path.basename(
            os.path.normpath(path))):
        problem = checkpoint_problem(path)
        if problem:
            raise BadInput(f"--resume {path}: not a complete checkpoint ({problem})")
        return path
    found = checkpoints_in(path)
    if not found:
        raise BadInput(f"--resume {path}: no checkpoint-<iteration> folder there")
    for ckpt in reversed(found):
        problem = checkpoint_problem(ckpt)
        if not problem:
            return ckpt
        print0(f"note: {ckpt} is not complete ({problem}); looking at the one before")
    raise BadInput(f"--resume {path}: no complete checkpoint there (the newest, {found[-1]}: "
                   f"{checkpoint_problem(found[-1])})")


def checkpoint_problem(ckpt):
    """What a checkpoint lacks, or None when it is whole: trainer_state.pt, args.json, and for each model it saved
    config.json and weights whose safetensors headers cover their files (a file cut short fails here)."""
    from safetensors import safe_open
    for need in ["trainer_state.pt", "args.json"]:
        if not os.path.exists(os.path.join(ckpt, need)):
            return f"no {need}"
    try:
        algo = json.load(open(os.path.join(ckpt, "args.json"), encoding="utf-8")).get("algo", "codistill")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return "args.json cannot be read"
    for name in {"codistill": ["small", "large"], "kdrl": ["small"]}.get(algo, ["policy"]):
        folder = os.path.join(ckpt, name)
        weights = [f for f in os.listdir(folder) if f.endswith(".safetensors")] if os.path.isdir(folder) else []
        if not os.path.exists(os.path.join(folder, "config.json")) or not weights:
            return f"no {name} model (config.json and *.safetensors)"
        for w in weights:
            try:
                with safe_open(os.path.join(folder, w), "pt"):
                    pass
            except Exception as e:  # safetensors raises its own error type for a damaged file
                return f"{name}/{w} is damaged ({str(e)[:80]})"
    return None


def load_trainer_state(ckpt, names):
    """trainer_state.pt of a checkpoint, checked whole before any model is loaded (BadInput otherwise)."""
    try:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    except Exception as e:
        raise BadInput(f"--resume {ckpt}: trainer_state.pt cannot be read ({type(e).__name__}: {str(e)[:150]})")
    for n in names:
        if n not in state.get("optimizers", {}) or n not in state.get("schedulers", {}):
            raise BadInput(f"--resume {ckpt}: the {n} model's optimizer state is missing")
    return state


def check_output_dir(a, resuming):
    """Refuse an unwritable folder, and one that holds another run, unless the run continues there (--resume from
    one of its checkpoints) or --overwrite -> the files of the old run to delete once the models have loaded
    (everything that can fail on input is checked before anything is deleted)."""
    if os.path.exists(os.path.join(a.output_dir, "trainer_state.pt")):  # its args.json would be overwritten
        raise BadInput(f"--output_dir {a.output_dir} is a checkpoint folder: give the run a folder of its own")
    probe = os.path.join(a.output_dir, f".write_test{rank()}")
    try:
        os.makedirs(a.output_dir, exist_ok=True)
        write_atomically(probe, "")
        os.remove(probe)
    except OSError as e:
        raise BadInput(f"--output_dir {a.output_dir}: not writable ({e.strerror})")
    previous = [os.path.join(a.output_dir, d) for d in sorted(os.listdir(a.output_dir))
                if d in ("metrics.jsonl", "rollouts.jsonl", "resumes.jsonl", "latest") or d.startswith("checkpoint-")]
    same_run = resuming and os.path.samefile(a.output_dir, os.path.dirname(os.path.abspath(a.resume)))
    if not previous or same_run:
        return []
    if not a.overwrite:
        what = f"a fork of {a.resume} needs an empty folder; " if resuming else ""
        names = ", ".join(os.path.basename(p) for p in previous[:3])
        raise BadInput(f"--output_dir {a.output_dir} already holds a run ({names}): {what}add --resume to continue "
                       "it, --overwrite to start afresh, or choose another folder")
    return previous


@contextmanager
def one_run_at_a_time(folder):
    """Rank 0 holds an exclusive lock on folder/.lock while the run lasts (the system releases it when the process
    ends, however it ends): a second run started in the same folder is refused instead of writing over the first
    one's files."""
    f = None
    if os.environ.get("RANK", "0") == "0" and not os.path.exists(os.path.join(folder, "trainer_state.pt")):
        try:
            os.makedirs(folder, exist_ok=True)
            f = open(os.path.join(folder, ".lock"), "a")
        except OSError:
            pass  # check_output_dir reports it, naming the flag
    if f is None:
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BadInput(f"--output_dir {folder}: another run is writing there right now") from None
        try:
            yield
        finally:  # the grading worker, forked during the run, holds this file too: unlock it for both
            fcntl.flock(f, fcntl.LOCK_UN)


def clear_output_dir(paths):
    for path in paths if rank() == 0 else []:  # one rank deletes
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def open_reporter(a):
    """Optional tensorboard / wandb logger: -> function(metrics, step)."""
    if a.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(a.output_dir, "tensorboard"))
        return lambda m, step: [writer.add_scalar(k, v, step) for k, v in m.items() if isinstance(v, (int, float))]
    if a.report_to == "wandb":
        import wandb
        wandb.init(project="codistill-grpo", config=dataclasses.asdict(a), dir=a.output_dir)
        return lambda m, step: wandb.log(m, step=step)
    return lambda m, step: None


# ----------------------------------------------------------------------------------------------------------------
# The loop's set-up and I/O: train() calls setup(), next_batch(), generating(), finish_iteration()


def setup(a):
    """Everything train() needs before its first iteration -> a namespace `run`. Every input is checked before any
    model is loaded; then torchrun's process group, the data, the models (wrapped for DDP / FSDP2), the optimizers,
    a checkpoint's state (--resume) and the output files."""
    import transformers
    transformers.utils.logging.disable_progress_bar()  # per-shard bars would drown ours
    check_args(a)
    device = setup_distributed(a.dist_timeout)  # torchrun: one process per device; otherwise one process
    fsdp = a.fsdp and dist.is_initialized()
    if a.fsdp and not fsdp:
        print("note: --fsdp takes effect under torchrun; one process trains unsharded")
    resolve_tiny(a)
    run = SimpleNamespace(a=a, device=device, fsdp=fsdp, **load_inputs(a))
    old_run = check_output_dir(a, resuming=run.state is not None)  # every rank checks (and fails alike)
    torch.manual_seed(a.seed)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[a.dtype]
    # FSDP2 keeps fp32 master weights and computes in dtype (its mixed precision); otherwise weights are in dtype
    run.models = {n: load_model(run.names[n], torch.float32 if fsdp else dtype, device, a.gradient_checkpointing)
                  for n in run.needs}
    run.scorers = {n: parallelize(run.models[n], a, n in run.trained, dtype) for n in run.needs}  # log-prob modules
    clear_output_dir(old_run)  # --overwrite: only now, with every input loaded
    if dist.is_initialized():
        dist.barrier()
    run.eos_ids = eos_ids_of(run.tokenizer, *run.models.values(), chat=a.chat_template)
    run.pad_id = run.tokenizer.pad_token_id
    lrs = {"small": a.lr_small, "large": a.lr_large}
    run.optims = {n: make_optimizer(run.scorers[n], lrs[n], a, run.total_steps) for n in run.trained}
    for n in run.trained if run.state else []:
        load_optimizer_state(run.scorers[n], run.optims[n][0], run.state["optimizers"][run.prefix[n]])
        run.optims[n][1].load_state_dict(run.state["schedulers"][run.prefix[n]])
    run.start = run.state["iteration"] + 1 if run.state else 1
    open_outputs(run)
    print0(f"algo {a.algo}: training {', '.join(run.trained)} for iterations {run.start}..{run.total_steps} "
           f"({len(run.train_rows)} problems, {world()} rank(s) x B={a.batch_size}, M={a.num_samples}, "
           f"G={a.group_size}{', FSDP2' if fsdp else ''}) -> {a.output_dir}")
    return run


def load_inputs(a):
    """The data, the roles of the models, the tokenizer and a checkpoint's trainer state, each checked (BadInput)
    before any model is loaded -> a dict for the run."""
    train_rows = training_problems(a.dataset)
    eval_rows = load_problems(a.eval_dataset, "test")[:a.eval_size] if a.eval_size else []
    if len(train_rows) < a.batch_size * world():
        raise BadInput(f"--dataset {a.dataset}: {len(train_rows)} problems, fewer than one global batch "
                       f"(--batch_size {a.batch_size} x {world()} ranks)")
    needs = {"codistill": ["small", "large"], "kdrl": ["small", "large"], "grpo": [a.policy]}[a.algo]  # loaded
    trained = {"codistill": ["small", "large"], "kdrl": ["small"], "grpo": [a.policy]}[a.algo]  # updated
    prefix = {n: ("policy" if a.algo == "grpo" else n) for n in needs}  # metric and checkpoint names
    names = {"small": a.small_model, "large": a.large_model}
    state = load_trainer_state(a.resume, [prefix[n] for n in trained]) if a.resume else None
    total_steps = a.max_steps or a.epochs * (len(train_rows) // (a.batch_size * world()))
    if state and total_steps < state["iteration"]:
        raise BadInput(f"--max_steps {total_steps} is below iteration {state['iteration']}, where {a.resume} stopped")
    kept_rows = rows_to_keep(a, state["iteration"]) if state else None
    if state:  # the trained models continue from the checkpoint; a frozen one comes from where it came from
        names.update({n: os.path.join(a.resume, prefix[n]) for n in trained})
    tokenizer = load_tokenizer(names[needs[0]])
    if len(needs) == 2:
        check_same_tokens(tokenizer, load_tokenizer(names["large"]), names["small"], names["large"])
    if a.chat_template:
        end_of_turn_id(tokenizer)  # a tokenizer without a chat template fails here, before any model is loaded
    return dict(train_rows=train_rows, eval_rows=eval_rows, needs=needs, trained=trained, prefix=prefix, names=names,
                state=state, tokenizer=tokenizer, total_steps=total_steps, kept_rows=kept_rows)


def open_outputs(run):
    """args.json, metrics.jsonl and rollouts.jsonl (rank 0 writes the run's files). A resumed run keeps the rows up
    to its checkpoint (the later ones it writes again, identically), copied over when it forks into another folder,
    and resumes.jsonl records each resume: from where, and which flags changed."""
    a, run.grade_timeouts, run.metrics_file, run.rollouts_file = run.a, GRADER["timeouts"], None, None
    if rank() != 0:
        return
    write_atomically(os.path.join(a.output_dir, "args.json"), json.dumps(dataclasses.asdict(a), indent=1))
    paths = {name: os.path.join(a.output_dir, f"{name}.jsonl") for name in ["metrics", "rollouts", "resumes"]}
    for name, rows in (run.kept_rows or {}).items():
        write_atomically(paths[name], "".join(json.dumps(r) + "\n" for r in rows))
    if run.state:
        saved = saved_args(a.resume)
        changed = {k: [saved.get(k), v] for k, v in dataclasses.asdict(a).items()
                   if k != "resume" and saved.get(k) != v}
        with open(paths["resumes"], "a") as f:
            f.write(json.dumps(dict(iteration=run.start - 1, checkpoint=a.resume, changed=changed,
                                    time=time.strftime("%Y-%m-%d %H:%M:%S"))) + "\n")
    run.metrics_file, run.rollouts_file = (open(paths[name], "a") for name in ["metrics", "rollouts"])
    run.report = open_reporter(a)


def rows_to_keep(a, iteration):
    """A resumed run's rows of metrics.jsonl, rollouts.jsonl and resumes.jsonl up to the checkpoint's iteration, read
    from the run the checkpoint belongs to (another folder when the run forks); BadInput on a damaged file."""
    source = os.path.dirname(os.path.abspath(a.resume))
    kept = {}
    for name in ["metrics", "rollouts", "resumes"]:
        path = os.path.join(source, f"{name}.jsonl")
        if name == "metrics" and not os.path.exists(path):
            print0(f"note: {path} is missing; the resumed run's metrics.jsonl starts at iteration {iteration + 1}")
        rows = read_jsonl(path, missing_ok=True, numbered=True)
        for line, r in rows:
            if not isinstance(r.get("iteration"), int):
                raise BadInput(f"{path}: line {line} has no iteration")
        kept[name] = [r for _, r in rows if r["iteration"] <= iteration]
    return kept


def next_batch(run, it):
    """This rank's problems of iteration it -> (epoch, rows, their prompts as (B, P) ids and mask). Sampling is seeded
    by (seed, iteration, rank): a resumed run samples what the straight run would have."""
    a = run.a
    epoch, rows = batch_indices(len(run.train_rows), a.batch_size, a.seed, it, rank(), world())
    torch.manual_seed(hash((a.seed, it, rank())) % 2**63)  # (the hash of a tuple of ints is not randomised)
    batch = [run.train_rows[i] for i in rows]
    prompts = encode_prompts(run.tokenizer, [r["problem"] for r in batch], a.template, a.max_prompt_length,
                             run.device, a.chat_template)  # (B, P) each
    return epoch, batch, prompts


def iterations(run):
    """The iterations still to run, with a progress bar (rank 0); a fresh run first logs row 0, the starting
    models' held-out accuracy."""
    if run.start == 1:
        finish_iteration(run, 0, {"iteration": 0})
    run.bar = tqdm(range(run.start, run.total_steps + 1), desc=run.a.algo, dynamic_ncols=True, initial=run.start - 1,
                   total=run.total_steps, disable=rank() != 0)
    yield from run.bar


def finish_iteration(run, it, m, stats=None, table=None):
    """Step 8's machinery. The metrics of each step join the row under its model's name (entropy: the scoring
    pass's, over all M rollouts, where there was one), with the step's time. Then held-out accuracy when due (at
    iteration 0 the starting models', all of them), the row (reduced over the ranks; rank 0 writes it),
    rollouts.jsonl at iteration 1 and with each held-out evaluation, a checkpoint when due, the progress bar. Every
    rank calls it: the reductions are collective."""
    a, p = run.a, run.prefix[run.trained[0]]
    for n, s in (stats or {}).items():
        m.update({f"{run.prefix[n]}/{k}": v for k, v in s.items() if f"{run.prefix[n]}/{k}" not in m})
    if it > 0:  # the step's time (t0: when it began; held-out accuracy not counted), the grader's kills in it
        m.update({f"time/{k}": m.get(f"time/{k}", 0.0) for k in PHASES}, **{"time/step": time.perf_counter() -
                                                                             m.pop("t0")})
        tokens = m[f"{p}/completion_length"] * a.batch_size * a.num_samples  # sampled this iteration, on this rank
        m["tokens_per_s"] = tokens / max(m["time/generate"], 1e-9)
        m["grade_timeouts"], run.grade_timeouts = float(GRADER["timeouts"] - run.grade_timeouts), GRADER["timeouts"]
        if run.device.type == "cuda":  # the peak since the run began, on this rank (the slowest rank's under torchrun)
            m["memory/allocated_gb_max"] = torch.cuda.max_memory_allocated() / 2**30
    evaluate = it == 0 or (a.eval_every and it % a.eval_every == 0) or it == run.total_steps
    if evaluate and run.eval_rows:
        names = run.needs if it == 0 else run.trained
        with generating(run, names):
            for n in names:
                accuracy = heldout_accuracy(run.models[n], run.tokenizer, run.eval_rows, a, run.eos_ids, run.fsdp)
                m.update({f"{run.prefix[n]}/{k}": v for k, v in accuracy.items()})
        run.grade_timeouts = GRADER["timeouts"]  # kills while grading held-out answers are not the iteration's
    m = reduce_metrics(m)
    if rank() == 0:
        write_row(run.metrics_file, m)
        if table is not None and (evaluate or it == 1):
            for row in table():
                write_row(run.rollouts_file, dict(iteration=it, **row))
        run.report(m, it)
    if it > 0 and ((a.save_every and it % a.save_every == 0) or it == run.total_steps):
        save_checkpoint({run.prefix[n]: run.scorers[n] for n in run.trained},
                        {run.prefix[n]: run.optims[n] for n in run.trained}, run.tokenizer, a, it)
    if it > 0:
        run.bar.set_postfix({k.split("/")[-1][:8]: f"{v:.3f}" for k, v in m.items() if k in (
            f"{p}/accuracy", f"{p}/zero_accuracy_frac", f"{p}/test_accuracy", "time/step")})
    if rank() == 0 and any(k.endswith("test_accuracy") for k in m):
        tqdm.write(f"iteration {it}: " + " ".join(f"{k} {v:.3f}" for k, v in m.items() if k.endswith("test_accuracy")))


def write_row(f, row):
    """One JSON line, flushed. Non-finite floats are written as null, so the file stays valid JSON (strict readers
    reject NaN); a guard upstream should have stopped them, so each is reported."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        tqdm.write(f"warning: iteration {row.get('iteration')}: non-finite {', '.join(bad)} written as null",
                   file=sys.stderr)
    f.write(json.dumps({k: None if k in bad else v for k, v in row.items()}, allow_nan=False) + "\n")
    f.flush()


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    """Args from the command line: dataclass defaults < preset < (with --resume) the run's saved args < flags given."""
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
    if given.get("resume"):
        output_dir = given.get("output_dir", base.get("output_dir", Args.output_dir))
        ckpt = find_checkpoint(output_dir if given["resume"] == "latest" else given["resume"])
        base = saved_args(ckpt)
        changed = [f"--{k} {base[k]!r} -> {v!r}" for k, v in given.items() if k not in RESUMABLE and base.get(k) != v]
        if changed:  # args.json, and eval.py's grouping of runs, must describe the whole run
            raise BadInput(f"--resume {ckpt}: a resumed run keeps the settings that define it; these differ from "
                           f"its args.json: {', '.join(changed)} (start a new run to change them)")
        base.update(output_dir=os.path.dirname(os.path.abspath(ckpt)), resume=ckpt)
        given.pop("resume")
    return Args(**{**base, **given})


# What a resumed run may change: how long it runs, how often it evaluates and saves, how it fits in memory, where it
# writes (another --output_dir forks the run). Everything else defines the run and stays as saved.
RESUMABLE = {"max_steps", "eval_every", "eval_size", "save_every", "keep_checkpoints", "report_to", "grade_timeout",
             "micro_batch_size", "gen_batch_size", "logprob_chunk", "gradient_checkpointing", "fsdp", "cache_dir",
             "output_dir", "overwrite", "dist_timeout", "preset", "resume"}


def saved_args(ckpt):
    """The arguments a checkpoint was saved with (its args.json), BadInput when they cannot be read."""
    path = os.path.join(ckpt, "args.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        assert isinstance(saved, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError) as e:
        raise BadInput(f"--resume {ckpt}: {path} cannot be read ({type(e).__name__})") from None
    return {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Args)}}


def check_args(a):
    """Reject bad settings before anything is loaded or deleted; each message names the flag."""
    for f in dataclasses.fields(Args):  # NaN and inf are never a setting
        v = getattr(a, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise BadInput(f"--{f.name} must be a finite number, got {v}")
    for name in ["batch_size", "micro_batch_size", "gen_batch_size", "logprob_chunk", "epochs", "max_prompt_length",
                 "max_completion_length", "temperature", "grade_timeout", "max_grad_norm", "dist_timeout"]:
        if getattr(a, name) <= 0:
            raise BadInput(f"--{name} must be > 0, got {getattr(a, name)}")
    for name in ["lr_small", "lr_large"]:  # a frozen large model is --algo kdrl, not lr 0
        if getattr(a, name) <= 0:
            raise BadInput(f"--{name} must be > 0, got {getattr(a, name)} (to train the small model with the large "
                           "one frozen, use --algo kdrl)")
    for name in ["alpha", "weight_decay", "hint_tokens", "max_steps", "eval_size", "eval_every", "save_every",
                 "keep_checkpoints", "tiny_warmup_small", "tiny_warmup_large", "tiny_noisy_small", "eval_temperature"]:
        if getattr(a, name) < 0:
            raise BadInput(f"--{name} must be >= 0, got {getattr(a, name)}")
    M, G, N, T = a.num_samples, a.group_size, a.max_completion_length, a.hint_tokens
    if G < 2 or G % 2:
        raise BadInput(f"--group_size must be even and >= 2 (G/2 highest and G/2 lowest are kept), got {G}")
    if G > M:
        raise BadInput(f"--group_size G={G} must be <= --num_samples M={M}")
    if T >= N:
        raise BadInput(f"--hint_tokens T={T} must be < --max_completion_length N={N}")
    if T > 0 and a.algo == "grpo":
        raise BadInput("--hint_tokens needs a large model to write hints: use --algo codistill or kdrl")
    if not 0 <= a.clip_eps < 1:
        raise BadInput(f"--clip_eps must be in [0, 1), got {a.clip_eps}")
    if not 0 <= a.warmup_ratio <= 1:
        raise BadInput(f"--warmup_ratio must be in [0, 1], got {a.warmup_ratio}")
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(a.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise BadInput(f"--report_to {a.report_to}: the {package} package is not installed (pip install {package})")


def main(argv=None):
    a = None
    try:
        a = parse_args(argv)
        with one_run_at_a_time(a.output_dir):
            train(a)
    except BadInput as e:
        if rank() == 0:  # under torchrun every rank finds the same problem
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if rank() == 0:
            print(f"\ninterrupted{'' if a is None else ': ' + where_it_stopped(a.output_dir)}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def where_it_stopped(run_dir):
    """One line for an interrupted run: the last iteration in metrics.jsonl and the checkpoint --resume would take."""
    try:
        rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"), missing_ok=True)
        found = [c for c in checkpoints_in(run_dir) if not checkpoint_problem(c)] if os.path.isdir(run_dir) else []
    except BadInput:
        rows, found = [], []
    last = f"metrics.jsonl has iterations up to {rows[-1].get('iteration')}" if rows else "no metrics rows yet"
    return f"{last}; {'newest checkpoint ' + found[-1] + ' (continue with --resume)' if found else 'no checkpoint'}"


if __name__ == "__main__":
    main()
