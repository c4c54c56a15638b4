"""Checkpoints and resume: exact resume, atomic checkpoints, a run folder never overwritten or lost, Ctrl-C and SIGTERM."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import codistill_grpo as cg
import trainer_io
from conftest import (HERE, based_argv, edit_json, exit_2, flat_params, rows_without_timings, snapshot, tiny_argv,
                      truncate, write_jsonl)


def test_checkpoints_load_with_from_pretrained_alone(world, tmp_path):
    cg.main(tiny_argv(world, tmp_path, "--eval_size", "0", "--save_every", "1"))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for it in [1, 2]:
        for n in ["small", "large"]:
            path = tmp_path / f"checkpoint-{it}" / n
            AutoModelForCausalLM.from_pretrained(path)
            assert AutoTokenizer.from_pretrained(path).eos_token_id is not None
        assert json.load(open(tmp_path / f"checkpoint-{it}" / "args.json"))["iteration"] == it


def test_resume_gives_the_same_weights_and_rows_as_a_straight_run(based, tmp_path, monkeypatch):
    flags = ["--max_steps", "4", "--save_every", "2", "--eval_every", "2", "--lr_schedule", "cosine",
             "--warmup_ratio", "0.25", "--hint_tokens", "3", "--hint_share", "0.75"]  # hints: iterations 1-3
    cg.main(based_argv(based, tmp_path / "straight", *flags))

    real_save = cg.save_checkpoint

    def save_then_stop(models, optims, tokenizer, a, iteration, plan=None):
        path = real_save(models, optims, tokenizer, a, iteration, plan)
        if iteration == 2:
            raise KeyboardInterrupt  # the job is stopped right after its checkpoint
        return path
    monkeypatch.setattr(cg, "save_checkpoint", save_then_stop)
    with pytest.raises(SystemExit) as e:  # main() reports the interrupt in one line and exits 130
        cg.main(based_argv(based, tmp_path / "split", *flags))
    assert e.value.code == 130
    monkeypatch.setattr(cg, "save_checkpoint", real_save)
    cg.main(["--output_dir", str(tmp_path / "split"), "--resume"])  # everything else comes from the checkpoint

    for n in ["small", "large"]:  # CPU, fp32: bitwise equal
        assert torch.equal(flat_params(tmp_path / "straight" / "checkpoint-4" / n),
                           flat_params(tmp_path / "split" / "checkpoint-4" / n))
    assert rows_without_timings(tmp_path / "split" / "metrics.jsonl") == \
        rows_without_timings(tmp_path / "straight" / "metrics.jsonl")


@pytest.mark.slow
def test_sigkill_while_saving_leaves_the_previous_checkpoint_and_resume_uses_it(based, tmp_path):
    out = tmp_path / "run"
    argv = based_argv(based, out, "--max_steps", "3", "--save_every", "1", "--eval_size", "0")
    script = f"""
import os, signal, sys
sys.path.insert(0, {HERE!r})
import codistill_grpo as cg
import trainer_io
real_replace = os.replace
def replace(src, dst):
    if str(dst).endswith("checkpoint-2"):  # killed after writing checkpoint-2 aside, before renaming it in place
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
cg.main({argv!r})
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    assert (out / "checkpoint-2.tmp").is_dir()  # the half-written one
    assert (out / "latest").read_text().strip() == "checkpoint-1"
    flat_params(out / "checkpoint-1" / "small")  # loadable

    cg.main(["--output_dir", str(out), "--resume"])
    assert [r["iteration"] for r in rows_without_timings(out / "metrics.jsonl")] == [0, 1, 2, 3]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert (out / "latest").read_text().strip() == "checkpoint-3"


