"""
CoDistill-GRPO: a small and a large language model trained together with GRPO, in one readable file.

Paper: "CoDistill-GRPO: A Co-Distillation Recipe for Efficient Group Relative Policy Optimization" (2026).
Equation numbers in comments, `# Eq. (N)`, are the paper's. One iteration, per rank, B prompts:

    small model samples M completions per prompt (the large model writes the first T tokens in epoch 1)
    -> rewards r (accuracy + format) -> log-probs of both models, no grad
    -> KD reward r~ = r + alpha * (1/N) sum_t (log pi_large - log pi_small)       Eq. (6)
    -> keep the G/2 highest and G/2 lowest r~ of the M                           Sec. 3.3
    -> small step: A~ = r~ - mean(r~), clipped ratio pi_small / pi_small_old     Eq. (7), (5)
    -> large step: A = (r - mean r) / std r, clipped ratio pi_large / pi_small_old  Eq. (3), (10)

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
  end of Sec. 3.1); `--hint_ratio large|ignore` gives the two alternatives of Eq. (8) and Appendix C. The large
  model's loss is Eq. (10) on every token.
- One optimizer step per model per batch (so pi_old is the model that sampled), no reference model (beta = 0).
- `--lr_small` and `--lr_large` are separate (both 5e-6 in the paper).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm


GRADE_TIMEOUT_S = 5.0  # default hard limit of one grading call, in seconds


class BadInput(Exception):
    """Bad user input: main() prints the one-line message and exits with status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments and presets. The defaults are the paper's Qwen setting (Appendix B, Table 3).


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
    eval_size: int = arg(500, "number of held-out problems scored (greedy); 0 disables evaluation")
    eval_every: int = arg(20, "score held-out accuracy every this many iterations (and at 0 and the end)")
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
    seed: int = arg(0, "random seed (data order, sampling)")
    save_every: int = arg(100, "save a checkpoint every this many iterations (and at the end); 0 = only at the end")
    keep_checkpoints: int = arg(3, "keep only the newest this many checkpoints; 0 keeps all")
    resume: str = arg("", "continue a run: alone, from the newest complete checkpoint in --output_dir; or from PATH "
                      "(a checkpoint or run folder). Its saved arguments are the defaults; flags given still win",
                      nargs="?", const="latest")
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
        output_dir="runs/tiny", dtype="float32", tiny_warmup_small=350, tiny_warmup_large=600),
}


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
        with open(os.path.join(ckpt, "args.json")) as f:
            base = {k: v for k, v in json.load(f).items() if k in {f.name for f in dataclasses.fields(Args)}}
        base.update(output_dir=os.path.dirname(os.path.abspath(ckpt)), resume=ckpt)
        given.pop("resume")
    return Args(**{**base, **given})


