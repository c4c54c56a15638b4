"""
The trainer's files, read and written with care: bad input, problems, checkpoints, resume, the run folder and its
logs (and which rank speaks under torchrun).

Machinery the paper does not describe, kept out of codistill_grpo.py so that the trainer reads as the method and its
loop. codistill_grpo.py imports the names it calls from here, so `codistill_grpo.load_problems` is this module's;
a test that patches a function called from inside this module patches it here.
What it guarantees: bad input stops with one line naming the flag, file, line or row (BadInput) before any model
loads; a checkpoint is written aside and renamed into place, so a crash or a full disk leaves the previous one
whole; a resumed run goes on from a complete checkpoint with its rows up to there; a run folder that holds another
run is never written over, and nothing of the user's own is deleted.
"""

import dataclasses
import decimal
import fcntl
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# Errors, and which rank speaks (under torchrun; one process is rank 0 of 1)


class BadInput(Exception):
    """Bad user input: main() prints the one-line message and exits with status 2."""


class Stopped(Exception):
    """The run cannot go on (e.g. a checkpoint could not be written): main() prints the one line, status 1."""


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kw):
    if rank() == 0:
        print(*args, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Text files and logs: read with errors that name the line, written whole or not at all


def read_text(path):
    """A UTF-8 text file (a byte-order mark in front, as some editors write, is dropped), BadInput naming the file and
    the line of the first byte that is not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadInput(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise BadInput(f"{path}: line {line} is not UTF-8 text") from None


def read_jsonl(path, missing_ok=False, numbered=False, cut_last_ok=True):
    """Rows of a JSONL file (dicts), BadInput naming the file and the line (1-based, blank lines counted) of a line
    that is not a JSON object; a half-written last line (a crash while writing it) is dropped when cut_last_ok (a
    run's own files; never a dataset). numbered: (line, row) pairs."""
    if missing_ok and not os.path.exists(path):
        return []
    lines, rows = read_text(path).split("\n"), []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # also numbers of > 4300 digits and deep nesting
            if i == len(lines) and cut_last_ok:  # no newline after it: the last line was still being written
                break
            raise BadInput(f"{path}: line {i} is not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
        if not isinstance(row, dict):
            raise BadInput(f"{path}: line {i} is not a JSON object")
        rows.append((i, row) if numbered else row)
    return rows


def write_atomically(path, text):
    """path written aside and renamed into place; Stopped naming it (nothing left behind) when it cannot be."""
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.isfile(path + ".tmp"):
            os.remove(path + ".tmp")
        raise Stopped(f"cannot write {path} ({e.strerror})") from None


def write_row(f, row):
    """One JSON line, flushed. Non-finite floats are written as null, so the file stays valid JSON (strict readers
    reject NaN); a guard upstream should have stopped them, so each is reported."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        tqdm.write(f"warning: iteration {row.get('iteration')}: non-finite {', '.join(bad)} written as null",
                   file=sys.stderr)
    f.write(json.dumps({k: None if k in bad else v for k, v in row.items()}, allow_nan=False) + "\n")
    f.flush()


def open_reporter(args):
    """Optional tensorboard / wandb logger: -> function(metrics, step)."""
    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
        return lambda m, step: [writer.add_scalar(k, v, step) for k, v in m.items() if isinstance(v, (int, float))]
    if args.report_to == "wandb":
        import wandb
        wandb.init(project="codistill-grpo", config=dataclasses.asdict(args), dir=args.output_dir)
        return lambda m, step: wandb.log(m, step=step)
    return lambda m, step: None


# ----------------------------------------------------------------------------------------------------------------
# Problems: local JSON/JSONL files and hub datasets, each row checked


HUB_DATASETS = {  # id -> (config, splits by use, problem column, answer of a row); eval.py's benchmarks too
    "DigitalLearningGmbH/MATH-lighteval": ("default", {"train": ["train", "test"], "test": ["test"]}, "problem",
                                           lambda row: last_boxed(row["solution"])),
    "HuggingFaceH4/MATH-500": (None, {"train": ["test"], "test": ["test"]}, "problem", lambda row: row["answer"]),
    "openai/gsm8k": ("main", {"train": ["train"], "test": ["test"]}, "question",
                     lambda row: row["answer"].split("####")[-1].strip().replace(",", "")),
    "math-ai/minervamath": (None, {"test": ["test"]}, "question", lambda row: row["answer"]),
    "math-ai/amc23": (None, {"test": ["test"]}, "question", lambda row: row["answer"]),
    "math-ai/olympiadbench": (None, {"test": ["test"]}, "question",  # final_answer is a list of one string
                              lambda row: row["final_answer"][0] if isinstance(row["final_answer"], list)
                              else row["final_answer"]),
}


MATH500_ID = "HuggingFaceH4/MATH-500"


def load_problems(name, split="train"):
    """-> list of {'problem', 'answer'} from a local JSON/JSONL file or a hub dataset; BadInput names the file and the
    line (JSONL) or row (JSON list, hub; 1-based) of a row without a problem or an answer that can be graded."""
    if os.path.isfile(name) and name.endswith(".json"):
        try:
            rows = json.loads(read_text(name))
        except json.JSONDecodeError as e:
            raise BadInput(f"dataset {name}: line {e.lineno} is not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # numbers of > 4300 digits, deep nesting
            raise BadInput(f"dataset {name}: not JSON that can be read ({type(e).__name__})") from None
        if not isinstance(rows, list):
            raise BadInput(f"dataset {name}: a JSON list of rows with 'problem' and 'answer' expected")
        where, places = name, [f"row {i}" for i in range(1, len(rows) + 1)]
    elif os.path.isfile(name):
        numbered = read_jsonl(name, numbered=True, cut_last_ok=False)
        where, places, rows = name, [f"line {i}" for i, _ in numbered], [r for _, r in numbered]
    elif os.path.isdir(name):  # datasets would take it, and write an Arrow cache under the user's home
        raise BadInput(f"dataset {name} is a folder: give a JSON/JSONL file with 'problem' and 'answer', or a hub id")
    elif name.endswith((".json", ".jsonl")):
        raise BadInput(f"dataset {name}: no such file")
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
    rows = [checked_row(r, f"dataset {where}: {place}") for r, place in zip(rows, places)]
    warn_about(rows, f"dataset {where}")
    return rows


def problem_key(problem):
    """A problem as the trainer compares problems: its words, whatever the whitespace between them."""
    return " ".join(problem.split())


def warn_about(rows, where):
    """One line for each thing in a dataset that trains or scores wrong without stopping a run: the same problem with
    different answers (each copy is trained on with its own), and answers with characters the grader may not read."""
    answers = {}
    for r in rows:
        answers.setdefault(problem_key(r["problem"]), set()).add(r["answer"])
    clashes = [(p, sorted(a)) for p, a in answers.items() if len(a) > 1]
    if clashes:
        print0(f"warning: {where}: {len(clashes)} problem(s) appear with different answers (e.g. {clashes[0][0][:60]!r}: "
               f"{' and '.join(repr(a) for a in clashes[0][1][:2])}); each copy is trained on, and scored, with its own")
    odd = [r["answer"] for r in rows if not r["answer"].isascii()]
    if odd:
        print0(f"warning: {where}: {len(odd)} answer(s) hold characters the grader may not read (e.g. {odd[0][:40]!r}); "
               "write them in LaTeX")


def checked_row(row, where):
    """{'problem': str, 'answer': str} of a row, or BadInput: a problem is text; an answer text or a number (a list, a
    boolean or a blank could never be graded right). A number keeps its value as text (1e-05 -> 0.00001)."""
    if not isinstance(row, dict):
        raise BadInput(f"{where} is not an object with 'problem' and 'answer'")
    problem, answer = row.get("problem"), row.get("answer")
    if not isinstance(problem, str) or not problem.strip():
        raise BadInput(f"{where}: 'problem' must be non-blank text, got {str(problem)[:40]!r}")
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer)
    if not number and not (isinstance(answer, str) and answer.strip()):
        raise BadInput(f"{where}: 'answer' must be non-blank text or a number, got {str(answer)[:40]!r}")
    number_text = format(decimal.Decimal(repr(answer)).normalize(), "f") if number else None  # never 1e-05
    return {"problem": problem, "answer": number_text or latex_of(answer.strip())}


UNICODE_MATH = {"\u2212": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u03c0": "\\pi ", "\u221e": "\\infty ",
                "\u2264": "\\le ", "\u2265": "\\ge ", "\u2260": "\\ne ", "\u00b0": "^\\circ "}


def latex_of(answer):
    """A gold answer with the unicode math a grader does not read written as LaTeX: vulgar fractions (\u00bd ->
    \\frac{1}{2}), square roots (\u221a2 -> \\sqrt{2}), superscript digits (x\u00b2 -> x^{2}), and the signs of
    UNICODE_MATH. An answer in plain ASCII is returned as it is."""
    import unicodedata
    if answer.isascii():
        return answer
    out, sup = [], ""
    for ch in answer + " ":  # (a space at the end closes a run of superscripts)
        name = unicodedata.name(ch, "")
        if name.startswith("SUPERSCRIPT") and unicodedata.normalize("NFKC", ch).isdigit():
            sup += unicodedata.normalize("NFKC", ch)
            continue
        if sup:
            out.append(f"^{{{sup}}}")
            sup = ""
        if name.startswith("VULGAR FRACTION"):  # NFKC: 1/2 with a fraction slash
            num, den = unicodedata.normalize("NFKC", ch).split("\u2044")
            out.append(f"{'+' if out and out[-1][-1:].isdigit() else ''}\\frac{{{num or 1}}}{{{den}}}")
        else:
            out.append(UNICODE_MATH.get(ch, ch))
    text = "".join(out)
    return re.sub(r"\u221a\s*(\d+(?:\.\d+)?|\w|\([^()]*\))", lambda m: f"\\sqrt{{{m.group(1).strip('()')}}}", text).strip()


def answer_or_none(answer_of, row):
    try:
        return answer_of(row)
    except (KeyError, TypeError, AttributeError):
        return None


def training_problems(name):
    """Training rows; MATH (train + test = 12,500) without the 500 problems of MATH500, which we evaluate on."""
    rows = load_problems(name, "train")
    if name == "DigitalLearningGmbH/MATH-lighteval":
        held_out = {problem_key(r["problem"]) for r in load_problems(MATH500_ID, "test")}
        kept = [r for r in rows if problem_key(r["problem"]) not in held_out]
        print(f"training set: {len(rows)} MATH problems, {len(rows) - len(kept)} of MATH500 left out -> {len(kept)}")
        rows = kept
    return rows


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
# Checkpoints and resume


def save_checkpoint(modules, optims, tokenizer, args, iteration, plan=None):
    """OUTPUT_DIR/checkpoint-<iteration>/: a Hugging Face folder per trained model (its fp32 weights), trainer_state.pt
    (optimizers, schedulers, iteration, plan: the planned length and the data's hash) and args.json, renamed into place;
    then older checkpoints beyond --keep_checkpoints go. A crash or a full disk at any point leaves the previous
    checkpoint whole. Under torchrun every rank calls it (FSDP2 gathers the shards) and rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    weights = {n: full_state_dict(m) for n, m in modules.items()}  # whole on rank 0
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # keyed by names: loads into any world size
    optimizers = {n: get_optimizer_state_dict(modules[n], opt, options=whole) for n, (opt, sched) in optims.items()}
    final = os.path.join(args.output_dir, f"checkpoint-{iteration}")
    failure = write_checkpoint(final, weights, optimizers, modules, optims, tokenizer, args, iteration, plan) \
        if rank() == 0 else None
    if dist.is_initialized():  # every rank learns how the save went: all go on, or all stop with rank 0's line
        status = [failure]
        dist.broadcast_object_list(status, src=0)
        failure = status[0]
    if failure:
        raise Stopped(failure)
    return final


def write_checkpoint(final, weights, optimizers, modules, optims, tokenizer, args, iteration, plan):
    """Rank 0's part of save_checkpoint -> None, or the one line that says why the checkpoint could not be written."""
    for name, sd in weights.items():  # NaN weights never reach a checkpoint
        if not all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()):
            return f"the {name} model has non-finite weights at iteration {iteration}: not saved"
    tmp = final + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        for name, module in modules.items():
            model = lm_of(module)
            model.save_pretrained(os.path.join(tmp, name), state_dict=weights[name])
            tokenizer.save_pretrained(os.path.join(tmp, name))
            if hasattr(model, "own_generation_config"):  # users of the checkpoint get the model's own settings
                model.own_generation_config.save_pretrained(os.path.join(tmp, name))
        torch.save(dict(iteration=iteration, **(plan or {}), optimizers=optimizers,
                        schedulers={n: sched.state_dict() for n, (opt, sched) in optims.items()}),
                   os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args) | dict(iteration=iteration, processes=world()), f, indent=1)
        shutil.rmtree(final, ignore_errors=True)  # the same iteration saved by an earlier attempt of this run
        os.replace(tmp, final)
        write_atomically(os.path.join(args.output_dir, "latest"), os.path.basename(final) + "\n")
    except BaseException as e:  # a full disk, a kill signal: no half-written checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        free = shutil.disk_usage(args.output_dir).free / 2**20
        return (f"saving {final} failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); {free:.0f} MB "
                f"are free there{' (the disk is full)' if free < 64 else ''}. The checkpoints before it are whole: free "
                "some space (--keep_checkpoints K needs room for K + 1) and continue with --resume")
    for old in checkpoints_in(args.output_dir)[:-args.keep_checkpoints] if args.keep_checkpoints else []:
        shutil.rmtree(old)
    return None


def lm_of(module):
    """The Hugging Face model inside a (maybe DDP-wrapped) TokenLogprobs."""
    return getattr(module, "module", module).lm


def full_state_dict(module):
    """A model's whole state dict on CPU with Hugging Face names; under FSDP2 gathered from the shards (a
    collective: every rank calls it, rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in sd.items()}


def checkpoints_in(run_dir):
    """Complete checkpoints of a run, oldest first (a folder still being written ends in .tmp)."""
    found = [(int(m.group(1)), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return [path for _, path in sorted(found)]


def find_checkpoint(path):
    """The checkpoint to resume from: PATH itself, or in a run folder the one its `latest` names (the run's own
    record), else its newest complete checkpoint (an incomplete one is named and passed over)."""
    if not os.path.isdir(path):
        raise BadInput(f"--resume {path}: no such folder")
    if os.path.exists(os.path.join(path, "trainer_state.pt")) or re.fullmatch(r"checkpoint-\d+", os.path.basename(
            os.path.normpath(path))):
        if checkpoint_problem(path):
            raise BadInput(f"--resume {path}: not a complete checkpoint ({checkpoint_problem(path)})")
        return path
    found = checkpoints_in(path)
    if not found:
        raise BadInput(f"--resume {path}: no checkpoint-<iteration> folder there")
    try:
        with open(os.path.join(path, "latest"), encoding="utf-8") as f:
            latest = os.path.join(path, f.read().strip())
        if latest in found and not checkpoint_problem(latest):
            return latest
    except (OSError, UnicodeDecodeError):
        pass
    for ckpt in reversed(found):
        if not checkpoint_problem(ckpt):
            return ckpt
        print0(f"note: {ckpt} is not complete ({checkpoint_problem(ckpt)}); looking at the one before")
    raise BadInput(f"--resume {path}: no complete checkpoint there (the newest, {found[-1]}: "
                   f"{checkpoint_problem(found[-1])})")


def checkpoint_problem(ckpt):
    """What a checkpoint lacks, or None when it is whole: trainer_state.pt, args.json, and each model it saved whole
    (model_problem)."""
    for need in ["trainer_state.pt", "args.json"]:
        if not os.path.exists(os.path.join(ckpt, need)):
            return f"no {need}"
    try:
        algo = json.load(open(os.path.join(ckpt, "args.json"), encoding="utf-8")).get("algo", "codistill")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return "args.json cannot be read"
    if algo not in ("codistill", "kdrl", "grpo"):
        return f"its args.json names an unknown --algo {str(algo)[:40]!r}"
    for name in {"codistill": ["small", "large"], "kdrl": ["small"], "grpo": ["policy"]}[algo]:
        problem = model_problem(os.path.join(ckpt, name))
        if problem:  # 'no small model (...)', 'large/model.safetensors is damaged (...)'
            return problem.replace("no model", f"no {name} model") if problem.startswith("no ") else f"{name}/{problem}"
    return None


def model_problem(folder):
    """What a model folder lacks, or None when it looks whole: config.json, and weights whose safetensors headers cover
    their files (a file cut short fails here) -> 'no model (config.json and *.safetensors)' or 'FILE is damaged (...)'."""
    from safetensors import safe_open
    weights = [f for f in os.listdir(folder) if f.endswith(".safetensors")] if os.path.isdir(folder) else []
    if not os.path.exists(os.path.join(folder, "config.json")) or not weights:
        return "no model (config.json and *.safetensors)"
    for w in sorted(weights):
        try:
            with safe_open(os.path.join(folder, w), "pt"):
                pass
        except Exception as e:  # safetensors raises its own error type for a damaged file
            return f"{w} is damaged ({str(e)[:80]})"
    return None


def load_trainer_state(ckpt, names):
    """trainer_state.pt of a checkpoint, checked whole before any model is loaded (BadInput otherwise)."""
    try:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    except Exception as e:
        raise BadInput(f"--resume {ckpt}: trainer_state.pt cannot be read ({type(e).__name__}: {str(e)[:150]})")
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        raise BadInput(f"--resume {ckpt}: trainer_state.pt holds no iteration")
    named = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(ckpt)))
    if named and int(named.group(1)) != state["iteration"]:  # a file copied from another checkpoint
        raise BadInput(f"--resume {ckpt}: its trainer_state.pt is iteration {state['iteration']}'s, not "
                       f"{named.group(1)}'s: the folder holds another checkpoint's state")
    for n in names:
        if n not in state.get("optimizers", {}) or n not in state.get("schedulers", {}):
            raise BadInput(f"--resume {ckpt}: the {n} model's optimizer state is missing")
    return state


def rows_to_keep(args, iteration):
    """A resumed run's rows of metrics.jsonl, rollouts.jsonl and resumes.jsonl up to the checkpoint's iteration, read
    from the run the checkpoint belongs to (another folder when the run forks); BadInput on a damaged file."""
    source, kept = os.path.dirname(os.path.abspath(args.resume)), {}
    for name in ["metrics", "rollouts", "resumes"]:
        path = os.path.join(source, f"{name}.jsonl")
        if name == "metrics" and not os.path.exists(path):
            print0(f"note: {path} is missing; the resumed run's metrics.jsonl starts at iteration {iteration + 1}")
        rows = read_jsonl(path, missing_ok=True, numbered=True)
        for line, r in rows:
            if not isinstance(r.get("iteration"), int):
                raise BadInput(f"{path}: line {line} has no iteration")
        kept[name] = [r for _, r in rows if r["iteration"] <= iteration]
    if iteration not in [r["iteration"] for r in kept["metrics"]]:
        print0(f"note: {source}/metrics.jsonl has no row for iteration {iteration} (cut short?); the resumed run's "
               f"rows go on from iteration {iteration + 1}")
    return kept


def had_grpo(model):
    """Whether a model folder is a checkpoint of GRPO on the large model (its run's args.json says so)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.normpath(model)), "args.json"), encoding="utf-8") as f:
            saved = json.load(f)
        return saved.get("algo") == "grpo" and saved.get("policy") == "large"
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# The run folder: one run at a time, nothing of another run overwritten, room checked before training


def check_output_dir(args, resuming):
    """Refuse an unwritable folder (a full disk too), and one that holds another run, unless the run continues there
    (--resume from one of its checkpoints) or --overwrite -> the old run's files, deleted once the models have loaded
    (everything that can fail on input is checked before anything is deleted)."""
    if os.path.exists(os.path.join(args.output_dir, "trainer_state.pt")):  # its args.json would be overwritten
        raise BadInput(f"--output_dir {args.output_dir} is a checkpoint folder: give the run a folder of its own")
    if os.path.lexists(args.output_dir) and not os.path.isdir(args.output_dir):
        what = "a file" if os.path.exists(args.output_dir) else "a link to nowhere"
        raise BadInput(f"--output_dir {args.output_dir} is {what}, not a folder")
    probe = os.path.join(args.output_dir, f".write_test{rank()}")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        write_atomically(probe, "x" * 2**20)  # a full disk fails here, not after the models have loaded
        os.remove(probe)
    except (OSError, Stopped) as e:
        raise BadInput(f"--output_dir {args.output_dir}: not writable ({getattr(e, 'strerror', None) or e})") from None
    previous = run_files(args.output_dir)
    if not previous or resuming and os.path.samefile(args.output_dir, os.path.dirname(os.path.abspath(args.resume))):
        return []
    if not args.overwrite:
        if resuming:
            way = f"a fork of {args.resume} needs a folder of its own: choose another, or add --overwrite"
        elif any(not checkpoint_problem(c) for c in checkpoints_in(args.output_dir)):
            way = "add --resume to continue it, --overwrite to start afresh, or choose another folder"
        else:
            way = "it has no checkpoint to resume from: add --overwrite to start afresh, or choose another folder"
        raise BadInput(f"--output_dir {args.output_dir} already holds a run "
                       f"({', '.join(os.path.basename(p) for p in previous[:3])}): {way}")
    return previous


RUN_FILES = re.compile(r"(metrics|rollouts|resumes)\.jsonl|(args\.json|latest)(\.tmp)?|checkpoint-\d+(\.tmp)?|"
                       r"superseded-\d+-\d+|tensorboard")


def run_files(folder):
    """The files and folders a run writes in its --output_dir (and nothing else: a user's own files stay)."""
    return [os.path.join(folder, d) for d in sorted(os.listdir(folder)) if RUN_FILES.fullmatch(d)]


def supersede(run_dir, iteration):
    """Resuming a run in its folder from an older checkpoint: the newer checkpoints, and the run's files as they were,
    move to run_dir/superseded-<iteration>-<time>/: the folder is as if the run had stopped there; nothing is lost."""
    newer = [c for c in checkpoints_in(run_dir) if int(c.rsplit("-", 1)[1]) > iteration]
    if not newer:
        return
    aside = os.path.join(run_dir, f"superseded-{iteration}-{time.strftime('%Y%m%d%H%M%S')}")
    os.makedirs(aside)
    for name in ["metrics.jsonl", "rollouts.jsonl", "resumes.jsonl"]:
        if os.path.exists(os.path.join(run_dir, name)):
            shutil.copy2(os.path.join(run_dir, name), aside)
    for c in newer:
        os.replace(c, os.path.join(aside, os.path.basename(c)))
    print(f"note: resuming from checkpoint-{iteration}: the newer {', '.join(os.path.basename(c) for c in newer)} "
          f"and the run's files as they were are moved to {aside}")


LOCK = {}  # the run folder's lock file, while one_run_at_a_time holds it


def lock_not_inherited():
    """In a process forked during a run (the grading worker): close its copy of the run's lock file, so that the lock
    goes with the trainer when it dies (a restarted torchrun worker takes it at once), not with the worker."""
    if "file" in LOCK:
        LOCK.pop("file").close()


os.register_at_fork(after_in_child=lock_not_inherited)


@contextmanager
def one_run_at_a_time(folder):
    """Rank 0 holds an exclusive lock on folder/.lock while the run lasts (the system frees it when the process ends,
    however it ends): a second run started in the same folder is refused instead of writing over the first one."""
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
        LOCK["file"] = f
        try:
            yield
        finally:
            LOCK.pop("file", None)
            fcntl.flock(f, fcntl.LOCK_UN)


def check_room(args, trained_params):
    """A checkpoint holds each trained model's fp32 weights and its two AdamW states (12 bytes a parameter), and
    --keep_checkpoints K needs room for K + 1 while the newest is written: refuse when one does not fit, warn when
    K + 1 do not."""
    one, free = 12 * trained_params / 2**20, shutil.disk_usage(args.output_dir).free / 2**20  # MB
    if free < one:
        raise BadInput(f"--output_dir {args.output_dir}: {free:.0f} MB free; one checkpoint takes about {one:.0f} MB")
    if free < (args.keep_checkpoints + 1 if args.keep_checkpoints else 1) * one:
        print0(f"warning: --output_dir {args.output_dir} has {free:.0f} MB free; checkpoints take about {one:.0f} MB "
               f"each and --keep_checkpoints {args.keep_checkpoints} needs room for {args.keep_checkpoints + 1}")


def where_it_stopped(run_dir):
    """One line for an interrupted run: the last iteration in metrics.jsonl and the checkpoint --resume would take."""
    try:
        rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"), missing_ok=True)
        found = [c for c in checkpoints_in(run_dir) if not checkpoint_problem(c)] if os.path.isdir(run_dir) else []
    except BadInput:
        rows, found = [], []
    last = f"metrics.jsonl has iterations up to {rows[-1].get('iteration')}" if rows else "no metrics rows yet"
    return f"{last}; {'newest checkpoint ' + found[-1] + ' (continue with --resume)' if found else 'no checkpoint'}"
