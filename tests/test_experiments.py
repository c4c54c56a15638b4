"""experiments/: every script behind the README's tables starts against today's code (each is run with --help:
its imports, its arguments), and the ones that read a run read a real one."""
import glob
import json
import os
import subprocess
import sys

import pytest

import codistill_grpo as cg
from conftest import HERE, tiny_argv

SCRIPTS = sorted(glob.glob(os.path.join(HERE, "experiments", "*.py")) + glob.glob(os.path.join(HERE, "experiments",
                                                                                               "*.sh")))


def test_the_scripts_are_the_ones_the_record_names():
    names = {os.path.basename(p) for p in SCRIPTS}
    record = open(os.path.join(HERE, "experiments", "README.md")).read()
    assert names and all(f"`{n}`" in record or f"`{n.rsplit('.', 1)[0]}" in record for n in names), names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_each_script_starts(script):
    command = ["bash", script, "--help"] if script.endswith(".sh") else [sys.executable, script, "--help"]
    p = subprocess.run(command, capture_output=True, text=True, cwd=HERE, timeout=120,
                       env=dict(os.environ, PYTHONPATH=HERE))
    assert p.returncode == 0 and len(p.stdout.strip().splitlines()) >= 2, p.stdout[-1000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_the_record_scripts_read_a_real_run(based, tmp_path):
    """paired.py, one_iteration.py, kd_signal.py, measure.py and skills.py on two seeds of a short real comparison (the `based`
    models, which write answers, on the world's problems)."""
    for arm, flags in [("codistill-a1", []), ("grpo-g", ["--algo", "grpo"])]:
        for seed in ["1", "2"]:
            cg.main(tiny_argv(based, tmp_path / arm / seed, "--seed", seed, "--max_steps", "4", "--save_every", "2",
                              "--eval_every", "1", "--keep_checkpoints", "0", *flags))
    run = lambda *argv: subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=HERE, timeout=600,
                                       env=dict(os.environ, PYTHONPATH=HERE))
    p = run("experiments/paired.py", str(tmp_path), "--seeds", "1,2", "--json", str(tmp_path / "p.json"))
    assert p.returncode == 0 and "codistill-a1 - grpo-g" in p.stdout, p.stderr[-2000:]
    assert json.load(open(tmp_path / "p.json"))["verdicts"]
    p = run("experiments/one_iteration.py", str(tmp_path / "codistill-a1" / "1" / "rollouts.jsonl"))
    assert p.returncode == 0 and "r~" in p.stdout, p.stderr[-2000:]
    p = run("experiments/kd_signal.py", str(tmp_path), "codistill-a1")
    assert p.returncode == 0 and "KD log-ratio on right digits" in p.stdout, p.stderr[-2000:]
    p = run("experiments/measure.py", "--runs", str(tmp_path / "grpo-g" / "1"), "--samples", "2", "--prompts", "8")
    assert p.returncode == 0 and p.stdout.count('"iteration"') == 2, p.stderr[-2000:]
    p = run("experiments/skills.py", str(tmp_path), "--arms", "codistill-a1,grpo-g", "--seeds", "1,2", "--prompts", "32")
    assert p.returncode == 0 and "| codistill-a1 - grpo-g | skill |" in p.stdout and "the teacher's margin" in \
        p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
