"""
eval.py: score checkpoints like the paper's Tables 1 and 2, and draw Figures 1, 3 and 4 from training runs.

Benchmarks (decoded as the checkpoints' runs evaluated held-out: greedy for the paper's presets, sampled at
temperature 1 for the tiny one; --temperature and --seeds K for mean ± std over K sampled runs):
    python eval.py Qwen/Qwen2.5-Math-1.5B runs/codistill/checkpoint-1560/small   # minerva,math500,amc23,olympiadbench
    python eval.py MODEL --benchmarks math500,gsm8k,my_problems.jsonl --temperature 0.6 --seeds 5 --out scores.json
    python eval.py tiny:small runs/tiny/checkpoint-100/small --benchmarks toy     # offline: the tiny preset's base model

Training runs (each RUN_DIR's metrics.jsonl -> a summary table and PNG plots; runs that differ only in --seed
are grouped into Tables 1 and 2 over seeds, and drawn as their mean):
    python eval.py --runs runs/tiny runs/tiny-grpo --plot_dir plots
    python eval.py --runs runs/cmp/grpo-small/{1,2,3} runs/cmp/codistill-a1/{1,2,3} --plot_dir .

MODEL is a checkpoint folder (RUN/checkpoint-K/small, large or policy), a hub id, or tiny:small / tiny:large (the
tiny preset's base models); the first MODEL is the baseline that the Average column's change is measured against.
A benchmark is minerva, math500, amc23, olympiadbench, gsm8k (hub ids in BENCHMARKS; splits and columns in
trainer_io.HUB_DATASETS), toy (the tiny preset's 500 held-out additions, seed 0), or a local JSON/JSONL file with
'problem' and 'answer'. The template, max new tokens and max prompt length default to what the checkpoints' training
run recorded (RUN/checkpoint-K/args.json). Prompts, graders, loaders and generation are those of codistill_grpo.py
and trainer_io.py.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys

import torch

import codistill_grpo as cg
import trainer_io

# name -> (column title, hub id). Each id's config, splits and columns are in trainer_io.HUB_DATASETS, the one
# table of datasets that training and evaluation share.
BENCHMARKS = {
    "minerva": ("Minerva", "math-ai/minervamath"),
    "math500": ("MATH500", "HuggingFaceH4/MATH-500"),
    "amc23": ("AMC23", "math-ai/amc23"),
    "olympiadbench": ("OlympiadBench", "math-ai/olympiadbench"),
    "gsm8k": ("GSM8K", "openai/gsm8k"),
}
PHASES = ["generate", "reward", "score", "update_small", "update_large"]  # time/<phase> in metrics.jsonl


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks


def load_benchmark(name):
    """-> rows [{'problem', 'answer'}]; cg.BadInput with a one-line message when it cannot be loaded."""
    if name == "toy":
        import tiny_world
        return tiny_world.problems(0)[1]  # seed 0: the tiny preset's default
    if name in BENCHMARKS:
        return cg.load_problems(BENCHMARKS[name][1], "test")
    if name.endswith((".json", ".jsonl")) and not os.path.isfile(name):
        raise cg.BadInput(f"{name}: no such file")
    return cg.load_problems(name, "test")  # a local file, or another hub id with 'problem' and 'answer'


def model_path(name, cache_dir=cg.Args.cache_dir):
    """'tiny:small' and 'tiny:large' are the tiny preset's base models (built and cached on first use)."""
    if not name.startswith("tiny:"):
        return name
    if name not in ("tiny:small", "tiny:large"):
        raise cg.BadInput(f"MODEL {name}: the tiny world's models are tiny:small and tiny:large")
    import tiny_world
    args = cg.parse_args(["--preset", "tiny", "--small_model", name, "--cache_dir", cache_dir])
    return tiny_world.resolve(args, cg.TEMPLATES).small_model


def title_of(name):
    return BENCHMARKS[name][0] if name in BENCHMARKS else os.path.basename(name)


