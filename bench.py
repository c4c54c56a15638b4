"""
bench.py: how much a CoDistill iteration costs against a GRPO iteration of the large model, on the trainer's own
path, and what its parts cost: chunked log-probs against the naive way, AdamW's step, eager and compiled decoding
against the bandwidth floor. A benchmark, not a test.

    python bench.py                                   # a random pair on CPU: N = 16, 64, 256
    python bench.py --json experiments/results/bench.json --plot experiments/results/bench_ratio.png  # the README's
    python bench.py --small_model Qwen/Qwen2.5-Math-1.5B --large_model Qwen/Qwen2.5-Math-7B --lengths 512,3072

1. Step time: `codistill_grpo.py` itself runs a few iterations of CoDistill (the small model generates, M = G, and
   M = 14, G = 8 as in the paper) and of GRPO on the large model (G samples of its own), on the same prompts, and
   the per-phase times of its metrics.jsonl are compared (median after the first iteration), with each phase's
   share of CoDistill's step. The trainer's own path: fp32 master weights, --dtype the compute dtype (auto: bf16 on
   GPU, with the decoding copies and autocast; fp32 on CPU). By default the pair is two random-weight Qwen2 models 8
   times apart in size (PAIR; the tiny world's tokenizer and problems): they rarely stop early, so completions run
   to nearly N tokens (the measured mean length is printed).
2. Log-prob memory: `token_logprobs` (chunked) against a full log_softmax + gather, at Qwen's vocabulary size, each
   in its own process, whose peak resident memory is reset before the call and read after it (Linux /proc).
3. AdamW's step: its peak memory above the resting 16 bytes per parameter (weights, gradients, two states), for the
   foreach step (torch's default), the fused one and the for-loop one, each in its own process (CPU: /proc; GPU:
   torch.cuda's peak).
4. Decoding: `sample` on the small model in the compute dtype (a sampler, as the trainer holds), eager against
   --compile_decode's static cache and compiled step, at batch 1 and at the rollout batch (B x 8): ms per decoding
   step, tokens/s, and the floor: reading the weights once per step at the bandwidth a large copy reaches here.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import codistill_grpo as cg

QWEN_VOCAB = 151_936


PAIR = {  # random-weight Qwen2 models 8 times apart in size (0.5M and 4M parameters), as a 0.5B / 4B pair would be
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "large": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
}


def random_pair(cache_dir):
    """The bench's pair, built once under cache_dir with the tiny world's tokenizer and problems (the prompts):
    random weights rarely emit EOS, so completions run to nearly N tokens -> paths {small, large, train}."""
    import tiny_world
    world = tiny_world.build(cache_dir, cg.TEMPLATES, 0, steps=dict(small=0, large=0), verbose=False)
    root = os.path.join(cache_dir, "bench-pair-v1")
    paths = dict(small=os.path.join(root, "small"), large=os.path.join(root, "large"), train=world["train"])
    if not os.path.exists(os.path.join(root, "DONE")):
        from transformers import Qwen2Config, Qwen2ForCausalLM
        tok = cg.load_tokenizer(world["small"])
        for name, config in PAIR.items():
            torch.manual_seed(0)
            config = Qwen2Config(vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True,
                                 bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **config)
            model = Qwen2ForCausalLM(config)
            model.save_pretrained(paths[name])
            tok.save_pretrained(paths[name])
        open(os.path.join(root, "DONE"), "w").close()
    return paths


def run_iterations(algo, a, n, m, g, out, extra=()):
    """A few iterations of the real loop -> per-phase medians (seconds) after the first iteration."""
    argv = ["--preset", "tiny", "--small_model", a.small_model, "--large_model", a.large_model, "--algo", algo,
            "--dataset", a.dataset, "--eval_dataset", a.dataset, "--cache_dir", a.cache_dir,
            "--max_completion_length", str(n), "--num_samples", str(m), "--group_size", str(g),
            "--batch_size", str(a.batch_size), "--max_steps", str(a.iterations + 1), "--eval_size", "0",
            "--save_every", "0", "--keep_checkpoints", "1", "--output_dir", out, "--overwrite",
            "--micro_batch_size", str(a.micro_batch_size), "--dtype", a.dtype,
            *(["--gradient_checkpointing"] if a.gradient_checkpointing else []), *extra]
    cg.main(argv)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][2:]  # after iteration 1
    keys = ["time/step", "time/generate", "time/reward", "time/score", "time/update_small", "time/update_large"]
    med = {k.split("/")[1]: statistics.median(r[k] for r in rows) for k in keys}
    med["spread"] = (max(r["time/step"] for r in rows) - min(r["time/step"] for r in rows)) / 2
    length_key = "policy/completion_length" if algo == "grpo" else "small/completion_length"
    med["length"] = statistics.mean(r[length_key] for r in rows)
    if "memory/allocated_gb_max" in rows[0]:
        med["memory_gb"] = max(r["memory/allocated_gb_max"] for r in rows)
    return med


def step_times(a):
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.lengths:
            grpo = run_iterations("grpo", a, n, 8, 8, os.path.join(tmp, "grpo"), ("--policy", "large"))
            codistill = run_iterations("codistill", a, n, 8, 8, os.path.join(tmp, "cd"))
            codistill_14 = run_iterations("codistill", a, n, 14, 8, os.path.join(tmp, "cd14"))
            results[n] = dict(grpo_large=grpo, codistill=codistill, codistill_m14=codistill_14)
    return results


LOGPROB_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {here!r})
import codistill_grpo as cg
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size={vocab}, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
model = Qwen2ForCausalLM(cfg).eval()
S, P, L = {seqs}, 8, {length}
prompt = torch.randint(0, {vocab}, (S, P)); comp = torch.randint(0, {vocab}, (S, L))
pm, cm = torch.ones_like(prompt), torch.ones_like(comp)
def kb(field):  # Linux: /proc/self/status, in kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
base = kb("VmRSS")
t = time.perf_counter()
with torch.no_grad():
    if {naive}:
        ids = torch.cat([prompt, comp], 1)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, P - 1:-1].float()
        out = logits.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)
    else:
        out = cg.token_logprobs(model, prompt, pm, comp, cm, 1.0, {chunk})
seconds = time.perf_counter() - t
peak = kb("VmHWM") - base
torch.save(out, {out!r})
print(seconds, peak * 1024)
"""


