"""Shared by every test file: the tiny world with random weights (built in seconds), small models that half know two
problems, and helpers that run the trainer and read what it wrote. Nothing here compares a run with numbers
recorded on one machine."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline: a hub lookup fails fast, not in 20 s
# torch.compile's kernel cache is not keyed by the instruction set ATen is told to use: kernels cached by a native run
# and loaded under ../shared/tools/other-cpu (ATEN_CPU_CAPABILITY=avx2) decoded garbage. One cache per set.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{os.getuid()}_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))

import json
import statistics

import pytest
import torch

import codistill_grpo as cg
import tiny_world


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than about 20 s (torchrun, subprocesses, long runs)")


HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The tiny world with random weights (built in a second; the preset's warm-ups take minutes)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    return dict(cache=cache, **tiny_world.build(cache, cg.TEMPLATES, seed=0, steps=dict(small=0, large=0)))


@pytest.fixture(scope="session")
def tiny(world):
    from transformers import AutoModelForCausalLM
    tok = cg.load_tokenizer(world["small"])
    model = AutoModelForCausalLM.from_pretrained(world["small"], dtype=torch.float32)
    return tok, model


@pytest.fixture(scope="session")
def based(world, tmp_path_factory):
    """Tiny base models that know 2 problems partly (both models right on some samples and wrong on others, so
    that rewards are mixed and both models learn): random weights get no reward at all, and then no GRPO advantage
    and no update either. strong: a large model that is right on nearly every sample."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("based")
    tok = cg.load_tokenizer(world["small"])
    rows = [json.loads(l) for l in open(world["train"])][:2]
    (root / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, target in [("small", 0.3), ("large", 0.45), ("strong", 0.97)]:
        model = AutoModelForCausalLM.from_pretrained(world["small" if name == "small" else "large"], dtype=torch.float32)
        for steps in range(5, 200, 5):  # until the model is right that often (a few steps more or less on another CPU)
            tiny_world.warmup(model, tok, rows, 5, 2e-3, steps, cg.TEMPLATES["boxed"], batch_size=8, decay=False)
            if sampled_accuracy(model, tok, rows) >= target:
                break
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return dict(world, small=str(root / "small"), large=str(root / "large"), strong=str(root / "strong"),
                data=str(root / "two.jsonl"))


def sampled_accuracy(model, tok, rows, n=64):
    torch.manual_seed(0)
    texts = cg.complete(model, tok, [r["problem"] for r in rows for _ in range(n)], "boxed", 16, 64, [tok.eos_token_id],
                        n * len(rows), temperature=1.0)
    return statistics.mean(cg.final_answer(t, "boxed") == rows[i // n]["answer"] for i, t in enumerate(texts))


def tiny_argv(world, out, *extra):
    """A two-iteration run of --preset tiny on the given world's models and data, shrunk to seconds."""
    return ["--preset", "tiny", "--cache_dir", world["cache"], "--small_model", world["small"], "--large_model",
            world["large"], "--dataset", world["train"], "--eval_dataset", world["test"], "--output_dir", str(out),
            "--max_steps", "2", "--batch_size", "2", "--num_samples", "8", "--group_size", "4", "--eval_size", "4",
            "--eval_every", "1", "--micro_batch_size", "3", "--save_every", "0", *extra]


def based_argv(based, out, *extra):
    """A run on the `based` pair's two problems (held-out accuracy on the world's test problems)."""
    return tiny_argv(dict(based, train=based["data"]), out, *extra)


def flat_params(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture
def no_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(cg, "load_model", boom)


def rows_without_timings(path):
    rows = [json.loads(l) for l in open(path)]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(world, tmp_path):
    out = tmp_path / "run"
    cg.main(tiny_argv(world, out, "--eval_size", "0", "--save_every", "1"))
    return out


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def exit_2(argv, capsys, main=None):
    """Run main(argv), which must stop with exit status 2 -> its one error line."""
    with pytest.raises(SystemExit) as e:
        (main or cg.main)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err and err[-1].startswith("error: "), err
    return err[-1]


def edit_json(path, **changes):
    saved = json.load(open(path))
    saved.update(changes)
    path.write_text(json.dumps({k: v for k, v in saved.items() if v is not None}))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def one_iteration(argv, it=1):
    """A run set up from the trainer's flags, and its iteration it -> (run, its batch of problems, what the iteration
    computed: codistill_grpo.Iteration)."""
    run = cg.setup(cg.parse_args(argv))
    epoch, batch, done = cg.iteration(run, it)
    return run, batch, done


def step_flags(rollouts, own=False):
    """update()'s flags for a plain step on the rollouts: every token's ratio against logp_old (own=True: against the
    model itself), every token in the loss, each sequence divided by the constant N."""
    mask = rollouts["mask"]
    return dict(own=torch.full(mask.shape, own), loss_mask=mask, norm="constant")


def seqs_of(prompt_ids, prompt_mask, comp, mask):
    """Rollouts as update() and score() take them."""
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, comp=comp, mask=mask)