def test_only_the_newest_checkpoints_are_kept(world, tmp_path):
    cg.main(tiny_argv(world, tmp_path, "--max_steps", "3", "--save_every", "1", "--keep_checkpoints", "2",
                      "--eval_size", "0"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-2", "checkpoint-3"]


def test_nan_weights_never_reach_a_checkpoint(world, tiny, tmp_path):
    import copy
    tok, model0 = tiny
    model = copy.deepcopy(model0)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    a = cg.Args(output_dir=str(tmp_path))
    with pytest.raises(trainer_io.Stopped, match="non-finite"):
        cg.save_checkpoint({"small": cg.TokenLogprobs(model)}, {}, tok, a, 1)
    assert not (tmp_path / "checkpoint-1").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda ckpt: (ckpt / "trainer_state.pt").write_bytes(b"not a checkpoint"), "trainer_state.pt cannot be read"),
    (lambda ckpt: (ckpt / "small" / "config.json").unlink(), "no small model"),
    (lambda ckpt: (ckpt / "args.json").unlink(), "not a complete checkpoint (no args.json)"),
    (lambda ckpt: (ckpt / "args.json").write_text("{"), "args.json cannot be read"),
    (lambda ckpt: truncate(ckpt / "large" / "model.safetensors"), "large/model.safetensors is damaged"),
])
def test_a_damaged_checkpoint_given_to_resume_exit_2(finished_run, capsys, damage, message):
    damage(finished_run / "checkpoint-2")
    before = snapshot(finished_run)
    with pytest.raises(SystemExit) as e:
        cg.main(["--resume", str(finished_run / "checkpoint-2")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_a_run_folder_is_not_overwritten_without_being_asked(world, finished_run, capsys):
    before = snapshot(finished_run)
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_argv(world, finished_run, "--eval_size", "0"))
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert snapshot(finished_run) == before
    cg.main(tiny_argv(world, finished_run, "--eval_size", "0", "--max_steps", "1", "--overwrite"))
    assert [r["iteration"] for r in rows_without_timings(finished_run / "metrics.jsonl")] == [0, 1]
    assert not (finished_run / "checkpoint-2").exists()


def test_resume_into_another_runs_folder_is_refused_and_a_fork_into_a_new_one_works(world, finished_run, tmp_path,
                                                                                 capsys):
    other = tmp_path / "other"
    cg.main(tiny_argv(world, other, "--eval_size", "0", "--max_steps", "1", "--seed", "5"))
    before, before_a = snapshot(other), snapshot(finished_run)
    message = exit_2(["--resume", str(finished_run / "checkpoint-1"), "--output_dir", str(other)], capsys)
    assert "already holds a run" in message and "fork" in message
    assert snapshot(other) == before and snapshot(finished_run) == before_a
    fork = tmp_path / "fork" / "new"  # a folder that does not exist yet
    cg.main(["--resume", str(finished_run / "checkpoint-1"), "--output_dir", str(fork)])
    assert snapshot(finished_run) == before_a  # the run it came from is untouched
    straight = rows_without_timings(finished_run / "metrics.jsonl")
    assert rows_without_timings(fork / "metrics.jsonl") == straight  # rows 0-1 copied, 2 written again identically
    assert (fork / "checkpoint-2" / "small" / "config.json").exists()
    [resume] = [json.loads(l) for l in open(fork / "resumes.jsonl")]
    assert resume["iteration"] == 1 and resume["changed"]["output_dir"][1] == str(fork)


def test_resuming_a_finished_run_says_there_is_nothing_to_do_and_changes_no_checkpoint(finished_run, capsys):
    checkpoints = {k: v for k, v in snapshot(finished_run).items() if k.startswith("checkpoint-")}
    cg.main(["--resume", str(finished_run)])
    assert "nothing to do" in capsys.readouterr().out
    assert {k: v for k, v in snapshot(finished_run).items() if k.startswith("checkpoint-")} == checkpoints


def test_resume_keeps_the_settings_that_define_the_run(world, finished_run, capsys):
    before = snapshot(finished_run)
    message = exit_2(["--resume", str(finished_run), "--alpha", "2", "--num_samples", "4"], capsys)
    assert "--alpha 1.0 -> 2.0" in message and "--num_samples 8 -> 4" in message
    assert "--max_steps 1 is below iteration 2" in exit_2(["--resume", str(finished_run), "--max_steps", "1"], capsys)
    assert snapshot(finished_run) == before
    cg.main(["--resume", str(finished_run), "--max_steps", "3", "--eval_every", "3"])  # what may change
    assert [r["iteration"] for r in rows_without_timings(finished_run / "metrics.jsonl")] == [0, 1, 2, 3]
    [resume] = [json.loads(l) for l in open(finished_run / "resumes.jsonl")]
    assert resume["iteration"] == 2 and resume["changed"] == {"max_steps": [2, 3], "eval_every": [1, 3]}


def test_resume_passes_over_an_incomplete_newest_checkpoint(finished_run, capsys):
    (finished_run / "checkpoint-2" / "trainer_state.pt").unlink()
    cg.main(["--resume", str(finished_run)])
    assert "checkpoint-2 is not complete (no trainer_state.pt)" in capsys.readouterr().out
    assert [r["iteration"] for r in rows_without_timings(finished_run / "metrics.jsonl")] == [0, 1, 2]


def test_resume_with_a_missing_or_damaged_metrics_file(finished_run, capsys):
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    (finished_run / "metrics.jsonl").write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    before = snapshot(finished_run)
    assert "metrics.jsonl: line 2 is not valid JSON" in exit_2(["--resume", str(finished_run / "checkpoint-1")],
                                                                capsys)
    assert snapshot(finished_run) == before
    (finished_run / "metrics.jsonl").unlink()
    cg.main(["--resume", str(finished_run / "checkpoint-1")])
    assert "is missing" in capsys.readouterr().out
    assert [r["iteration"] for r in rows_without_timings(finished_run / "metrics.jsonl")] == [2]


def test_a_model_that_cannot_load_leaves_the_old_run_in_place_even_with_overwrite(world, finished_run, tmp_path,
                                                                                 capsys):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    cg.load_tokenizer(world["small"]).save_pretrained(empty)  # a tokenizer, a config, no weights
    (empty / "config.json").write_text((finished_run / "checkpoint-2" / "small" / "config.json").read_text())
    before = snapshot(finished_run)
    message = exit_2(tiny_argv(world, finished_run, "--overwrite", "--small_model", str(empty)), capsys)
    assert "cannot be loaded" in message and snapshot(finished_run) == before


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_runs(world, finished_run, capsys):
    import fcntl
    before = snapshot(finished_run)
    with open(finished_run / ".lock", "a") as held:  # what a run in progress holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another run is writing there" in exit_2(["--resume", str(finished_run), "--max_steps", "3"], capsys)
    assert snapshot(finished_run) == before
    cg.main(["--resume", str(finished_run), "--max_steps", "3"])  # once it is over, the folder is free


def test_a_finished_run_frees_its_folder_for_a_next_run_in_the_same_process(world, tmp_path):
    """The grading worker forks during a run and so holds the run's lock file too: unless the run unlocks it, a
    second run in that folder from the same process (bench.py does this) is refused as if the first still ran."""
    if "process" in cg.GRADER:  # make the next run fork a fresh worker while it holds the lock
        worker = cg.GRADER.pop("process")
        worker.kill()
        worker.join()
    cg.main(tiny_argv(world, tmp_path / "run", "--max_steps", "1"))
    assert cg.GRADER["process"].is_alive()
    cg.main(tiny_argv(world, tmp_path / "run", "--max_steps", "1", "--overwrite"))


def start_run(world, out, *flags):
    """The trainer in a child process, its output into files (a pipe nobody reads would fill and block it). Ctrl-C
    is restored in the child: a shell starts background jobs with SIGINT ignored, and Python keeps it so."""
    argv = tiny_argv(world, out, "--max_steps", "200", "--eval_size", "0", "--save_every", "1", "--keep_checkpoints",
                     "2", *flags)
    out.mkdir(parents=True, exist_ok=True)
    err = open(out.parent / f"{out.name}.stderr", "w+")
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "codistill_grpo.py"), *argv], stdout=subprocess.DEVNULL,
                         stderr=err, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return p, err