def logprob_memory(a):
    """Peak extra resident memory and time of chunked vs naive log-probs, and their largest difference."""
    here, res = os.path.dirname(os.path.abspath(__file__)), {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, naive in [("naive", True), ("chunked", False)]:
            out = os.path.join(tmp, name + ".pt")
            script = LOGPROB_SCRIPT.format(here=here, vocab=QWEN_VOCAB, seqs=a.logprob_seqs, length=a.logprob_len,
                                           naive=naive, chunk=cg.Args.logprob_chunk, out=out)
            line = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
            seconds, peak = map(float, line.stdout.split()[-2:])
            res[name] = dict(seconds=seconds, peak_bytes=peak, values=torch.load(out))
    diff = (res["naive"]["values"] - res["chunked"]["values"]).abs().max().item()
    return dict(naive={k: v for k, v in res["naive"].items() if k != "values"},
                chunked={k: v for k, v in res["chunked"].items() if k != "values"}, max_abs_diff=diff)


OPTIMIZER_SCRIPT = """
import sys, torch
impl, device, n = {impl!r}, {device!r}, {size}
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(n, n, device=device)) for _ in range(4)]
for p in params:
    p.grad = torch.randn_like(p)
opt = torch.optim.AdamW(params, lr=1e-4, **(dict(fused=True) if impl == "fused" else dict(foreach=impl == "foreach")))
opt.step()  # the states exist from here: resting at 16 bytes per parameter
def kb(field):  # Linux: /proc/self/status, in kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    open("/proc/self/clear_refs", "w").write("5"); base = kb("VmRSS") * 1024
opt.step()
peak = (torch.cuda.max_memory_allocated() if device == "cuda" else kb("VmHWM") * 1024) - base
print(peak / sum(p.numel() for p in params))
"""


def optimizer_peak(a):
    """Bytes per parameter that one AdamW step allocates above its resting state, for each implementation, on four
    square weights of a.optimizer_size^2 parameters each."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for impl in ["foreach", "fused", "for-loop"]:
        script = OPTIMIZER_SCRIPT.format(impl=impl, device=device, size=a.optimizer_size)
        line = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        out[impl] = float(line.stdout.split()[-1])
    return dict(bytes_per_parameter=out, parameters=4 * a.optimizer_size ** 2, device=device)


def copy_bandwidth(device, megabytes=512):
    """Bytes per second that copying a large tensor reaches here (read + write): the decoding floor's denominator."""
    x = torch.empty(megabytes * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        y.copy_(x)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best


def decode_speed(a):
    """Decoding of the small model in the compute dtype, eager and compiled (static cache), at batch 1 and at the
    rollout batch -> per batch and way: ms per decoding step, tokens/s, and the floor (weight bytes / bandwidth)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cg.compute_dtype(a.dtype, device)
    model = cg.load_model(a.small_model, dtype, device, False)  # what the trainer's sampler is
    tok = cg.load_tokenizer(a.small_model)
    n, eos = max(a.lengths), cg.eos_ids_of(tok, model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = 1000 * weight_bytes / copy_bandwidth(device)
    out = dict(weight_bytes=weight_bytes, floor_ms=floor_ms, dtype=str(dtype), rows={})
    for batch in [1, a.batch_size * 8]:
        ids, mask = cg.encode_prompts(tok, [f"What is {i} + {i + 7}" for i in range(batch)], "boxed", 64, device)
        for compiled in [False, True]:
            t = time.perf_counter()
            cg.sample(model, ids, mask, n, 1.0, eos, tok.pad_token_id, batch, compiled, 64 + n)  # compiles, if so
            first, times, steps = time.perf_counter() - t, [], []
            for _ in range(a.iterations):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                comp = cg.sample(model, ids, mask, n, 1.0, eos, tok.pad_token_id, batch, compiled, 64 + n)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                steps.append(comp.shape[1])
            seconds = statistics.median(times)
            ms = 1000 * seconds / statistics.median(steps)
            out["rows"][f"{batch}/{'compiled' if compiled else 'eager'}"] = dict(
                batch=batch, compiled=compiled, ms_per_step=ms, tokens_per_s=batch * statistics.median(steps) / seconds,
                first_call_s=first, floor_fraction=floor_ms / ms)
    return out


def report(steps, logprobs, optimizer, decode, a):
    print(f"\n## Step time: CoDistill against GRPO on the large model (median seconds per iteration, --dtype {a.dtype})\n")
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| N | mean length | GRPO-large step | generate share | CoDistill (M=G=8) step | ratio | CoDistill (M=14, "
          "G=8) step | ratio | CoDistill's step: generate / score / update small / update large |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, r in steps.items():
        g, c, c14 = r["grpo_large"], r["codistill"], r["codistill_m14"]
        shares = " / ".join(f"{c[k] / c['step']:.0%}" for k in ["generate", "score", "update_small", "update_large"])
        print(f"| {n} | {c['length']:.0f} | {g['step']:.2f} ± {g['spread']:.2f} | {g['generate'] / g['step']:.0%} | "
              f"{c['step']:.2f} ± {c['spread']:.2f} | {c['step'] / g['step']:.2f} | {c14['step']:.2f} | "
              f"{c14['step'] / g['step']:.2f} | {shares} |")
    if steps and "memory_gb" in next(iter(steps.values()))["grpo_large"]:
        print("\npeak GPU memory (max_memory_allocated, GB): " + ", ".join(
            f"N={n}: GRPO-large {r['grpo_large']['memory_gb']:.1f}, CoDistill {r['codistill']['memory_gb']:.1f}, "
            f"M=14 {r['codistill_m14']['memory_gb']:.1f}" for n, r in steps.items()))
    if logprobs is not None:
        n, c = logprobs["naive"], logprobs["chunked"]
        print(f"\n## Token log-probs at vocabulary {QWEN_VOCAB:,}, {a.logprob_seqs} x {a.logprob_len} tokens\n")
        print("| | peak extra memory (MB) | time (s) |\n| --- | --- | --- |")
        for name, r in [("naive log_softmax + gather", n), ("chunked (ours)", c)]:
            print(f"| {name} | {r['peak_bytes'] / 2**20:.0f} | {r['seconds']:.2f} |")
        print(f"\npeak ratio {c['peak_bytes'] / max(n['peak_bytes'], 1):.3f}, time ratio "
              f"{c['seconds'] / n['seconds']:.2f}, largest difference {logprobs['max_abs_diff']:.2e}")
    if optimizer is not None:
        print(f"\n## AdamW's step ({optimizer['parameters'] / 1e6:.0f}M parameters, {optimizer['device']}): bytes per "
              "parameter above the resting 16\n")
        print(" | ".join(f"{k} {v:.1f}" for k, v in optimizer["bytes_per_parameter"].items()))
    if decode is not None:
        print(f"\n## Decoding, the small model in {decode['dtype']} ({decode['weight_bytes'] / 2**20:.1f} MB of weights; "
              f"floor {decode['floor_ms']:.3f} ms per step at the copy bandwidth measured here)\n")
        print("| batch | decoding | ms per step | tokens/s | fraction of the floor | first call (s) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in decode["rows"].values():
            print(f"| {r['batch']} | {'compiled' if r['compiled'] else 'eager'} | {r['ms_per_step']:.2f} | "
                  f"{r['tokens_per_s']:.0f} | {r['floor_fraction']:.1%} | {r['first_call_s']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", default="16,64,256", help="completion lengths N to time (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up (default: 3)")
    p.add_argument("--batch_size", type=int, default=8, help="B, prompts per iteration (default: 8)")
    p.add_argument("--small_model", default="small", help="small model (default: small, of a random pair, PAIR)")
    p.add_argument("--large_model", default="large", help="large model (default: large, of a random pair, PAIR)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the trainer's --dtype, its compute dtype (default: auto, bf16 on GPU and fp32 on CPU)")
    p.add_argument("--cache_dir", default=cg.Args.cache_dir, help="where the random pair is built")
    p.add_argument("--logprob_seqs", type=int, default=16, help="sequences in the log-prob comparison (default 16)")
    p.add_argument("--logprob_len", type=int, default=512, help="tokens per sequence there (default 512)")
    p.add_argument("--optimizer_size", type=int, default=4096, help="AdamW's part: four n x n weights (default 4096)")
    p.add_argument("--micro_batch_size", type=int, default=32, help="sequences per forward/backward (default 32)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="for long N with real-size models")
    p.add_argument("--parts", default=",".join(PARTS), help="what to measure (default: %(default)s; on CPU, "
                   "logprobs and optimizer measure resident memory)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--plot", help="also draw the step-time ratio against N to this PNG (needs the steps part)")
    a = p.parse_args(argv)
    try:
        measure(a, check_args(a))
    except cg.BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def measure(a, parts):
    """Each part asked for, its report, and the figures written."""
    pair = random_pair(a.cache_dir)
    a.dataset = pair["train"]
    a.small_model, a.large_model = [pair[m] if m in ("small", "large") else m for m in (a.small_model, a.large_model)]
    steps = step_times(a) if "steps" in parts else {}
    logprobs = logprob_memory(a) if "logprobs" in parts else None
    optimizer = optimizer_peak(a) if "optimizer" in parts else None
    decode = decode_speed(a) if "decode" in parts else None
    report(steps, logprobs, optimizer, decode, a)
    figures = dict(
        step_ratio={n: r["codistill"]["step"] / r["grpo_large"]["step"] for n, r in steps.items()},
        step_ratio_m14={n: r["codistill_m14"]["step"] / r["grpo_large"]["step"] for n, r in steps.items()},
        generate_share={n: r["grpo_large"]["generate"] / r["grpo_large"]["step"] for n, r in steps.items()},
        **(dict(logprob_peak_ratio=logprobs["chunked"]["peak_bytes"] / max(logprobs["naive"]["peak_bytes"], 1),
                logprob_time_ratio=logprobs["chunked"]["seconds"] / logprobs["naive"]["seconds"],
                logprob_max_abs_diff=logprobs["max_abs_diff"]) if logprobs else {}),
        steps=steps, logprobs=logprobs, optimizer=optimizer, decode=decode,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), cuda=torch.cuda.is_available(),
                     gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None),
        versions=dict(torch=torch.__version__, python=platform.python_version()),
        settings=dict(vars(a)), date=time.strftime("%Y-%m-%d"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)
    if a.plot:
        plot(figures, a.plot)


PARTS = ["steps", "logprobs", "optimizer", "decode"]


def check_args(a):
    """Bad flags and output paths, refused before anything is measured (a bench takes minutes, 25 on a GPU at
    N = 3072) -> the parts to measure."""
    try:
        a.lengths = [int(x) for x in a.lengths.split(",")]
    except ValueError:
        raise cg.BadInput(f"--lengths {a.lengths}: comma-separated whole numbers expected") from None
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        raise cg.BadInput(f"--parts {a.parts}: choose from {', '.join(PARTS)}")
    for name in ["iterations", "batch_size", "logprob_seqs", "logprob_len", "micro_batch_size", "optimizer_size"]:
        if getattr(a, name) < 1:
            raise cg.BadInput(f"--{name} must be >= 1, got {getattr(a, name)}")
    if min(a.lengths) < 1:
        raise cg.BadInput(f"--lengths must be >= 1, got {min(a.lengths)}")
    try:
        os.makedirs(a.cache_dir, exist_ok=True)
    except OSError as e:
        raise cg.BadInput(f"--cache_dir {a.cache_dir}: not a folder it can write ({e.strerror})") from None
    for flag in ["json", "plot"]:
        path = getattr(a, flag)
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if path and (os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
            raise cg.BadInput(f"--{flag} {path}: cannot write a file there")
    if a.plot:
        import matplotlib.figure
        formats = matplotlib.figure.Figure().canvas.get_supported_filetypes()
        extension = os.path.splitext(a.plot)[1].lstrip(".").lower()
        if extension not in formats:
            raise cg.BadInput(f"--plot {a.plot}: the file name must end in one of {', '.join('.' + f for f in formats)}")
        if "steps" not in parts:
            raise cg.BadInput(f"--plot draws the step-time ratio: add steps to --parts ({a.parts})")
        if a.json and os.path.abspath(a.json) == os.path.abspath(a.plot):
            raise cg.BadInput(f"--json and --plot name the same file ({a.plot}): the plot would overwrite the figures")
    return parts


def plot(figures, path):
    """The step-time ratio against N: where co-distillation starts to pay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("step_ratio", "M = G = 8"), ("step_ratio_m14", "M = 14, G = 8")]:
        lengths = [int(n) for n in figures[key]]
        ax.plot(lengths, list(figures[key].values()), marker="o", label=f"CoDistill ({label})")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(0.82, color="gray", ls="--", lw=0.8, label="the paper's 0.82")
    ax.set(xscale="log", xlabel="completion length N", ylabel="step time / GRPO-large step time")
    ax.set_xticks(lengths, [str(n) for n in lengths], minor=False)
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