# ----------------------------------------------------------------------------------------------------------------
# Models: generation settings and scoring


def read_args(folder):
    """The arguments a training run recorded in folder/args.json (RUN/ or RUN/checkpoint-K/), or {} when there is none
    (or it is still being written); cg.BadInput naming it when it is not the trainer's (a wrong type, not an object)."""
    path = os.path.join(folder, "args.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise cg.BadInput(f"{path}: cannot be read ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise cg.BadInput(f"{path}: not the arguments of a training run")
    return {**saved, **cg.checked_args(saved, path, complete=False)}


def trained_args(model):
    """A checkpoint's training arguments (RUN/checkpoint-K/args.json beside its model folder); {} for a hub id."""
    return read_args(os.path.dirname(os.path.normpath(model))) if os.path.isdir(model) else {}


def setting(flag, key, recorded, toy_only):
    """The flag when given; else the first value recorded by the models' runs; else the tiny preset's when every
    benchmark is toy; else the paper's default (codistill_grpo.Args). One value for the whole table."""
    if flag is not None:
        return flag
    for args in recorded:
        if key in args:
            return args[key]
    return {**dataclasses.asdict(cg.Args()), **(cg.PRESETS["tiny"] if toy_only else {})}[key]


def label_of(args):
    """'codistill (alpha=1, T=0)', 'codistill (alpha=1, T=0, kd_form=token)', 'grpo (policy=small)', ... from a run's
    arguments; '' when there are none."""
    if "algo" not in args:
        return ""
    if args["algo"] == "grpo":
        return f"grpo (policy={args.get('policy', 'small')})"
    form = args.get("kd_form", "reward")
    return f"{args['algo']} (alpha={args.get('alpha', 1.0):g}, T={args.get('hint_tokens', 0)}" + \
        ("" if form == "reward" else f", kd_form={form}") + ")"


def score_model(model, tokenizer, rows, s, seed):
    """Completions of one model on one benchmark (greedy, or sampled with this seed) -> per-problem results."""
    torch.manual_seed(seed)
    texts = cg.complete(model, tokenizer, [r["problem"] for r in rows], s["template"], s["max_new_tokens"],
                        s["max_prompt_length"], cg.eos_ids_of(tokenizer, model, chat=s["chat_template"]),
                        s["batch_size"], s["temperature"], chat=s["chat_template"])
    correct = cg.grade_batch(texts, [r["answer"] for r in rows], s["template"])()  # one batch to the grader
    return [dict(problem=r["problem"], gold=r["answer"], completion=t, seed=seed, correct=c)
            for r, t, c in zip(rows, texts, correct)]


def summarize(accuracies, names):
    """accuracies: {model: {benchmark: [accuracy in [0, 1] per seed] or None when missing}} -> table rows: per
    benchmark the mean and std in percent (population std over seeds), the Average of the means over the benchmarks
    present, and its change against the first model's Average."""
    rows = []
    for model, per in accuracies.items():
        cells = {b: None if per.get(b) is None else dict(mean=100 * statistics.mean(per[b]),
                                                         std=100 * statistics.pstdev(per[b]), seeds=per[b])
                 for b in names}
        means = [c["mean"] for c in cells.values() if c is not None]
        rows.append(dict(model=model, cells=cells, average=statistics.mean(means) if means else None))
    base = rows[0]["average"] if rows else None
    for r in rows:
        r["delta"] = None if r is rows[0] or None in (base, r["average"]) else r["average"] - base
    return rows


def markdown(header, lines):
    """A Markdown table from a header and lines of cells (strings)."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] +
                     ["| " + " | ".join(line) + " |" for line in lines])


def benchmark_table(rows, names, labels):
    """Tables 1 and 2: a row per model, 'mean ± std' per benchmark, the Average and its change vs the first row."""
    missing = [title_of(b) for b in names if all(r["cells"][b] is None for r in rows)]
    lines = []
    for r in rows:
        cells = ["missing" if c is None else f"{c['mean']:.2f} ± {c['std']:.2f}" for c in r["cells"].values()]
        avg = "-" if r["average"] is None else f"{r['average']:.2f}"
        avg += "" if r["delta"] is None else f" ({r['delta']:+.2f})"
        lines.append([r["model"] + (f" [{labels[r['model']]}]" if labels.get(r["model"]) else "")] + cells + [avg])
    table = markdown(["Model"] + [title_of(b) for b in names] + ["Average*" if missing else "Average"], lines)
    return table + (f"\n\n* Average over the benchmarks present; missing: {', '.join(missing)}." if missing else "")


def load_benchmarks(names, limit):
    """{name: rows} of the benchmarks that load; each one that does not gets a one-line error and is left out."""
    problems = {}
    for b in names:
        try:
            problems[b] = load_benchmark(b)[:limit or None]
        except cg.BadInput as e:
            print(f"error: benchmark {b} is missing: " + " ".join(str(e).split()), file=sys.stderr)
    return problems


def evaluate_models(a):
    """Score every MODEL on every benchmark -> (table text, JSON-able results, names of missing benchmarks)."""
    names = [b.strip() for b in a.benchmarks.split(",") if b.strip()]
    if len({os.path.normpath(m) for m in a.models}) < len(a.models) or len(set(names)) < len(names):
        raise cg.BadInput(f"a MODEL or a benchmark is given twice: {' '.join(a.models)} --benchmarks {a.benchmarks}")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    paths = {m: model_path(m, a.cache_dir) for m in a.models}
    tokenizers = {m: cg.load_tokenizer(paths[m]) for m in a.models}  # bad model names fail before any work
    for m in a.models:  # and so do damaged weights: a local folder's are checked before any model is scored
        problem = trainer_io.model_problem(paths[m]) if os.path.isdir(paths[m]) else None
        if problem:
            raise cg.BadInput(f"model {m}: {problem}")
    problems = load_benchmarks(names, a.limit)
    if not problems:
        raise cg.BadInput(f"--benchmarks {a.benchmarks}: none could be loaded")
    recorded = [trained_args(paths[m]) for m in a.models]
    toy_only = set(problems) == {"toy"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = dict(temperature=setting(a.temperature, "eval_temperature", recorded, toy_only),
             batch_size=setting(a.batch_size, "gen_batch_size", recorded, toy_only),
             dtype=setting(a.dtype, "dtype", recorded, toy_only),
             seeds=list(range(a.seeds)),
             template=setting(a.template, "template", recorded, toy_only),
             max_new_tokens=setting(a.max_new_tokens, "max_completion_length", recorded, toy_only),
             max_prompt_length=setting(a.max_prompt_length, "max_prompt_length", recorded, toy_only),
             chat_template=setting(a.chat_template, "chat_template", recorded, toy_only))
    if s["temperature"] == 0 and a.seeds > 1:
        raise cg.BadInput("--seeds > 1 needs --temperature > 0: greedy decoding gives the same answers every time")
    dtype = cg.compute_dtype(s["dtype"], device)  # the trainer's held-out accuracy decodes in it (its sampler)
    accuracies, results = {}, []
    for m in a.models:
        model = cg.load_model(paths[m], dtype, device, gradient_checkpointing=False)  # BadInput naming it
        accuracies[m] = {b: None for b in names}
        for b, rows in problems.items():
            per_seed = [score_model(model, tokenizers[m], rows, s, seed) for seed in s["seeds"]]
            accuracies[m][b] = [sum(x["correct"] for x in res) / len(res) for res in per_seed]
            results += [dict(model=m, benchmark=b, **x) for res in per_seed for x in res]
            print(f"{m} on {b}: {100 * statistics.mean(accuracies[m][b]):.2f}% of {len(rows)} problems")
            if a.out:  # what is scored is on disk as soon as it is scored: hours of work are not lost to a crash
                write_json(a.out, dict(partial=True, settings=s, accuracies=accuracies, results=results))
        del model
    rows = summarize(accuracies, names)
    decoding = "greedy" if s["temperature"] == 0 else f"sampled at temperature {s['temperature']:g}"
    caption = (f"Accuracy (%), {decoding}, template {s['template']}, at most {s['max_new_tokens']} new tokens: "
               f"mean ± std (population std) over {a.seeds} seed(s); Average: the mean of the benchmarks' means, "
               f"with its change against the first row in parentheses.")
    labels = {m: label_of(r) for m, r in zip(a.models, recorded)}
    table = caption + "\n\n" + benchmark_table(rows, names, labels)
    out = dict(settings=s, benchmarks={b: len(p) for b, p in problems.items()},
               table=[dict(r, label=labels[r["model"]]) for r in rows], results=results)
    return table, out, [b for b in names if b not in problems]


# ----------------------------------------------------------------------------------------------------------------
# Training runs: metrics.jsonl -> summary and figures


def read_metrics(path):
    """Rows of a metrics.jsonl: a half-written last line (a run still writing it) is left out; a damaged line
    elsewhere, or a file that is not UTF-8, is BadInput naming the line."""
    return [r for r in trainer_io.read_jsonl(str(path)) if isinstance(r.get("iteration"), int)]


def load_run(run_dir):
    """-> dict(dir, args, rows, prefix): prefix maps 'small'/'large' to the metric prefix of that model."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise cg.BadInput(f"--runs {run_dir}: no metrics.jsonl there")
    args = read_args(run_dir)
    rows = read_metrics(path)
    if not rows:
        raise cg.BadInput(f"--runs {run_dir}: its metrics.jsonl has no rows yet")
    grpo = args.get("algo") == "grpo" or any(k.startswith("policy/") for r in rows for k in r)
    prefix = {args.get("policy", "small"): "policy"} if grpo else {"small": "small", "large": "large"}
    return dict(dir=run_dir, args=args, rows=rows, prefix=prefix, label=label_of(args) or os.path.basename(run_dir))


def series(run, key):
    """(iterations, values) of the rows that have key."""
    points = [(r["iteration"], r[key]) for r in run["rows"] if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def mean_of(run, key):
    values = series(run, key)[1]
    return statistics.mean(values) if values else None


def summarize_run(run):
    """Final held-out accuracy of each model (first -> last evaluation), mean fraction of zero-accuracy prompts,
    mean step time and its split by phase."""
    out = dict(run=run["label"], iterations=max((r["iteration"] for r in run["rows"]), default=0))
    for model in ["small", "large"]:
        acc = series(run, f"{run['prefix'][model]}/test_accuracy")[1] if model in run["prefix"] else []
        out[f"{model}/test_accuracy"] = (acc[0], acc[-1]) if acc else None
    rollouts = run["prefix"].get("small", "policy")  # the model that wrote the rollouts
    out["zero_accuracy_frac"] = mean_of(run, f"{rollouts}/zero_accuracy_frac")
    for phase in ["step"] + PHASES:
        out[f"time/{phase}"] = mean_of(run, f"time/{phase}")
    return out


def runs_table(summaries):
    fmt = lambda v, f: "-" if v is None else f.format(v)
    lines = [[s["run"], str(s["iterations"]),
              *[fmt(s[f"{m}/test_accuracy"], "{0[0]:.2%} -> {0[1]:.2%}") for m in ["small", "large"]],
              fmt(s["zero_accuracy_frac"], "{:.2f}"), *[fmt(s[f"time/{p}"], "{:.2f}") for p in ["step"] + PHASES]]
             for s in summaries]
    header = ["run", "iterations", "small held-out acc (start -> end)", "large held-out acc (start -> end)",
              "zero-acc prompts (mean frac)", "step (s)", *[f"{p} (s)" for p in PHASES]]
    return markdown(header, lines)


def group_runs(runs):
    """Runs whose arguments differ only in --seed, the folder and what a resumed run may change without changing
    the run (cg.RESUMABLE: length, cadence, memory knobs) -> [(label, [runs])], in first-seen order. B per process
    and the number of processes count as their product, the global batch. A path holding the run's own seed as a
    folder (CT from runs/cmp/codistill-a1/SEED/checkpoint-100/large) counts as the same path. A group of several
    seeds is named after the folder holding them: runs/cmp/ct/{1,2,3} -> ct. Two runs of a group with the same seed
    are BadInput: they would count as two seeds and understate the spread."""
    groups = {}
    for r in runs:
        seed_dir = f"/{r['args'].get('seed')}/"
        same = {k: v.replace(seed_dir, "/SEED/") if isinstance(v, str) else v for k, v in r["args"].items()
                if k not in cg.RESUMABLE | {"seed", "batch_size", "processes"}}
        if same and "batch_size" in r["args"]:
            same["global_batch"] = r["args"]["batch_size"] * r["args"].get("processes", 1)
        group = groups.setdefault(json.dumps(same, sort_keys=True) if same else r["dir"], [])
        twin = [g["dir"] for g in group if same and g["args"].get("seed") == r["args"].get("seed")]
        if twin:
            raise cg.BadInput(f"--runs: {r['dir']} and {twin[0]} have the same settings and the same --seed "
                              f"{r['args'].get('seed')}: as two seeds of one group they would understate its spread")
        group.append(r)
    return [(os.path.basename(os.path.dirname(os.path.normpath(g[0]["dir"]))) if len(g) > 1 else g[0]["label"], g)
            for g in groups.values()]


def mean_series(group, key):
    """(iterations, mean, min, max) over the runs of a group, on the iterations they all have."""
    points = [dict(zip(*series(run, key))) for run in group]
    xs = sorted(set.intersection(*(set(p) for p in points))) if points else []
    ys = [[p[x] for p in points] for x in xs]
    return xs, [statistics.mean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def seeds_table(groups, model):
    """Tables 1 and 2 for training runs: the model's held-out accuracy at the first and the last evaluation, and
    its change, each as mean ± population std over the seeds of a group."""
    pm = lambda v: f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}"
    lines = []
    for label, group in groups:
        accs = [series(r, f"{r['prefix'][model]}/test_accuracy")[1] for r in group if model in r["prefix"]]
        accs = [[100 * v for v in a] for a in accs if len(a) > 1]  # one evaluation: the model was not trained
        if accs:
            start, end = [a[0] for a in accs], [a[-1] for a in accs]
            lines.append([label, str(len(accs)), pm(start), pm(end), pm([e - s for s, e in zip(start, end)])])
    return markdown(["run", "seeds", f"{model} held-out acc, start (%)", "end (%)", "change (points)"], lines)


def plot_runs(groups, plot_dir):
    """Figure 3 (held-out accuracy vs iteration, per model), Figures 1 and 4 (fraction of prompts with no correct
    rollout vs iteration), and the mean step time by phase -> paths of the PNGs written. groups: [(label, runs)];
    a group of several seeds is drawn as its mean, with its range shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(plot_dir, exist_ok=True)
    paths = []

    def save(fig, name):
        paths.append(os.path.join(plot_dir, name))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    styles = {label: dict(color=f"C{i % 10}", linestyle=["-", "--", ":"][i // 10 % 3])  # the same in every plot;
              for i, (label, _) in enumerate(groups)}                                  # past 10 groups, dashed

    def curve(ax, label, group, key_of, **kw):
        xs, mean, lo, hi = mean_series(group, key_of(group[0]))
        ax.plot(xs, mean, label=label, **styles[label], **kw)
        if len(group) > 1:
            ax.fill_between(xs, lo, hi, color=styles[label]["color"], alpha=0.15, linewidth=0)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))  # each its own scale: the two models are far apart
    for col, model in enumerate(["small", "large"]):
        key_of = lambda run: f"{run['prefix'][model]}/test_accuracy"
        for label, group in groups:  # a model evaluated once (frozen, e.g. kdrl's large) is left out
            if model in group[0]["prefix"] and len(series(group[0], key_of(group[0]))[0]) != 1:
                curve(axes[0, col], label, group, key_of, marker="o")
        axes[0, col].set(title=f"{model} model", xlabel="iteration", ylabel="held-out accuracy")
        entropy_of = lambda run: f"{run['prefix'][model]}/entropy"  # per token, on the iteration's rollouts
        for label, group in groups:
            if model in group[0]["prefix"] and series(group[0], entropy_of(group[0]))[0]:
                curve(axes[1, col], label, group, entropy_of)
        axes[1, col].set(xlabel="iteration", ylabel="entropy per completion token (nats)")
        for ax in axes[:, col]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    save(fig, "test_accuracy.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, group in groups:
        curve(ax, label, group, lambda run: f"{run['prefix'].get('small', 'policy')}/zero_accuracy_frac")
    ax.set(xlabel="iteration", ylabel="fraction of prompts with zero accuracy", ylim=(0, 1.02))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, "zero_accuracy_frac.png")

    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.5 * len(groups)))
    step_time_bars(ax, groups)
    save(fig, "step_time.png")
    return paths


def step_time_bars(ax, groups):
    """The mean step time of each group, as bars stacked by phase (the phases add up to the step)."""
    seconds = {p: [statistics.mean(mean_of(run, f"time/{p}") or 0.0 for run in group) for _, group in groups]
               for p in ["step"] + PHASES}
    seconds["other"] = [max(step - sum(seconds[p][i] for p in PHASES), 0.0) for i, step in enumerate(seconds["step"])]
    left = [0.0] * len(groups)
    for phase in PHASES + ["other"]:
        ax.barh([label for label, _ in groups], seconds[phase], left=left, label=phase)
        left = [l + w for l, w in zip(left, seconds[phase])]
    ax.set(xlabel="mean seconds per iteration")
    ax.invert_yaxis()  # the first run on top, as in the table
    ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)


def evaluate_runs(a):
    seen = {}
    for d in a.runs:  # a run given twice would count as two seeds
        if os.path.realpath(d) in seen:
            raise cg.BadInput(f"--runs: {d} is the same run as {seen[os.path.realpath(d)]}")
        seen[os.path.realpath(d)] = d
    runs = [load_run(d) for d in a.runs]
    labels = [r["label"] for r in runs]
    for r in runs:  # two runs with the same settings are told apart by their folder
        r["label"] += f" [{os.path.basename(os.path.normpath(r['dir']))}]" if labels.count(r["label"]) > 1 else ""
    summaries = [summarize_run(r) for r in runs]
    groups = group_runs(runs)
    table = runs_table(summaries)
    if any(len(g) > 1 for _, g in groups):  # several seeds: Tables 1 and 2 over them
        table += "".join(f"\n\n{seeds_table(groups, m)}" for m in ["small", "large"])
    elif len(runs) > 1:
        table += ("\n\nNo tables over seeds: no two of these runs differ only in --seed (and in what a resumed run "
                  "may change).")
    print(table)  # before the plots: a failure there loses no figure
    return table, summaries, plot_runs(groups, a.plot_dir)


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    paper, tiny = cg.Args(), cg.PRESETS["tiny"]
    default = lambda key: f"default: the checkpoints' (args.json), else {tiny.get(key, getattr(paper, key))} for " \
                          f"toy only, else {getattr(paper, key)}"
    p.add_argument("models", nargs="*", metavar="MODEL", help="checkpoint folders or hub ids; the first: the baseline")
    p.add_argument("--benchmarks", default="minerva,math500,amc23,olympiadbench",
                   help=f"comma-separated: {', '.join(BENCHMARKS)}, toy, or local JSON/JSONL files\n"
                   "(default: %(default)s, the paper's)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N problems of each benchmark; 0 = all")
    p.add_argument("--temperature", type=float, help="0: greedy; > 0: sampled, top_k=0, top_p=1; " +
                   default("eval_temperature"))
    p.add_argument("--seeds", type=int, default=1, help="K sampled runs, seeds 0..K-1 (with --temperature)")
    p.add_argument("--max_new_tokens", type=int, help="N, max completion tokens; " + default("max_completion_length"))
    p.add_argument("--max_prompt_length", type=int, help="longer prompts are cut; " + default("max_prompt_length"))
    p.add_argument("--batch_size", type=int, help="problems per generate call; " + default("gen_batch_size"))
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="the weights' dtype when decoding (auto: "
                   "bf16 on GPU, fp32 on CPU); " + default("dtype"))
    p.add_argument("--template", choices=list(cg.TEMPLATES), help="prompt template; " + default("template"))
    p.add_argument("--chat_template", action=argparse.BooleanOptionalAction,
                   help="wrap prompts in the tokenizer's chat template; " + default("chat_template"))
    p.add_argument("--out", help="write the table rows and the per-problem results to this JSON file")
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN_DIR", help="training runs to summarize and plot")
    p.add_argument("--plot_dir", default="plots", help="where the --runs PNGs go (default: %(default)s)")
    p.add_argument("--cache_dir", default=cg.Args.cache_dir, help="where tiny:small / tiny:large are built and cached "
                   "(default: %(default)s)")
    return p.parse_args(argv)


def check_args(a):
    """Bad flags and output paths, refused before any work (cg.BadInput names the flag)."""
    if not a.models and not a.runs:
        raise cg.BadInput("give MODEL checkpoints or hub ids to score, or --runs RUN_DIR to summarize")
    if a.temperature is not None and (not math.isfinite(a.temperature) or a.temperature < 0):
        raise cg.BadInput(f"--temperature must be 0 (greedy) or a positive number, got {a.temperature}")
    for name, low in [("seeds", 1), ("batch_size", 1), ("limit", 0), ("max_new_tokens", 1), ("max_prompt_length", 1)]:
        if getattr(a, name) is not None and getattr(a, name) < low:
            raise cg.BadInput(f"--{name} must be >= {low}, got {getattr(a, name)}")
    if a.out:  # a missing folder or a folder in the way fails now, not after hours of scoring
        folder = os.path.dirname(os.path.abspath(a.out))
        if os.path.isdir(a.out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise cg.BadInput(f"--out {a.out}: cannot write a file there")
    if a.out and any(os.path.exists(b) and os.path.samefile(a.out, b) for b in a.benchmarks.split(",")
                     if os.path.exists(a.out)):
        raise cg.BadInput(f"--out {a.out} is one of the --benchmarks: it would be overwritten")
    if a.runs and os.path.exists(a.plot_dir) and not os.path.isdir(a.plot_dir):
        raise cg.BadInput(f"--plot_dir {a.plot_dir}: a file is in the way")
    parent = os.path.abspath(a.plot_dir)
    while not os.path.exists(parent):  # the plots must have somewhere to go before the runs are read
        parent = os.path.dirname(parent)
    if a.runs and (not os.path.isdir(parent) or not os.access(parent, os.W_OK)):
        raise cg.BadInput(f"--plot_dir {a.plot_dir}: cannot be written ({parent} is not a folder it can write in)")


def write_json(path, obj):
    """Written aside and renamed into place: a crash leaves the previous version whole."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    a = parse_args(argv)
    try:
        check_args(a)
        out, missing = {}, []
        if a.runs:
            table, out["runs"], plots = evaluate_runs(a)
            print("\nplots: " + ", ".join(plots))
        if a.models:
            table, out["models"], missing = evaluate_models(a)
            print(table)
        if a.out:
            write_json(a.out, out)
            print(f"wrote {a.out}")
        if missing:
            raise cg.BadInput(f"missing from the table (could not be loaded): {', '.join(missing)}")
    except cg.BadInput as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the loader's message
        sys.exit(2)


if __name__ == "__main__":
    main()
