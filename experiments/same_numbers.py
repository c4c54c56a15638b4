"""A refactor changes no number: run short fixed configurations of the trainer and record their metrics.jsonl rows
(everything but the timings), or compare them with a recording made before the change, on the same machine.

    python experiments/same_numbers.py record before.json      # before the change
    python experiments/same_numbers.py compare before.json     # after it: each difference printed, exit 1 if any

Another CPU or thread count rounds floats differently and samples other tokens, so a recording is compared only on
the machine (and OMP_NUM_THREADS) that made it; that is why this is a script and not a test. The runs use a small
pair warmed up for a few steps in a world of their own (--cache_dir), 3 iterations each, held-out accuracy at 0
and 3, on 4 problems that the pair half knows (a few supervised steps on them).
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402
import trainer_io  # noqa: E402
import tiny_world  # noqa: E402

CONFIGS = {
    "codistill M>G": [],
    "codistill M=G": ["--num_samples", "4"],
    "codistill hints": ["--hint_tokens", "4", "--hint_share", "0.34"],  # iteration 1
    "kdrl": ["--algo", "kdrl"],
    "grpo G": ["--algo", "grpo"],
    "grpo M>G": ["--algo", "grpo", "--num_samples", "8"],
    "kd_form reward_eq4": ["--kd_form", "reward_eq4"],
    "kd_form loss": ["--kd_form", "loss"],
    "kd_form token": ["--kd_form", "token"],
}


def pair(cache_dir):
    """Two models that half know 4 problems (so that rewards are mixed and both models step), those problems, and
    held-out ones."""
    world = tiny_world.build(cache_dir, cg.TEMPLATES, seed=0, steps=dict(small=0, large=0), verbose=False)
    root = os.path.join(cache_dir, "pair")
    paths = dict(small=os.path.join(root, "small"), large=os.path.join(root, "large"),
                 data=os.path.join(root, "four.jsonl"), test=world["test"])
    if not os.path.exists(os.path.join(root, "DONE")):
        import torch
        rows = trainer_io.read_jsonl(world["train"])[:4]
        tok = cg.load_tokenizer(world["small"])
        for name, steps in [("small", 30), ("large", 40)]:
            model = cg.load_model(world[name], torch.float32, "cpu", False)
            tiny_world.warmup(model, tok, rows, steps, 2e-3, 0, cg.TEMPLATES["boxed"], batch_size=8, decay=False)
            model.save_pretrained(paths[name])
            tok.save_pretrained(paths[name])
        with open(paths["data"], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        open(os.path.join(root, "DONE"), "w").close()
    return paths


def run_all(cache_dir, names):
    models = pair(cache_dir)
    out = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            cg.main(["--preset", "tiny", "--small_model", models["small"], "--large_model", models["large"],
                     "--dataset", models["data"], "--eval_dataset", models["test"], "--output_dir", tmp,
                     "--batch_size", "4", "--max_steps", "3",
                     "--eval_size", "8", "--eval_every", "3", "--save_every", "0", *CONFIGS[name]])
            rows = trainer_io.read_jsonl(os.path.join(tmp, "metrics.jsonl"))
        out[name] = [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows]
    return out


def differences(before, after):
    """-> lines naming each configuration, iteration and key whose value differs (exactly)."""
    lines = []
    for name, rows in before.items():
        if name not in after:
            continue
        for old, new in zip(rows, after[name]):
            for k in sorted(set(old) | set(new)):
                if old.get(k) != new.get(k):
                    lines.append(f"{name}, iteration {old.get('iteration')}: {k} {old.get(k)!r} -> {new.get(k)!r}")
        if len(rows) != len(after[name]):
            lines.append(f"{name}: {len(rows)} rows -> {len(after[name])}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["record", "compare"])
    p.add_argument("file")
    p.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    p.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "codistill_same_numbers"))
    a = p.parse_args()
    names = [n for n in a.only.split(",") if n] or list(CONFIGS)
    rows = run_all(a.cache_dir, names)
    if a.mode == "record":
        with open(a.file, "w") as f:
            json.dump(rows, f, indent=0, sort_keys=True)
        print(f"recorded {len(rows)} configurations in {a.file}")
        return
    with open(a.file) as f:
        diffs = differences(json.load(f), rows)
    print("\n".join(diffs) if diffs else f"the same numbers in all {len(rows)} configurations")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