def wait_for(condition, what, seconds=180):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.2)


def last_line_after(p, err, sig):
    """Send the signal, wait for the process to end -> (its exit status, its stderr, its last line that is not a bar)."""
    p.send_signal(sig)
    p.wait(timeout=120)
    err.seek(0)
    text = err.read()
    lines = [l for l in text.replace("\r", "\n").splitlines() if l.strip() and "it/s" not in l and "s/it" not in l]
    return p.returncode, text, lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_print_one_line(world, tmp_path, sig, code, word):
    """Ctrl-C, and SIGTERM (what schedulers send), end a run with one line: where it stopped, what to resume from."""
    out = tmp_path / "run"
    p, err = start_run(world, out)
    wait_for(lambda: (out / "checkpoint-2").exists(), "checkpoint-2")
    status, text, last = last_line_after(p, err, getattr(signal, sig))
    assert status == code and "Traceback" not in text, text[-2000:]
    assert last.startswith(f"{word}: metrics.jsonl has iterations up to ") and "--resume" in last
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_a_killed_trainer_leaves_a_quiet_grader_and_resumes(world, tmp_path):
    """SIGKILL: no line can be printed, but the grading worker ends quietly with its trainer, and --resume takes the
    newest complete checkpoint."""
    out = tmp_path / "run"
    p, err = start_run(world, out)
    wait_for(lambda: (out / "checkpoint-3").exists(), "checkpoint-3")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    time.sleep(3)  # the worker notices its parent is gone within a second
    err.seek(0)
    assert "Traceback" not in err.read()
    a = cg.parse_args(["--output_dir", str(out), "--resume"])
    assert int(a.resume.rsplit("-", 1)[1]) >= 3