def check_args(a):
    """Reject bad settings before anything is loaded."""
    M, G, N, T = a.num_samples, a.group_size, a.max_completion_length, a.hint_tokens
    if G < 2 or G % 2:
        raise BadInput(f"--group_size must be even and >= 2 (G/2 highest and G/2 lowest are kept), got {G}")
    if G > M:
        raise BadInput(f"--group_size G={G} must be <= --num_samples M={M}")
    if a.alpha < 0:
        raise BadInput(f"--alpha must be >= 0, got {a.alpha}")
    if N < 1 or not 0 <= T < N:
        raise BadInput(f"--hint_tokens T={T} must be >= 0 and < --max_completion_length N={N}")
    if T > 0 and a.algo == "grpo":
        raise BadInput("--hint_tokens needs a large model to write hints: use --algo codistill or kdrl")
    if not 0 <= a.clip_eps < 1:
        raise BadInput(f"--clip_eps must be in [0, 1), got {a.clip_eps}")
    if a.temperature <= 0:
        raise BadInput(f"--temperature must be > 0, got {a.temperature}")
    for name in ["batch_size", "micro_batch_size", "gen_batch_size", "logprob_chunk", "epochs", "max_prompt_length"]:
        if getattr(a, name) < 1:
            raise BadInput(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.grade_timeout <= 0:
        raise BadInput(f"--grade_timeout must be > 0, got {a.grade_timeout}")
    for name in ["max_steps", "eval_size", "eval_every", "save_every", "keep_checkpoints", "tiny_warmup_small",
                 "tiny_warmup_large"]:
        if getattr(a, name) < 0:
            raise BadInput(f"--{name} must be >= 0, got {getattr(a, name)}")


# ----------------------------------------------------------------------------------------------------------------
# Data, prompts and rewards (Appendix B, Tables 4 and 5)

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


def accuracy_reward(completion, gold, template, timeout=GRADE_TIMEOUT_S):
    """1.0 when the completion's final answer equals the gold answer (math-verify), else 0.0 (see grade_batch)."""
    return grade_batch([completion], [gold], template, timeout)()[0]


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
    The final answer is extracted first: r1, the text inside the last <answer>...</answer>; boxed, the content of
    the last \\boxed{} (math-verify alone would take the first). It is wrapped in $...$ when it has no delimiters
    and parsed as LaTeX only: math-verify's plain-expression parser would hand model text to sympy's parse_expr,
    which calls eval."""
    from math_verify import LatexExtractionConfig, parse, verify
    if template == "r1":
        answers = ANSWER_TAG.findall(completion)
        answer = answers[-1].strip() if answers else None
    else:
        answer = last_boxed(completion)
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


# Hub datasets we know how to read: id -> (config, {use: splits}, problem column, answer of a row). Any other id
# is read with its default config, split 'train' or 'test', and columns 'problem' and 'answer'.
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
    """-> list of {'problem', 'answer'} from a local JSON/JSONL file or a hub dataset (BadInput on a bad row)."""
    if os.path.isfile(name):
        with open(name) as f:
            text = f.read()
        try:
            rows = json.loads(text) if name.endswith(".json") else [json.loads(l) for l in text.splitlines() if l.strip()]
        except json.JSONDecodeError as e:
            raise BadInput(f"dataset {name}: not valid JSON ({e})") from None
        where = name
    else:
        import datasets
        config, splits, pcol, answer_of = HUB_DATASETS.get(name, (None, {}, "problem", lambda r: r["answer"]))
        splits = splits.get(split, [split])
        try:
            parts = [datasets.load_dataset(name, config, split=s) for s in splits]
        except Exception as e:
            raise BadInput(f"dataset {name}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        rows = [{"problem": r.get(pcol), "answer": answer_or_none(answer_of, r)} for p in parts for r in p]
        where = f"{name} ({'+'.join(splits)})"
    if not isinstance(rows, list) or not rows:
        raise BadInput(f"dataset {where}: no rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not str(r.get("problem") or "").strip() or r.get("answer") in (None, ""):
            raise BadInput(f"dataset {where}: row {i} has no 'problem' or no 'answer'")
    rows = [{"problem": str(r["problem"]), "answer": str(r["answer"])} for r in rows]
    return rows


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


# ----------------------------------------------------------------------------------------------------------------
# The tiny offline world: a tokenizer, two Qwen2 models and 2-digit additions, built locally and saved, so that
# `--preset tiny` goes through the same from_pretrained path as real models.

TINY_CONFIGS = {  # small ~0.5M params, large ~4M params
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "large": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
}
TINY_WARMUP_LR = {"small": 3e-3, "large": 1e-3}
TINY_EOS = "<|endoftext|>"  # EOS and pad are the same token, as in Qwen2.5 base models


def tiny_problems(seed, n_test=500):
    """All a + b with a, b in 10..99, shuffled by seed; the first n_test are the held-out test set."""
    rows = [{"problem": f"What is {a} + {b}", "answer": str(a + b)} for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(rows)
    return rows[n_test:], rows[:n_test]


def tiny_solution(row):
    return f" \\boxed{{{row['answer']}}}"  # 6 tokens + EOS: short answers learn fast


def build_tiny_tokenizer(rows):
    """A byte-level BPE tokenizer (digits kept single) trained on the task's prompts and solutions."""
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
    tok.add_special_tokens([TINY_EOS])  # last id, as in Qwen: id 0 is an ordinary token ("!")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_EOS, pad_token=TINY_EOS)


def warmup(model, tokenizer, rows, template, steps, lr, seed, batch_size=64):
    """Supervised warm-up on prompt + solution (loss on the solution and its EOS): random weights -> a base model.
    AdamW (0.9, 0.98), linear lr warm-up over the first 5% of the steps then constant, grad-norm clip 1."""
    g = random.Random(seed)
    data = [(tokenizer(TEMPLATES[template].format(prompt=r["problem"]))["input_ids"],
             tokenizer(tiny_solution(r))["input_ids"] + [tokenizer.eos_token_id]) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(1, steps // 20)))
    pad = tokenizer.pad_token_id
    model.train()
    for _ in tqdm(range(steps), desc="warm-up", leave=False, disable=steps < 50):
        batch = g.choices(data, k=batch_size)
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


def build_tiny_world(cache_dir, seed, warmup_steps=(0, 0)):
    """Build once (cached, keyed by its settings) the tiny tokenizer, data and models, warmed up for
    warmup_steps = (small, large) supervised steps -> paths {'small', 'large', 'train', 'test'}."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    settings = [TINY_CONFIGS, seed, list(warmup_steps), TINY_WARMUP_LR, "v3"]  # bump when the world changes
    key = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:10]
    root = os.path.join(cache_dir, f"tiny-{key}")
    paths = {name: os.path.join(root, name) for name in ["small", "large"]}
    paths.update(train=os.path.join(root, "train.jsonl"), test=os.path.join(root, "test.jsonl"))
    if os.path.exists(os.path.join(root, "DONE")):
        print0(f"tiny offline world: {root} (cached)")
        return paths
    print(f"building the tiny offline world in {root}")
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    train, test = tiny_problems(seed)
    for split, rows in [("train", train), ("test", test)]:
        with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    tokenizer = build_tiny_tokenizer(train)
    for (name, cfg), steps in zip(TINY_CONFIGS.items(), warmup_steps):
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **cfg)
        model = warmup(Qwen2ForCausalLM(config), tokenizer, train, "boxed", steps, TINY_WARMUP_LR[name], seed)
        model.save_pretrained(os.path.join(tmp, name))
        tokenizer.save_pretrained(os.path.join(tmp, name))
    open(os.path.join(tmp, "DONE"), "w").close()
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return paths


def resolve_tiny(a):
    """Replace the preset's 'tiny:NAME' placeholders by the paths of the built tiny world."""
    fields = ["small_model", "large_model", "dataset", "eval_dataset"]
    if any(getattr(a, f).startswith("tiny:") for f in fields):
        build = lambda: build_tiny_world(a.cache_dir, a.tiny_seed, (a.tiny_warmup_small, a.tiny_warmup_large))
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
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
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


# ----------------------------------------------------------------------------------------------------------------
# Rollouts


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
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True)
    P, outs = prompt_ids.shape[1], []
    with torch.inference_mode():
        for i in range(0, len(prompt_ids), batch_size):
            out = model.generate(input_ids=prompt_ids[i:i + batch_size], attention_mask=prompt_mask[i:i + batch_size],
                                 generation_config=config, synced_gpus=synced)
            outs.append(out[:, P:])
    model.train(was_training)
    return pad_right(outs, pad_id)  # made outside inference mode: a normal tensor, which autograd may save


def decode(tokenizer, completion_ids, mask):
    """Texts of the completions, each up to its mask's length (so up to and including its first EOS)."""
    return [tokenizer.decode(c[:n], skip_special_tokens=True) for c, n in zip(completion_ids, mask.sum(1).tolist())]


def pad_right(seqs, pad_id):
    """List of (s_i, L_i) or 1-D tensors -> one (sum s_i, max L_i) tensor padded on the right."""
    seqs = [s if s.dim() == 2 else s[None] for s in seqs]
    L = max(s.shape[1] for s in seqs)
    return torch.cat([F.pad(s, (0, L - s.shape[1]), value=pad_id) for s in seqs])


def rollout(small, large, prompt_ids, prompt_mask, a, eos_ids, pad_id, hints, synced=False):
    """M completions per prompt from the small model; with hints, the large model writes their first T tokens.

    -> completion ids (B*M, L), completion mask (B*M, L), hint mask (B*M, L): 1 on the large model's tokens.
    """
    M, N, T = a.num_samples, a.max_completion_length, a.hint_tokens
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(M, 0), prompt_mask.repeat_interleave(M, 0)  # (B*M, P)
    if not hints:
        comp = sample(small, prompt_ids, prompt_mask, N, a.temperature, eos_ids, pad_id, a.gen_batch_size, synced)
        return comp, completion_mask(comp, eos_ids), torch.zeros_like(comp)
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
    hint_mask = (torch.arange(comp.shape[1], device=comp.device)[None] < torch.tensor(hint_len, device=comp.device)[:, None])
    return comp, completion_mask(comp, eos_ids), hint_mask.long()


# ----------------------------------------------------------------------------------------------------------------
# Token log-probs: fp32 log-softmax at the sampling temperature, in chunks of tokens so that a (S, L, vocab) fp32
# tensor never exists; with grad, each chunk's logits are recomputed in the backward pass instead of stored.


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


@torch.no_grad()
def score(scorer, prompt_ids, prompt_mask, comp, mask, a):
    """Old-policy log-probs of all sequences, in micro-batches, no grad: scorer is a model's TokenLogprobs
    (maybe wrapped, see parallelize) -> log-probs (S, L), and the mean entropy per completion token (a float)."""
    was_training = scorer.training
    scorer.eval()
    mb = a.micro_batch_size
    out = [scorer(prompt_ids[i:i + mb], prompt_mask[i:i + mb], comp[i:i + mb], mask[i:i + mb], a.temperature,
                  a.logprob_chunk) for i in range(0, len(comp), mb)]
    scorer.train(was_training)
    entropy = torch.cat([o[1] for o in out])  # (S, L)
    return torch.cat([o[0] for o in out]), ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()


# ----------------------------------------------------------------------------------------------------------------
# Distributed (torchrun): one process per device, B prompts each. Without torchrun's variables, one process and
# every helper below is a no-op.


def setup_distributed():
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when RANK is set -> this rank's device."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
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
def generating(scorers):
    """FSDP2 around generate(), which runs the inner model and not the root's forward: the root unit's parameters
    (embeddings, norm, head) are gathered here, and each layer keeps its parameters gathered from its first
    decoding step to the end, rather than gathering them again at every token. Elsewhere a no-op."""
    from torch.distributed.fsdp import FSDPModule
    roots = [s for s in scorers if isinstance(s, FSDPModule)]
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


# ----------------------------------------------------------------------------------------------------------------
# The paper's equations, as pure functions


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
    """Rewards minus their group mean, optionally divided by the group's (unbiased) std + 1e-4: (B, G) -> (B, G)."""
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


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step on one model


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


def update(scorer, opt, sched, prompt_ids, prompt_mask, comp, mask, logp_old, advantages, a, keep_logp=False,
           loss_mask=None, own=None):
    """One clipped policy-gradient step over this rank's S sequences in micro-batches -> metrics. The loss of each
    micro-batch is weighted by its share of S, so the accumulated gradient is that of the mean over S sequences;
    DDP / FSDP2 average it over the ranks (equal S each): the mean over the global batch.

    mask (S, L): the completion tokens the model sees (attention); loss_mask (S, L, default mask): the tokens that
    count in the loss (hint tokens left out by --hint_ratio ignore are still seen).
    logp_old (S, L), the denominator of the ratio. None: the model itself sampled the sequences just before this one
    step, so pi_old is the model as it is, and its log-probs are this forward pass's, detached: no separate scoring
    pass (grpo). own (S, L): the same, token by token (the large model's own hint tokens, --large_hint_ratio).
    keep_logp: the metrics also hold 'logp', the model's log-probs before the step (S, L), no grad."""
    scorer.train()
    S, mb, eps = len(comp), a.micro_batch_size, a.clip_eps
    max_len = a.max_completion_length if loss_norm(a) == "constant" else None  # Eq. (5), (10) / Eq. (2)
    loss_mask = mask if loss_mask is None else loss_mask
    stats = dict(loss=0.0, ratio_sum=0.0, ratio_max=0.0, low=0.0, high=0.0, region=0.0, entropy=0.0, tokens=0.0,
                 seen=0.0)  # tokens: in the loss; seen: in the attention mask (entropy is over these)
    kept = []
    for i in range(0, S, mb):
        j = slice(i, i + mb)
        last = i + mb >= S  # DDP: gradients are averaged once, after the last micro-batch
        with scorer.no_sync() if hasattr(scorer, "no_sync") and not last else nullcontext():
            logp, entropy = scorer(prompt_ids[j], prompt_mask[j], comp[j], mask[j], a.temperature,
                                   a.logprob_chunk)  # (mb, L) each
            old = logp.detach() if logp_old is None else logp_old[j]  # (mb, L)
            if own is not None:
                old = torch.where(own[j].bool(), logp.detach(), old)  # (mb, L)
            kept += [logp.detach()] if keep_logp else []
            loss = policy_loss(logp, old, advantages[j], loss_mask[j], max_len, eps) * (len(logp) / S)
            loss.backward()
        with torch.no_grad():
            lm = loss_mask[j]
            ratio = torch.exp((logp - old).clamp(-20.0, 20.0))  # (mb, L)
            n = lm.sum().item()
            fractions = clip_fractions(ratio, advantages[j], lm, eps)
            stats["loss"] += loss.item()
            stats["ratio_sum"] += (ratio * lm).sum().item()
            stats["ratio_max"] = max(stats["ratio_max"], ratio[lm.bool()].max().item() if n else 0.0)
            for k, f in zip(["low", "high", "region"], fractions):
                stats[k] += f * n
            stats["entropy"] += (entropy * mask[j]).sum().item()
            stats["tokens"] += n
            stats["seen"] += mask[j].sum().item()
    grad_norm = torch.nn.utils.clip_grad_norm_(scorer.parameters(), a.max_grad_norm)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP2: DTensor
    lr = sched.get_last_lr()[0]
    skipped = not math.isfinite(grad_norm)  # a NaN/inf loss or gradient: skip the step, keep the weights
    if skipped:
        tqdm.write(f"warning: non-finite gradient norm ({grad_norm}); this model's step is skipped")
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


def loss_norm(a):
    """'constant' (1/N: Eq. 5, 10) or 'length' (1/|o_i|: Eq. 2) -- --loss_norm, with auto resolved by --algo."""
    if a.loss_norm != "auto":
        return a.loss_norm
    return "length" if a.algo == "grpo" else "constant"


# ----------------------------------------------------------------------------------------------------------------
# Held-out accuracy (greedy), checkpoints, logging


@torch.inference_mode()
def complete(model, tokenizer, problems, template, max_new_tokens, max_prompt_length, eos_ids, batch_size,
             temperature=0.0, synced=False, chat=False):
    """Completion texts (up to the first EOS) for a list of problems: greedy when temperature == 0, else sampled
    at that temperature with top_k=0, top_p=1. Shared by the trainer's held-out accuracy and eval.py."""
    from transformers import GenerationConfig
    was_training = model.training
    model.eval()
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
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
    """Greedy accuracy on held-out problems (the paper's Figure 3). Under torchrun each rank scores every
    world()-th problem; the shares are padded to one length (padding not counted) so that ranks stay in step."""
    R, W = rank(), world()
    idx = list(range(R, -(-len(rows) // W) * W, W))  # this rank's problems; indices past the end are padding
    texts = complete(model, tokenizer, [rows[i % len(rows)]["problem"] for i in idx], a.template,
                     a.max_completion_length, a.max_prompt_length, eos_ids, a.gen_batch_size, synced=synced,
                     chat=a.chat_template)
    scores = grade_batch(texts, [rows[i % len(rows)]["answer"] for i in idx], a.template, a.grade_timeout)()
    correct = sum(s for s, i in zip(scores, idx) if i < len(rows))
    return all_reduce([correct])[0] / len(rows)


def lm_of(scorer):
    """The Hugging Face model inside a (maybe DDP-wrapped) TokenLogprobs."""
    return getattr(scorer, "module", scorer).lm


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
    """The checkpoint to resume from: PATH itself, or the newest complete checkpoint of the run in PATH."""
    if not os.path.isdir(path):
        raise BadInput(f"--resume {path}: no such folder")
    if not os.path.exists(os.path.join(path, "trainer_state.pt")):
        found = checkpoints_in(path)
        if not found:
            raise BadInput(f"--resume {path}: no checkpoint-<iteration> folder there")
        path = found[-1]
    for need in ["trainer_state.pt", "args.json"]:
        if not os.path.exists(os.path.join(path, need)):
            raise BadInput(f"--resume {path}: not a complete checkpoint (no {need})")
    return path


def load_trainer_state(ckpt, names):
    """trainer_state.pt of a checkpoint, checked whole before any model is loaded (BadInput otherwise)."""
    try:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    except Exception as e:
        raise BadInput(f"--resume {ckpt}: trainer_state.pt cannot be read ({type(e).__name__}: {str(e)[:150]})")
    for n in names:
        folder = os.path.join(ckpt, n)
        if not os.path.exists(os.path.join(folder, "config.json")) or n not in state["optimizers"]:
            raise BadInput(f"--resume {ckpt}: the {n} model or its optimizer state is missing")
    return state


def prepare_output_dir(a, resuming):
    """Refuse an unwritable folder, and one that holds another run (unless --resume or --overwrite)."""
    probe = os.path.join(a.output_dir, f".write_test{rank()}")
    try:
        os.makedirs(a.output_dir, exist_ok=True)
        write_atomically(probe, "")
        os.remove(probe)
    except OSError as e:
        raise BadInput(f"--output_dir {a.output_dir}: not writable ({e.strerror})")
    previous = [d for d in os.listdir(a.output_dir) if d == "metrics.jsonl" or d.startswith("checkpoint-")]
    if previous and not resuming:
        if not a.overwrite:
            raise BadInput(f"--output_dir {a.output_dir} already holds a run ({', '.join(sorted(previous)[:3])}): "
                           "add --resume to continue it, --overwrite to start afresh, or choose another folder")
        for d in previous if rank() == 0 else []:  # one rank deletes
            path = os.path.join(a.output_dir, d)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


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
# Training


def batch_indices(n_rows, batch_size, seed, iteration, rank=0, world=1):
    """This rank's rows of an iteration (1-based): each epoch is a permutation seeded by (seed, epoch), cut into
    global batches of world x batch_size rows, and rank r takes the r-th share. A pure function of the iteration,
    so that a resumed run sees the same batches. -> (epoch, list of row indices)"""
    global_batch = batch_size * world
    epoch, step = divmod(iteration - 1, n_rows // global_batch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = step * global_batch + rank * batch_size
    return epoch, order[start:start + batch_size].tolist()


def train(a):
    import transformers
    transformers.utils.logging.disable_progress_bar()  # per-shard bars would drown ours
    check_args(a)
    device = setup_distributed()  # torchrun: one process per device; otherwise one process
    R, W = rank(), world()
    fsdp = a.fsdp and dist.is_initialized()
    if a.fsdp and not fsdp:
        print("note: --fsdp takes effect under torchrun; one process trains unsharded")
    resolve_tiny(a)
    # everything the user can get wrong is checked before any model is loaded
    train_rows = training_problems(a.dataset)
    eval_rows = load_problems(a.eval_dataset, "test")[:a.eval_size] if a.eval_size else []
    if len(train_rows) < a.batch_size * W:
        raise BadInput(f"--dataset {a.dataset}: {len(train_rows)} problems, fewer than one global batch "
                       f"(--batch_size {a.batch_size} x {W} ranks)")
    needs = {"codistill": ["small", "large"], "kdrl": ["small", "large"], "grpo": [a.policy]}[a.algo]  # loaded
    trained = {"codistill": ["small", "large"], "kdrl": ["small"], "grpo": [a.policy]}[a.algo]  # updated
    prefix = {n: ("policy" if a.algo == "grpo" else n) for n in needs}  # metric and checkpoint names
    names = {"small": a.small_model, "large": a.large_model}
    state = load_trainer_state(a.resume, [prefix[n] for n in trained]) if a.resume else None
    if state:  # the trained models continue from the checkpoint; a frozen one comes from where it came from
        names.update({n: os.path.join(a.resume, prefix[n]) for n in trained})
    tokenizer = load_tokenizer(names[needs[0]])
    if len(needs) == 2:
        check_same_tokens(tokenizer, load_tokenizer(names["large"]), names["small"], names["large"])
    if a.chat_template:
        end_of_turn_id(tokenizer)  # a tokenizer without a chat template fails here, before any model is loaded
    prepare_output_dir(a, resuming=state is not None)  # every rank checks (and fails alike); rank 0 cleans up
    if dist.is_initialized():
        dist.barrier()

    torch.manual_seed(a.seed)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[a.dtype]
    # FSDP2 keeps fp32 master weights and computes in dtype (its mixed precision); otherwise weights are in dtype
    models = {n: load_model(names[n], torch.float32 if fsdp else dtype, device, a.gradient_checkpointing)
              for n in needs}
    scorers = {n: parallelize(models[n], a, n in trained, dtype) for n in needs}  # log-prob modules, DDP / FSDP2
    eos_ids, pad_id = eos_ids_of(tokenizer, *models.values(), chat=a.chat_template), tokenizer.pad_token_id
    GRADER["timeouts"] = 0

    B, M, G, N = a.batch_size, a.num_samples, a.group_size, a.max_completion_length
    total_steps = a.max_steps or a.epochs * (len(train_rows) // (B * W))
    lrs = {"small": a.lr_small, "large": a.lr_large}
    optims = {n: make_optimizer(scorers[n], lrs[n], a, total_steps) for n in trained}
    if state:
        for n in trained:
            load_optimizer_state(scorers[n], optims[n][0], state["optimizers"][prefix[n]])
            optims[n][1].load_state_dict(state["schedulers"][prefix[n]])
    metrics_path = os.path.join(a.output_dir, "metrics.jsonl")
    if R == 0:  # rank 0 writes the run's files
        with open(os.path.join(a.output_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(a), f, indent=1)
        if state:  # rows written after the checkpoint are written again, identically, by the resumed run
            with open(metrics_path) as f:
                rows = [l for l in f if l.strip().endswith("}") and json.loads(l)["iteration"] <= state["iteration"]]
            write_atomically(metrics_path, "".join(rows))
        metrics_file = open(metrics_path, "a")
        report = open_reporter(a)

    def log(row):  # every rank calls it: the reduction is collective
        row = reduce_metrics(row)
        if R == 0:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            report(row, row["iteration"])
        return row

    def evaluate(names_):  # greedy held-out accuracy, shared out over the ranks
        with generating([scorers[n] for n in names_]):
            return {f"{prefix[n]}/test_accuracy": heldout_accuracy(models[n], tokenizer, eval_rows, a, eos_ids,
                                                                   synced=fsdp) for n in names_} if eval_rows else {}

    start = state["iteration"] + 1 if state else 1
    print0(f"algo {a.algo}: training {', '.join(trained)} for iterations {start}..{total_steps} ({len(train_rows)} "
           f"problems, {W} rank(s) x B={B}, M={M}, G={G}{', FSDP2' if fsdp else ''}) -> {a.output_dir}")
    if not state:
        row = log(dict(iteration=0, **evaluate(needs)))
        print0(" ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "iteration"))

    roller = "small" if "small" in models else a.policy  # the model that samples the rollouts
    bar = tqdm(range(start, total_steps + 1), desc=a.algo, dynamic_ncols=True, initial=start - 1, total=total_steps,
               disable=R != 0)
    for it in bar:
        t_step = time.perf_counter()
        epoch, rows = batch_indices(len(train_rows), B, a.seed, it, R, W)  # this rank's share of the global batch
        batch = [train_rows[i] for i in rows]
        # sampling seeded by (seed, iteration, rank): a resumed run samples what the straight run would have
        torch.manual_seed(hash((a.seed, it, R)) % 2**63)  # (the hash of a tuple of ints is not randomised)
        m = dict(iteration=it, epoch=epoch)

        # 1. rollouts: M completions per prompt from the small model (hint prefixes from the large one in epoch 1)
        t = time.perf_counter()
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [r["problem"] for r in batch], a.template,
                                                 a.max_prompt_length, device, a.chat_template)  # (B, P)
        hints = a.hint_tokens > 0 and epoch == 0
        with generating([scorers[roller]] + ([scorers["large"]] if hints else [])):
            comp, mask, hint_mask = rollout(models[roller], models.get("large"), prompt_ids, prompt_mask, a,
                                            eos_ids, pad_id, hints, synced=fsdp)  # (B*M, L) each
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(M, 0), prompt_mask.repeat_interleave(M, 0)  # (B*M, P)
        m["time/generate"] = time.perf_counter() - t

        # 2. grading starts in the worker process, and goes on while the log-probs are scored
        t = time.perf_counter()
        texts = decode(tokenizer, comp, mask)
        timeouts = GRADER["timeouts"]
        grades = grade_batch(texts, [r["answer"] for r in batch for _ in range(M)], a.template, a.grade_timeout)
        m["time/reward"] = time.perf_counter() - t

        # 3. scoring: old log-probs, no grad (grpo needs none: see update). With M == G the large model learns from
        #    every rollout, so its step can come first (5) and its own forward pass gives its old log-probs.
        fused = a.algo == "codistill" and M == G
        t = time.perf_counter()
        if a.algo != "grpo":
            logp_small_old, m["small/entropy"] = score(scorers["small"], prompt_ids, prompt_mask, comp, mask,
                                                       a)  # (B*M, L)
        if a.algo != "grpo" and not fused:
            logp_large_old, m["large/entropy"] = score(scorers["large"], prompt_ids, prompt_mask, comp, mask,
                                                       a)  # (B*M, L)
        m["time/score"] = time.perf_counter() - t

        # 4. rewards r: accuracy (+ format for r1)
        t = time.perf_counter()
        acc = torch.tensor(grades(), device=device)  # (B*M,)  waits for the grader, if it is still at work
        fmt = torch.tensor([format_reward(x) if a.template == "r1" else 0.0 for x in texts], device=device)
        rewards = acc + fmt  # (B*M,)
        m["time/reward"] += time.perf_counter() - t
        m["grade_timeouts"] = float(GRADER["timeouts"] - timeouts)

        # 5. (M == G) the large step of 9, on all M rollouts, before the small step: the two are independent
        for n in ["small", "large"]:
            m[f"time/update_{n}"] = 0.0
        # the large model's ratio on the hint tokens it sampled: against itself (behaviour) or pi_phi_old (Eq. 10)
        large_own = hint_mask if a.large_hint_ratio == "behaviour" else None  # (B*M, L)
        if fused:
            t = time.perf_counter()
            adv = group_advantages(rewards.view(B, M), scale_by_std=True).reshape(-1)  # (B*M,)  Eq. (3)
            stats_large = update(scorers["large"], *optims["large"], prompt_ids, prompt_mask, comp, mask,
                                 logp_small_old, adv, a, keep_logp=True, own=large_own)  # Eq. (10)
            logp_large_old = stats_large.pop("logp")  # (B*M, L)  log pi_theta_old: its forward before the step
            m["time/update_large"] = time.perf_counter() - t

        # 6. the KD reward r~ of Eq. (6), and downsampling by r~ (Sec. 3.3; grpo: by r)
        if a.algo == "grpo":
            rewards_kd = rewards
        else:
            kd = kd_reward(logp_large_old, logp_small_old, mask, N)  # (B*M,)
            rewards_kd = rewards + a.alpha * kd  # (B*M,)  Eq. (6)
            m["small/kd_reward"] = kd.mean().item()
        keep = downsample(rewards_kd.view(B, M), G)  # (B, G)
        flat = (keep + torch.arange(B, device=keep.device)[:, None] * M).reshape(-1)  # (B*G,) rows into B*M
        k_prompt, k_pmask, k_comp, k_mask = prompt_ids[flat], prompt_mask[flat], comp[flat], mask[flat]
        if a.algo != "grpo":  # how far apart the two models are on the kept tokens: Eq. (6)'s summand, mean per token
            m["small/kd_log_ratio"] = ((logp_large_old - logp_small_old)[flat] * k_mask).sum().item() / max(
                k_mask.sum().item(), 1)

        # 7. advantages over the kept G
        r_kept = rewards[flat].view(B, G)  # (B, G)
        adv_large = group_advantages(r_kept, scale_by_std=True).reshape(-1)  # (B*G,)  Eq. (3)
        adv_small = group_advantages(rewards_kd[flat].view(B, G), scale_by_std=False).reshape(-1)  # Eq. (7)

        # 8. small step, Eq. (5)  (grpo: the one model's step, Eq. (10) with rho relative to itself)
        if a.algo == "grpo":
            t = time.perf_counter()
            stats = update(scorers[a.policy], *optims[a.policy], k_prompt, k_pmask, k_comp, k_mask, None,
                           adv_large, a)  # on-policy: pi_old is the model itself
            m[f"time/update_{a.policy}"] = time.perf_counter() - t
        else:
            t = time.perf_counter()
            hint_kept = k_mask * hint_mask[flat]  # (B*G, L)
            small_old = logp_small_old[flat]  # (B*G, L)
            small_loss_mask = k_mask
            if a.hint_ratio == "large":  # Eq. (8) option (i): hint tokens weighted against the large model
                small_old = torch.where(hint_kept.bool(), logp_large_old[flat], small_old)
            elif a.hint_ratio == "ignore":  # option (ii): hint tokens left out of the small loss (still seen)
                small_loss_mask = k_mask * (1 - hint_kept)
            stats = update(scorers["small"], *optims["small"], k_prompt, k_pmask, k_comp, k_mask, small_old,
                           adv_small, a, loss_mask=small_loss_mask)
            stats.pop("entropy")  # the scoring pass gave it, over all M rollouts
            m["time/update_small"] = time.perf_counter() - t
            # 9. large step, Eq. (10): rho = pi_theta / pi_phi_old, the original-reward advantages of Eq. (3)
            if a.algo == "codistill" and not fused:
                t = time.perf_counter()
                stats_large = update(scorers["large"], *optims["large"], k_prompt, k_pmask, k_comp, k_mask,
                                     logp_small_old[flat], adv_large, a,
                                     own=None if large_own is None else large_own[flat])
                stats_large.pop("entropy")  # the scoring pass gave it, over all M rollouts
                m["time/update_large"] = time.perf_counter() - t
            if a.algo == "codistill":
                m.update({f"large/{k}": v for k, v in stats_large.items()})
        p = "policy" if a.algo == "grpo" else "small"  # the model whose rollouts these are
        m.update({f"{p}/{k}": v for k, v in stats.items()})

        # metrics of the iteration's rollouts
        lengths = mask.sum(1).float()  # (B*M,)
        m[f"{p}/accuracy"] = acc.mean().item()
        m[f"{p}/zero_accuracy_frac"] = (acc.view(B, M).sum(1) == 0).float().mean().item()
        m[f"{p}/reward"] = rewards.mean().item()
        if a.template == "r1":
            m[f"{p}/format_reward"] = fmt.mean().item()
        m[f"{p}/completion_length"] = lengths.mean().item()
        ended = torch.isin(comp, torch.tensor(eos_ids, device=device)).any(1)  # (B*M,)
        m[f"{p}/truncated_frac"] = 1.0 - ended.float().mean().item()  # stopped at N tokens without EOS
        m[f"{p}/empty_frac"] = (ended & (lengths <= 1)).float().mean().item()  # EOS first: an empty answer
        m[f"{p}/equal_reward_groups_frac"] = (r_kept.std(1) == 0).float().mean().item()  # zero advantages
        if a.algo != "grpo":
            m["large/accuracy"] = acc[flat].mean().item()  # the rollouts the large model learns from
        if hints:
            m["small/hint_length"] = hint_mask.sum(1).float().mean().item()
        m["time/step"] = time.perf_counter() - t_step
        m["tokens_per_s"] = lengths.sum().item() / max(m["time/generate"], 1e-9)

        if (a.eval_every and it % a.eval_every == 0) or it == total_steps:
            m.update(evaluate(trained))
        m = log(m)  # before the checkpoint: a crash in between re-runs this iteration on resume, no row is lost
        if (a.save_every and it % a.save_every == 0) or it == total_steps:
            save_checkpoint({prefix[n]: scorers[n] for n in trained}, {prefix[n]: optims[n] for n in trained},
                            tokenizer, a, it)
        bar.set_postfix({k.split("/")[-1][:8]: f"{v:.3f}" for k, v in m.items()
                         if k in (f"{p}/accuracy", f"{p}/zero_accuracy_frac", f"{p}/test_accuracy", "time/step")})
        if R == 0 and ("small/test_accuracy" in m or "policy/test_accuracy" in m):
            tqdm.write(f"iteration {it}: " + " ".join(f"{k} {v:.3f}" for k, v in m.items() if k.endswith("test_accuracy")))
    if R == 0:
        metrics_file.close()
    return models


def main(argv=None):
    try:
        a = parse_args(argv)
        train(a)
    except BadInput as e:
        if rank() == 0:  # under torchrun every rank finds the same problem
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
