"""The tiny world: its problems, its warm-up and fixed point, its cache."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import codistill_grpo as cg
import tiny_world
from conftest import HERE


def test_the_tiny_world_is_built_once_per_setting(tmp_path, monkeypatch):
    first = tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=2, large=2))
    calls = []
    monkeypatch.setattr(tiny_world, "warmup", lambda model, *args, **kw: calls.append(1) or model)
    assert tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=2, large=2)) == first and calls == []  # cached
    other = tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=2, large=3))  # a changed setting: a new entry
    assert other["small"] != first["small"] and calls == [1, 1]
    assert os.path.exists(os.path.join(first["small"], "config.json"))  # the old entry is kept


def test_the_tiny_worlds_problems_have_no_carries_and_its_warm_up_decays_to_zero(world):
    train, test = tiny_world.problems(0)
    assert len(train) == 10_000 and len(test) == 500 and not {r["problem"] for r in train} & {r["problem"] for r in test}
    for r in train[:200]:
        x, y = r["problem"].removeprefix("What is ").split(" + ")
        assert len(x) == len(y) == 4 and r["answer"] == str(int(x) + int(y))
        assert all(int(a) + int(b) <= 9 for a, b in zip(x, y))  # each answer digit: the sum of the two above it
    tok = cg.load_tokenizer(world["small"])
    model = cg.load_model(world["small"], torch.float32, "cpu", False)
    lrs = []
    real_step = torch.optim.AdamW.step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", lambda opt, *a, **k: lrs.append(opt.param_groups[0]["lr"]) or
                   real_step(opt, *a, **k))
        tiny_world.warmup(model, tok, train[:50], 40, 1e-3, 0, cg.TEMPLATES["boxed"], batch_size=4)
    assert lrs[0] == pytest.approx(1e-3 / 2) and max(lrs) == pytest.approx(1e-3)  # 5% ramp: 2 steps
    assert lrs[-1] < 1e-3 * 0.01 and lrs == lrs[:2] + sorted(lrs[2:], reverse=True)  # cosine down to ~0


@pytest.mark.slow
def test_the_warm_up_reaches_its_fixed_point_the_spread_targets(world):
    """Soft targets with spread s: at the optimum each answer digit is right with probability 1 - 0.9 s and each
    other digit has s / 10 (the world's base models are built to sit there). One problem, trained to convergence."""
    tok = cg.load_tokenizer(world["small"])
    model = cg.load_model(world["small"], torch.float32, "cpu", False)
    row = {"problem": "What is 3066 + 3630", "answer": "6696"}
    tiny_world.warmup(model, tok, [row], 300, 3e-3, 0, cg.TEMPLATES["boxed"], batch_size=8, spread=0.5)
    text = cg.TEMPLATES["boxed"].format(prompt=row["problem"]) + " \\boxed{"
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = model(ids).logits[0, -1].softmax(-1)
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    assert p[digits[6]].item() == pytest.approx(0.55, abs=0.03)
    assert all(p[d].item() == pytest.approx(0.05, abs=0.02) for d in digits if d != digits[6])


def test_an_interrupted_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def ctrl_c(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(tiny_world, "warmup", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=2, large=2))
    assert [f for f in os.listdir(tmp_path) if not f.endswith(".lock")] == []  # the lock file of its build stays


@pytest.mark.slow
def test_a_killed_build_is_cleaned_up_and_a_damaged_world_built_again(tmp_path, capsys):
    """SIGKILL leaves a build's temporary folder behind: the next build removes it when its process is gone. A
    cached world with a file missing or cut short is built again, with a line saying so."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"tiny-0123456789.tmp{dead.pid}").mkdir()
    (tmp_path / f"tiny-0123456789.tmp{os.getpid()}").mkdir()  # a live process's build stays
    paths = tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=0, large=0))
    assert sorted(f for f in os.listdir(tmp_path) if not f.endswith(".lock")) == sorted([os.path.basename(os.path.dirname(paths["small"])),
                                                   f"tiny-0123456789.tmp{os.getpid()}"])
    weights = os.path.join(paths["large"], "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    assert tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=0, large=0)) == paths
    assert "is damaged (large/model.safetensors" in capsys.readouterr().out
    assert tiny_world.damaged(paths) is None
    os.remove(os.path.join(paths["small"], "tokenizer.json"))
    tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=0, large=0))
    assert "is damaged (no small/tokenizer.json)" in capsys.readouterr().out


def test_a_cached_world_cut_short_is_built_again(tmp_path, capsys):
    paths = tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=0, large=0))
    with open(paths["train"], "r+b") as f:
        f.truncate(10_000)
    tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=0, large=0))
    assert "is damaged (train.jsonl has" in capsys.readouterr().out and tiny_world.damaged(paths) is None


def test_the_warm_up_plants_the_small_models_mistake(world):
    """With a mistake m, an answer digit 7 puts the share m of its 1 - s on 8: at the optimum P(8) = (1 - s) m + s / 10
    and P(7) = (1 - s)(1 - m) + s / 10, so greedy decoding answers 8 where the sum is 7; other digits are as without."""
    tok = cg.load_tokenizer(world["small"])
    model = cg.load_model(world["small"], torch.float32, "cpu", False)
    row = {"problem": "What is 3066 + 4630", "answer": "7696"}
    tiny_world.warmup(model, tok, [row], 300, 3e-3, 0, cg.TEMPLATES["boxed"], batch_size=8, spread=0.5, mistake=0.7)
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    for prefix, digit, expected in [("", 7, {8: 0.4, 7: 0.2}), ("7", 6, {6: 0.55})]:
        text = cg.TEMPLATES["boxed"].format(prompt=row["problem"]) + " \\boxed{" + prefix
        with torch.no_grad():
            p = model(tok(text, return_tensors="pt")["input_ids"]).logits[0, -1].softmax(-1)
        for d in range(10):
            assert p[digits[d]].item() == pytest.approx(expected.get(d, 0.05), abs=0.03), (prefix, d)
    assert tiny_world.needs_skill(row) and not tiny_world.needs_skill({"answer": "6696"})


def test_the_tiny_world_does_not_import_the_trainer():
    """No import circle: the trainer imports tiny_world for `tiny:` names and hands it its templates."""
    check = "import sys, tiny_world; assert 'codistill_grpo' not in sys.modules, 'tiny_world imports the trainer'"
    p = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_full_or_unwritable_cache_is_named_with_the_room_a_world_needs(tmp_path, capsys, monkeypatch):
    """--cache_dir on a full disk (or one that cannot be written): one line saying how much room a world needs, before
    the minutes of its warm-up, not a traceback after them."""
    from conftest import exit_2
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
    argv = ["--preset", "tiny", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run")]
    message = exit_2(argv, capsys)
    assert "--cache_dir" in message and "cannot be built there" in message and "about 5 MB free (1 MB are)" in message
    assert not [f for f in os.listdir(tmp_path / "cache") if not f.endswith(".lock")]


@pytest.mark.slow
def test_two_processes_building_one_world_build_it_once(tmp_path):
    """Two trainers starting at once on an empty cache: one builds the world, the other waits for it and loads it
    whole (each used to build a full copy, and one could remove the world the other was loading)."""
    script = (f"import sys; sys.path.insert(0, {HERE!r}); import codistill_grpo as cg, tiny_world; "
              f"print(tiny_world.build({str(tmp_path)!r}, cg.TEMPLATES, seed=0, steps=dict(small=60, large=60)))")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum("building the tiny offline world" in o for o in outputs) == 1, outputs
    assert sum("another process is building" in o for o in outputs) == 1, outputs
    paths = tiny_world.build(str(tmp_path), cg.TEMPLATES, seed=0, steps=dict(small=60, large=60))
    assert tiny_world.damaged(paths) is None and outputs[0].splitlines()[-1] == outputs[1].splitlines()[-1]