@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_moves_the_newer_ones_aside(world, tmp_path, capsys):
    """A resume from K leaves the folder as if the run had stopped at K: the newer checkpoints and the run's files as
    they were move to superseded-K-<time>/; a later --resume follows the run's own history (`latest`)."""
    out = tmp_path / "run"
    cg.main(tiny_argv(world, out, "--max_steps", "6", "--save_every", "1", "--keep_checkpoints", "0", "--eval_size",
                      "0"))
    cg.main(["--resume", str(out / "checkpoint-4"), "--max_steps", "5"])
    assert "checkpoint-5, checkpoint-6" in capsys.readouterr().out
    [aside] = out.glob("superseded-4-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-5", "checkpoint-6", "metrics.jsonl",
                                                      "rollouts.jsonl"]
    assert len(open(aside / "metrics.jsonl").readlines()) == 7  # the old timeline, rows 0-6, kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in range(1, 6)]
    assert (out / "latest").read_text().strip() == "checkpoint-5"
    cg.main(["--resume", "--output_dir", str(out), "--max_steps", "8"])
    rows = [json.loads(l)["iteration"] for l in open(out / "metrics.jsonl")]
    assert rows == list(range(9))
    (out / "latest").write_text("checkpoint-7\n")  # an older record wins over a higher number (a spliced folder)
    assert cg.parse_args(["--resume", "--output_dir", str(out)]).resume == str(out / "checkpoint-7")


def test_overwrite_deletes_only_what_the_run_wrote(finished_run, world):
    (finished_run / "checkpoint-notes.txt").write_text("mine")
    (finished_run / "checkpoint-2-scores.json").write_text("{}")
    (finished_run / "checkpoint-2.tmp").mkdir()  # a save cut short: the run's
    cg.main(tiny_argv(world, finished_run, "--eval_size", "0", "--max_steps", "1", "--overwrite"))
    assert sorted(p.name for p in finished_run.iterdir() if not p.name.startswith(".")) == [
        "args.json", "checkpoint-1", "checkpoint-2-scores.json", "checkpoint-notes.txt", "latest", "metrics.jsonl",
        "rollouts.jsonl"]


def test_a_folder_whose_run_has_no_checkpoint_does_not_suggest_resume(world, tmp_path, capsys):
    out = tmp_path / "run"
    cg.main(tiny_argv(world, out, "--eval_size", "0", "--max_steps", "1"))
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    message = exit_2(tiny_argv(world, out, "--eval_size", "0"), capsys)
    assert "no checkpoint to resume from" in message and "--overwrite" in message and "add --resume" not in message


