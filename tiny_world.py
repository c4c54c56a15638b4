"""
tiny_world.py: the tiny offline world behind `--preset tiny`, built on this machine and cached, so that the trainer
goes through the same from_pretrained path as with real models (nanoGPT keeps data/*/prepare.py beside train.py the
same way). The trainer imports this file only when a `tiny:` name is asked for.

    python tiny_world.py                          # build the preset's world (or find it cached); print its paths
    python tiny_world.py --seed 3 --json w.json   # build another one; experiments/measure.py --world w.json measures it

The task: 4-digit additions without carries (`What is 3066 + 3630` -> ` \\boxed{6696}`), so that each digit of the
answer is a part of its own, the sum of the two digits above it: an answer can be partly right, which the large
model's log-probs can credit where the accuracy reward cannot.

The base models are weak by data, at a fixed point of their training. Each is a one-layer Qwen2 trained from random
weights on soft targets: every answer digit's target puts 1 - s on the right digit and s spread evenly over the ten
digits, s = 0.5 for the small model and 0.35 for the large one, with the learning rate decayed to zero. The optimum of
that training is a model whose most likely answer is right (greedy: 100%) but whose samples spread over near misses:
each digit is right with probability 1 - 0.9 s, a whole answer with (1 - 0.9 s)^4, 9.2% for the small model (46% of
prompts with no right answer among 8: the paper's Figure-1 regime) and 22% for the large one (14%): a stronger peer,
not an oracle. Training stops where that optimum is reached, not on the way to it, so another CPU's rounding or
another seed moves the figures by little (README, "The world on every machine"). RL's task is the one a base
model's sampling leaves it: to put its probability on the answers it already ranks first.
"""

import argparse
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

DIGITS = 4
CONFIGS = {  # one-layer Qwen2 models, ~90K and ~180K parameters
    "small": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2),
    "large": dict(hidden_size=96, intermediate_size=384, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2),
}
SPREAD = {"small": 0.4, "large": 0.35}  # s: an answer digit's target is 1 - s on its digit + s over all ten
MISTAKE = {"small": 0.85, "large": 0.0}  # m: the share of that 1 - s that an answer digit 7 puts on 8 instead
STEPS = {"small": 2000, "large": 1500}  # warm-up steps, batch 64, until the fit is at its fixed point (lr decayed)
LR = {"small": 3e-3, "large": 3e-3}  # peak learning rate (linear warm-up over 5% of the steps, then cosine to 0)
EOS = "<|endoftext|>"  # EOS and pad are the same token, as in Qwen2.5 base models
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's ChatML, no system turn
VERSION = "v6"  # part of the cache key: bump it when the world changes
WORLD_MB = 5  # a built world's size on disk, with room to spare (1.7 MB measured)


def problems(seed, n_train=10_000, n_test=500, digits=DIGITS, carries=False):
    """Additions of two `digits`-digit numbers, distinct, shuffled by seed -> (train, held out). carries=False: only
    pairs whose digits sum to at most 9 in every place, so that each digit of the answer is a part of its own."""
    g, seen, rows = random.Random(seed), set(), []
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    while len(rows) < n_train + n_test:
        x, y = g.randint(lo, hi), g.randint(lo, hi)  # (drawn in both cases: the random stream, the world, stay put)
        if not carries:
            xs = [g.randint(1 if i == 0 else 0, 8 if i == 0 else 9) for i in range(digits)]
            x, y = int("".join(map(str, xs))), int("".join(str(g.randint(1 if i == 0 else 0, 9 - d))
                                                            for i, d in enumerate(xs)))
        if (x, y) not in seen:
            seen.add((x, y))
            rows.append({"problem": f"What is {x} + {y}", "answer": str(x + y)})
    return rows[n_test:], rows[:n_test]


def solution(row):
    return f" \\boxed{{{row['answer']}}}"  # answer only: each digit a part of the answer


def build_tokenizer(rows, templates):
    """A byte-level BPE tokenizer (digits kept single) trained on the task's prompts (in each of the trainer's
    templates: {name: text with {prompt}}) and solutions, with Qwen's EOS and chat tokens and a ChatML chat template
    (for --chat_template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [templates[t].format(prompt=r["problem"]) + solution(r) for t in templates for r in rows[:2000]]
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", EOS])  # EOS last, as in Qwen: id 0 is "!"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT)


def new_model(name, tokenizer, seed):
    """A Qwen2 model of the world's size `name`, random weights from seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **CONFIGS[name])
    return Qwen2ForCausalLM(config)