def test_prompts_cut_are_in_the_first_row(world, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"problem": "What is 1 + 1" + " and" * (400 if i < 3 else 0), "answer": "2"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cg.main(tiny_argv(world, tmp_path / "run", "--dataset", str(data), "--max_steps", "1"))
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["prompts_cut/train"] == 3 and row["prompts_cut/held_out"] == 0


@pytest.mark.slow
def test_the_lr_schedule_is_planned_once_and_a_resume_never_makes_it_jump(world, tmp_path, capsys):
    """A resume with another --max_steps changes where the run stops, not its schedule: the lr goes on as planned
    (constant after warm-up); a cosine run cannot be made longer, as its lr is 0 past its planned end."""
    lrs = lambda out: [r["small/lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "small/lr" in r]
    flags = ["--eval_size", "0", "--save_every", "2", "--warmup_ratio", "0.5"]
    cg.main(tiny_argv(world, tmp_path / "straight", "--max_steps", "4", *flags))
    cg.main(tiny_argv(world, tmp_path / "split", "--max_steps", "4", *flags))
    cg.main(["--resume", str(tmp_path / "split" / "checkpoint-2"), "--max_steps", "6"])
    assert lrs(tmp_path / "split") == lrs(tmp_path / "straight") + [1e-4, 1e-4]  # warm-up over the planned 4
    cg.main(tiny_argv(world, tmp_path / "cosine", "--max_steps", "4", "--lr_schedule", "cosine", *flags))
    message = exit_2(["--resume", str(tmp_path / "cosine" / "checkpoint-2"), "--max_steps", "40"], capsys)
    assert "planned for 4 iterations" in message
    cg.main(["--resume", str(tmp_path / "cosine" / "checkpoint-2"), "--max_steps", "3"])  # shorter: fine


def test_gen_batch_size_defines_the_run(finished_run, capsys):
    """It changes what is sampled (the batches generate draws from), so a resume may not change it."""
    assert "--gen_batch_size" in exit_2(["--resume", str(finished_run), "--gen_batch_size", "3"], capsys)


def test_held_out_problems_are_never_trained_on(world, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [json.loads(l) for l in open(world["train"])][:6] + [json.loads(l) for l in open(world["test"])][:2]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cg.main(tiny_argv(world, tmp_path / "run", "--dataset", str(data), "--max_steps", "1", "--eval_size", "10"))
    assert "note: 2 problems of --dataset are also in --eval_dataset and are left out" in capsys.readouterr().out
    message = exit_2(tiny_argv(world, tmp_path / "r2", "--dataset", world["test"], "--eval_size", "500"), capsys)
    assert "fewer than one global batch" in message


def test_a_full_disk_while_saving_stops_with_one_line_and_leaves_no_half_checkpoint(world, tmp_path, capsys,
                                                                                    monkeypatch):
    real_save = torch.save

    def full(obj, path, *a, **k):
        if "checkpoint-2" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_argv(world, tmp_path, "--save_every", "1", "--eval_size", "0", "--max_steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: saving ") and "MB are free there" in err[-1]
    assert "--resume" in err[-1] and "Traceback" not in "".join(err)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"


def test_a_checkpoint_naming_an_unknown_algo_says_so(finished_run, capsys):
    args = json.load(open(finished_run / "checkpoint-2" / "args.json"))
    (finished_run / "checkpoint-2" / "args.json").write_text(json.dumps(dict(args, algo="ppo")))
    assert "unknown --algo 'ppo'" in exit_2(["--resume", str(finished_run / "checkpoint-2")], capsys)


@pytest.mark.parametrize("damage, message", [
    (lambda c: torch.save({"optimizers": {}}, c / "trainer_state.pt"), "trainer_state.pt holds no iteration"),
    (lambda c: torch.save([1, 2], c / "trainer_state.pt"), "trainer_state.pt holds no iteration"),
    (lambda c: edit_json(c / "args.json", batch_size="2"), "batch_size is '2', not a int"),
    (lambda c: edit_json(c / "args.json", batch_size=2.5), "batch_size is 2.5, not a int"),
    (lambda c: edit_json(c / "args.json", num_samples=None), "has no num_samples"),
])
def test_a_damaged_checkpoint_is_named_not_a_traceback(finished_run, capsys, damage, message):
    damage(finished_run / "checkpoint-2")
    before = snapshot(finished_run)
    assert message in exit_2(["--resume", str(finished_run / "checkpoint-2")], capsys)
    assert snapshot(finished_run) == before


def test_optimizer_states_that_do_not_fit_their_models_are_refused(based, tmp_path, capsys):
    out = tmp_path / "run"
    cg.main(based_argv(based, out, "--eval_size", "0", "--save_every", "1"))
    path = out / "checkpoint-2" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["optimizers"]["small"], state["optimizers"]["large"] = state["optimizers"]["large"], state["optimizers"]["small"]
    torch.save(state, path)
    before = snapshot(out)
    assert "optimizer state does not fit it" in exit_2(["--resume", str(out / "checkpoint-2"), "--max_steps", "3"],
                                                       capsys)
    assert snapshot(out) == before  # resumes.jsonl was not touched


def test_a_resume_on_other_data_is_refused(world, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [json.loads(l) for l in open(world["train"])][:8])
    cg.main(tiny_argv(world, tmp_path / "run", "--dataset", str(data), "--eval_size", "0", "--max_steps", "1",
                      "--save_every", "1"))
    write_jsonl(data, [json.loads(l) for l in open(world["train"])][8:16])
    assert "is not what the run trained on" in exit_2(["--resume", "--output_dir", str(tmp_path / "run"),
                                                       "--max_steps", "2"], capsys)


def test_a_metrics_row_lost_to_a_cut_is_noted_on_resume(finished_run, capsys):
    text = (finished_run / "metrics.jsonl").read_text()
    (finished_run / "metrics.jsonl").write_text(text[:-40])  # the last row (iteration 2) cut short
    cg.main(["--resume", "--output_dir", str(finished_run), "--max_steps", "3"])
    assert "metrics.jsonl has no row for iteration 2" in capsys.readouterr().out


def test_run_files_that_cannot_be_written_are_named_in_one_line(finished_run, capsys):
    (finished_run / "latest").unlink()
    (finished_run / "latest").mkdir()
    with pytest.raises(SystemExit) as e:
        cg.main(["--resume", str(finished_run / "checkpoint-2"), "--max_steps", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: cannot write") and "latest" in err[-1]
    assert not list(finished_run.glob("*.tmp"))


def test_a_checkpoint_holding_another_ones_state_is_refused_before_anything_moves(finished_run, capsys):
    """checkpoint-2/ with checkpoint-1's trainer_state.pt: the state's iteration is not the folder's, so --resume stops
    with one line before it moves, cuts or rewrites anything (it used to supersede the folder itself)."""
    shutil.copy(finished_run / "checkpoint-1" / "trainer_state.pt", finished_run / "checkpoint-2" / "trainer_state.pt")
    before = snapshot(finished_run)
    for argv in (["--resume", "--output_dir", str(finished_run)], ["--resume", str(finished_run / "checkpoint-2")]):
        assert "its trainer_state.pt is iteration 1's, not 2's" in exit_2(argv + ["--max_steps", "3"], capsys)
        assert snapshot(finished_run) == before


def test_resume_auto_starts_a_run_then_goes_on_from_its_newest_checkpoint(world, tmp_path, capsys):
    """--resume auto (for torchrun --max-restarts): the same command starts a run, goes on from its newest checkpoint
    after a stop, replaces a first attempt that stopped before any checkpoint, and never takes another run's folder."""
    out = tmp_path / "run"
    argv = tiny_argv(world, out, "--eval_size", "0", "--save_every", "1", "--resume", "auto")
    cg.main(argv)  # nothing there: a fresh start
    assert [r["iteration"] for r in rows_without_timings(out / "metrics.jsonl")] == [0, 1, 2]
    cg.main(argv[:-2] + ["--max_steps", "3", "--resume", "auto"])  # again, longer: from checkpoint-2
    assert [r["iteration"] for r in rows_without_timings(out / "metrics.jsonl")] == [0, 1, 2, 3]
    [resume] = [json.loads(l) for l in open(out / "resumes.jsonl")]
    assert resume["iteration"] == 2
    first_attempt = tmp_path / "early"
    cg.main(tiny_argv(world, first_attempt, "--eval_size", "0", "--max_steps", "1"))
    shutil.rmtree(first_attempt / "checkpoint-1")  # as if killed before its first checkpoint
    cg.main(tiny_argv(world, first_attempt, "--eval_size", "0", "--max_steps", "1", "--resume", "auto"))
    assert (first_attempt / "checkpoint-1").exists()
    other = tmp_path / "other"
    cg.main(tiny_argv(world, other, "--eval_size", "0", "--max_steps", "1", "--seed", "3"))
    shutil.rmtree(other / "checkpoint-1")
    before = snapshot(other)
    assert "holds another run (its seed differ)" in exit_2(
        tiny_argv(world, other, "--eval_size", "0", "--max_steps", "1", "--resume", "auto"), capsys)
    assert snapshot(other) == before