def warmup(model, tokenizer, rows, steps, lr, seed, template, batch_size=64, decay=True, desc="warm-up", spread=0.0,
           mistake=0.0):
    """Supervised warm-up on prompt + solution (loss on the solution and its EOS), the prompt in `template` (the
    trainer's boxed one, a text with {prompt}): AdamW (0.9,
    0.98), lr linear up over the first 5% of the steps, then cosine down to 0 at the last step (decay=False: then
    constant), grad-norm clip 1."""
    g = random.Random(seed)
    data = [(tokenizer(template.format(prompt=r["problem"]))["input_ids"],
             tokenizer(solution(r))["input_ids"] + [tokenizer.eos_token_id]) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    ramp = max(1, steps // 20)

    def schedule(t):  # the factor of step t (0-based)
        if t < ramp:
            return (t + 1) / ramp
        return 0.5 * (1 + math.cos(math.pi * (t + 1 - ramp) / max(1, steps - ramp))) if decay else 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    pad = tokenizer.pad_token_id
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")))
    model.train()
    t0 = time.time()
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=None if steps >= 50 else True, mininterval=1.0):
        batch = g.choices(data, k=batch_size)
        L = max(len(p) + len(s) for p, s in batch)
        ids = torch.tensor([p + s + [pad] * (L - len(p) - len(s)) for p, s in batch])  # (batch, L), right-padded
        attn = torch.tensor([[1] * (len(p) + len(s)) + [0] * (L - len(p) - len(s)) for p, s in batch])
        target = torch.tensor([[0] * len(p) + [1] * len(s) + [0] * (L - len(p) - len(s)) for p, s in batch]).bool()
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (batch, L, H)
        logits = model.lm_head(hidden[:, :-1][target[:, 1:]])  # (solution tokens, V): the head only where it counts
        labels = ids[:, 1:][target[:, 1:]]  # (solution tokens,)
        loss = F.cross_entropy(logits, labels, reduction="none")  # (solution tokens,)
        if spread or mistake:  # answer digits: soft targets over the ten digits (digit_targets)
            logp_digits = logits.log_softmax(-1)[:, digit_ids]  # (solution tokens, 10)
            on_digit = torch.isin(labels, digit_ids)
            target = digit_targets((labels[:, None] == digit_ids).float().argmax(-1), spread, mistake)  # (tokens, 10)
            loss = torch.where(on_digit, -(target * logp_digits).sum(-1), loss)
        loss.mean().backward()  # mean over the solution tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if steps >= 50:  # one line per warm-up, in a terminal and in a log file (where the bar is off)
        print(f"{desc}: done in {time.time() - t0:.0f} s", flush=True)
    return model


def digit_targets(digits, spread, mistake):
    """The soft target of each answer digit over the ten digits: 1 - s on the digit itself and s spread evenly over
    all ten; with a mistake m, a 7 puts the share m of its 1 - s on 8 instead (the planted wrong lookup: a digit pair
    that sums to 7 is answered 8). digits: (n,) in 0..9 -> (n, 10), rows summing to 1."""
    right = F.one_hot(digits, 10).float()  # (n, 10)
    believed = torch.where(digits == 7, 1 - mistake, 1.0)[:, None] * right  # (n, 10)
    believed[:, 8] += torch.where(digits == 7, mistake, 0.0)
    return (1 - spread) * believed + spread / 10


def needs_skill(row):
    """Whether a problem needs the skill that the small base model lacks: some digit pair sums to 7 (without carries,
    exactly when its answer has a 7)."""
    return "7" in row["answer"]


def build(cache_dir, templates, seed=0, steps=None, verbose=True):
    """Build once (cached under cache_dir, keyed by every setting) the tokenizer, the problems and the two base
    models -> paths {'small', 'large', 'train', 'test'}. templates: the trainer's prompt templates
    (codistill_grpo.TEMPLATES); the models learn the boxed one. steps: {'small': n, 'large': n} warm-up steps (default
    STEPS; 0 leaves random weights, for fast tests). Written aside and renamed into place: an interrupted build
    (Ctrl-C, SIGTERM, an error) leaves nothing half-built in the cache."""
    steps = dict(STEPS, **(steps or {}))
    settings = [CONFIGS, seed, steps, LR, SPREAD, MISTAKE, DIGITS, VERSION, templates]
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    root = os.path.join(cache_dir, f"tiny-{key}")
    paths = {name: os.path.join(root, name) for name in ["small", "large"]}
    paths.update(train=os.path.join(root, "train.jsonl"), test=os.path.join(root, "test.jsonl"))
    if cached(root, paths, verbose):
        return paths
    os.makedirs(cache_dir, exist_ok=True)
    with open(f"{root}.lock", "a") as lock:  # one build of a world at a time: a second process waits for the first
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"another process is building {root}: waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if cached(root, paths, verbose=False):  # built by another process since the first look
            return paths
        return build_into(root, paths, cache_dir, templates, seed, steps, verbose)


def cached(root, paths, verbose):
    """Whether the world is in the cache, whole (a damaged one is said so, and built again)."""
    if not os.path.exists(os.path.join(root, "DONE")):
        return False
    damage = damaged(paths)
    if damage:
        print(f"the cached tiny world in {root} is damaged ({damage}): building it again", flush=True)
    elif verbose:
        print(f"tiny offline world: {root} (cached)")
    return not damage


def build_into(root, paths, cache_dir, templates, seed, steps, verbose):
    """build()'s work, under its lock: the world written aside, then renamed into place."""
    remove_abandoned_builds(cache_dir)
    if shutil.disk_usage(cache_dir).free < WORLD_MB * 2**20:  # fail now, not after minutes of warm-up
        raise OSError(errno.ENOSPC, "not enough room")
    if verbose:
        print(f"building the tiny offline world in {root} (once; later runs take it from there)", flush=True)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # its per-shard bars, at each save
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        train, test = problems(seed)
        for split, rows in [("train", train), ("test", test)]:
            with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        tokenizer = build_tokenizer(train, templates)
        for i, name in enumerate(["small", "large"]):
            model = warmup(new_model(name, tokenizer, seed + i), tokenizer, train, steps[name], LR[name], seed + i,
                           templates["boxed"], spread=SPREAD[name], mistake=MISTAKE[name],
                           desc=f"warm-up ({name} model, {steps[name]} steps)")
            model.save_pretrained(os.path.join(tmp, name))
            tokenizer.save_pretrained(os.path.join(tmp, name))
        open(os.path.join(tmp, "DONE"), "w").close()
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    except BaseException:  # interrupted or failed: leave nothing half-built
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def resolve(args, templates, fields=("small_model", "large_model", "dataset", "eval_dataset")):
    """The trainer's `tiny:NAME` placeholders (--preset tiny) in these flags replaced by the paths of the world of
    --tiny_seed in --cache_dir (built there on first use, under torchrun by one process per machine), with the
    trainer's templates."""
    import torch.distributed as dist
    from trainer_io import BadInput, rank
    try:
        os.makedirs(args.cache_dir, exist_ok=True)
        if dist.is_initialized():
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                build(args.cache_dir, templates, args.tiny_seed)
            dist.barrier()
        paths = build(args.cache_dir, templates, args.tiny_seed, verbose=rank() == 0)
    except OSError as e:  # a read-only or full disk
        free = shutil.disk_usage(args.cache_dir).free / 2**20 if os.path.isdir(args.cache_dir) else 0
        raise BadInput(f"--cache_dir {args.cache_dir}: the tiny world cannot be built there ({e.strerror}); it needs a "
                       f"writable folder with about {WORLD_MB} MB free ({free:.0f} MB are)") from None
    for f in fields:
        value = getattr(args, f)
        if value.startswith("tiny:"):
            if value[5:] not in paths:
                raise BadInput(f"--{f} {value}: the tiny world has {', '.join('tiny:' + k for k in paths)}")
            setattr(args, f, paths[value[5:]])
    return args


def damaged(paths):
    """What is missing, cut short or not finite in a cached world, or None when it is whole."""
    from safetensors.torch import load_file
    for name, rows in [("train", 10_000), ("test", 500)]:
        if not os.path.isfile(paths[name]):
            return f"no {os.path.basename(paths[name])}"
        with open(paths[name], "rb") as f:
            found = f.read().count(b"\n")
        if found != rows:
            return f"{os.path.basename(paths[name])} has {found} rows, not {rows}"
    for name in ["small", "large"]:
        for need in ["config.json", "tokenizer.json", "model.safetensors"]:
            if not os.path.isfile(os.path.join(paths[name], need)):
                return f"no {name}/{need}"
        try:
            weights = load_file(os.path.join(paths[name], "model.safetensors"))
        except Exception as e:  # safetensors raises its own error type for a file cut short
            return f"{name}/model.safetensors: {str(e)[:60]}"
        if not all(torch.isfinite(w).all() for w in weights.values()):
            return f"{name}/model.safetensors holds NaN or infinite weights"
    return None


def remove_abandoned_builds(cache_dir):
    """Remove the temporary folders of builds whose process is gone (a SIGKILL leaves its tiny-*.tmpPID behind)."""
    for d in os.listdir(cache_dir) if os.path.isdir(cache_dir) else []:
        m = re.fullmatch(r"tiny-\w+\.tmp(\d+)", d)
        if m and not process_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(cache_dir, d), ignore_errors=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "codistill_grpo"),
                   help="where worlds are built and cached (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the world's seed: its problems and initialisations")
    p.add_argument("--steps_small", type=int, default=STEPS["small"], help="warm-up steps of the small model")
    p.add_argument("--steps_large", type=int, default=STEPS["large"], help="warm-up steps of the large model")
    p.add_argument("--spread_small", type=float, default=SPREAD["small"], help="s of the small model's soft targets "
                   "(another world: to probe designs)")
    p.add_argument("--mistake_small", type=float, default=MISTAKE["small"], help="m of the small model's planted "
                   "mistake (another world: to probe designs)")
    p.add_argument("--json", help="also write the paths and the settings to this JSON file")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit: the build cleans up after itself
    SPREAD["small"], MISTAKE["small"] = a.spread_small, a.mistake_small  # part of the cache key
    from codistill_grpo import TEMPLATES  # the trainer's prompts (the trainer never imports this file at its top)
    paths = build(a.cache_dir, TEMPLATES, a.seed, dict(small=a.steps_small, large=a.steps_large))
    print(json.dumps(paths, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(seed=a.seed, steps=dict(small=a.steps_small, large=a.steps_large), spread=SPREAD,
                           mistake=MISTAKE, threads=torch.get_num_threads(),
                           isa=torch.backends.cpu.get_cpu_capability(), paths=paths), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
