"""Bad input: one line naming the flag, file, line or row, status 2, before any model is loaded, and nothing that
was saved is touched. Bad input around resume and checkpoints is in test_resume.py, eval.py's in test_eval.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import codistill_grpo as cg
import eval as ev
import trainer_io
from conftest import HERE, exit_2, snapshot, tiny_argv


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def without_chat_template(world, tmp_path):
    tok = cg.load_tokenizer(world["small"])
    tok.chat_template = None  # the tiny world's tokenizer has Qwen's ChatML; a base model's may have none
    tok.save_pretrained(tmp_path / "no_chat")
    return str(tmp_path / "no_chat")


def with_another_vocabulary(world, tmp_path):
    shutil.copytree(world["large"], tmp_path / "other")
    tok = cg.load_tokenizer(str(tmp_path / "other"))
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(tmp_path / "other")
    return str(tmp_path / "other")


def without_tokenizer(world, tmp_path):
    shutil.copytree(world["small"], tmp_path / "small")
    (tmp_path / "small" / "tokenizer.json").unlink()
    return str(tmp_path / "small")


ROW = '{"problem": "z", "answer": "0"}\n'
FLAGS = [  # (flags, what the one line says); the flags are added to a tiny run's
    (["--group_size", "3", "--num_samples", "4"], "--group_size"),
    (["--group_size", "6", "--num_samples", "4"], "--group_size G=6 must be <= --num_samples M=4"),
    (["--alpha", "-1"], "--alpha"),
    (["--hint_tokens", "16"], "--hint_tokens"),
    (["--hint_tokens", "2", "--algo", "grpo"], "--hint_tokens"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be > 0"),  # torch's clip would turn training into ascent
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--lr_small", "0"], "--lr_small must be > 0"),
    (["--lr_large", "inf"], "--lr_large must be a finite number"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--grade_timeout", "inf"], "--grade_timeout must be a finite number"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1]"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--max_completion_length", "0"], "--max_completion_length must be > 0"),
    (["--dist_timeout", "0"], "--dist_timeout must be > 0"),
    (["--eval_temperature", "-1"], "--eval_temperature must be >= 0"),
    (["--cache_dir", "/dev/null/x", "--small_model", "tiny:small"], "--cache_dir"),
    # finite, but beyond what a run can take: each used to fail mid-run, after --overwrite had deleted the old run
    (["--seed", str(10**18)], "--seed 1,000,000,000,000,000,000: must be at most 2,147,483,647 in size"),
    (["--grade_timeout", "1e10"], "--grade_timeout 1e+10: must be at most 86400"),
    (["--num_samples", str(10**20)], "--num_samples"),
    (["--temperature", "1e-300"], "--temperature 1e-300: must be between 0.001 and 1000"),
    (["--eval_temperature", "1e-300"], "--eval_temperature"),
    (["--lr_small", "1e300"], "--lr_small 1e+300: must be at most 1"),
    (["--batch_size", "100000", "--num_samples", "1000"], "rollouts per rank: at most 16777216"),
    (["--max_prompt_length", "5"], "cannot hold the boxed template itself"),
]
FILES = [  # (flags made from the world and a temporary folder, what the one line says)
    (lambda w, t: ["--dataset", write(t, "d.jsonl", '{"problem": "What is 1 + 1", "answer": "2"}\n'
                                                     '{"problem": "What is 2 + 2"}\n')], "line 2"),
    (lambda w, t: ["--dataset", write(t, "d.jsonl", '{"problem": "What is 1 + 1", "answer": ["2"]}\n' + ROW)],
     "line 1: 'answer' must be non-blank text or a number"),
    (lambda w, t: ["--dataset", write(t, "d.jsonl", '{"problem": "What is 1 + 1", "answer": true}\n' + ROW)],
     "line 1: 'answer' must be non-blank text or a number"),
    (lambda w, t: ["--dataset", write(t, "d.jsonl", '{"problem": "What is 1 + 1", "answer": "  "}\n' + ROW)],
     "line 1: 'answer' must be non-blank text or a number"),
    (lambda w, t: ["--dataset", write(t, "d.jsonl", '{"problem": 12, "answer": "2"}\n' + ROW)],
     "line 1: 'problem' must be non-blank text"),
    (lambda w, t: ["--dataset", write(t, "d.jsonl", '{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": 2}\n'
                                                     '{"problem": "c", "answer": 3\n' + ROW)],
     "line 4 is not valid JSON"),  # blank lines counted; a damaged line that is not the last one
    (lambda w, t: ["--dataset", write(t, "d.jsonl", '{"problem": "a", "answer": "1"}\n["a list"]\n' + ROW)],
     "line 2 is not a JSON object"),
    (lambda w, t: ["--dataset", write(t, "d.jsonl", b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", '
                                                     b'"answer": "2"}\n')], "line 2 is not UTF-8"),
    (lambda w, t: ["--dataset", write(t, "d.json", json.dumps([{"problem": "a", "answer": 1},
                                                                {"problem": "b", "answer": None}]))], "row 2: 'answer'"),
    (lambda w, t: ["--dataset", write(t, "d.jsonl", '{"problem": "a", "answer": "1"}\n{"problem": "b", "answ')],
     "line 2 is not valid JSON"),  # a dataset's last line cut short
    (lambda w, t: ["--dataset", write(t, "d.jsonl", '{"problem": "x", "answer": ' + "9" * 5000 + "}\n")],
     "line 1 is not valid JSON"),
    (lambda w, t: ["--dataset", write(t, "d.json", "[" * 100000)], "not JSON that can be read"),
    (lambda w, t: ["--dataset", write(t, "d.jsonl", "\n")], "no rows"),
    (lambda w, t: ["--dataset", str(t)], "is a folder"),
    (lambda w, t: ["--dataset", "nope.jsonl"], "no such file"),
    (lambda w, t: ["--large_model", with_another_vocabulary(w, t)], "--large_model"),
    (lambda w, t: ["--small_model", without_tokenizer(w, t)], "its tokenizer is empty"),
    (lambda w, t: ["--chat_template", "--small_model", without_chat_template(w, t)], "has no chat template"),
    (lambda w, t: ["--output_dir", write(t, "a_file", "") + "/run"], "--output_dir"),
    (lambda w, t: ["--output_dir", write(t, "out", "")], "is a file, not a folder"),
    (lambda w, t: (os.symlink(t / "nowhere", t / "out"), ["--output_dir", str(t / "out")])[1], "is a link to nowhere"),
]


@pytest.mark.parametrize("flags, message", [(lambda w, t, f=f: f, m) for f, m in FLAGS] + FILES,
                         ids=[" ".join(f)[:40] for f, _ in FLAGS] + [f"file-{i}" for i in range(len(FILES))])
def test_bad_input_stops_in_one_line_before_any_model_loads(world, tmp_path, capsys, no_models, flags, message):
    argv = tiny_argv(world, tmp_path / "run", *flags(world, tmp_path))
    assert message in exit_2(argv, capsys)


@pytest.mark.parametrize("flags", [["--preset", "huge"], ["--algo", "ppo"]])
def test_unknown_preset_or_algo_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        cg.main(flags)
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_a_json_list_dataset_keeps_its_numbers_as_answers(tmp_path):
    ok = write(tmp_path, "ok.json", json.dumps([{"problem": "a", "answer": 12}, {"problem": "b", "answer": 0.5}]))
    assert cg.load_problems(ok) == [{"problem": "a", "answer": "12"}, {"problem": "b", "answer": "0.5"}]


def test_eval_names_a_model_folder_without_its_tokenizer(world, tmp_path, capsys):
    message = exit_2([without_tokenizer(world, tmp_path), "--benchmarks", world["test"], "--limit", "2"], capsys,
                     ev.main)
    assert "its tokenizer is empty" in message


def test_command_line_exit_status_and_help():
    script = os.path.join(HERE, "codistill_grpo.py")
    bad = subprocess.run([sys.executable, script, "--group_size", "7"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --group_size")
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert help_.returncode == 0
    for flag, symbol in [("--num_samples", "M:"), ("--group_size", "G:"), ("--max_completion_length", "N:"),
                         ("--hint_tokens", "T:"), ("--alpha", "alpha:"), ("--clip_eps", "eps:")]:
        assert flag in help_.stdout and symbol in help_.stdout


def test_output_dir_that_is_a_checkpoint_or_a_missing_reporter_exit_2(world, finished_run, tmp_path, capsys,
                                                                      no_models, monkeypatch):
    before = snapshot(finished_run)
    message = exit_2(["--resume", str(finished_run / "checkpoint-1"), "--output_dir",
                      str(finished_run / "checkpoint-1")], capsys)
    assert "is a checkpoint folder" in message and snapshot(finished_run) == before
    monkeypatch.setattr(cg.importlib.util, "find_spec", lambda name: None)
    assert "the wandb package is not installed" in exit_2(tiny_argv(world, tmp_path / "r", "--report_to", "wandb"),
                                                          capsys)


def test_no_room_for_a_checkpoint_is_refused_before_training(world, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    assert "one checkpoint takes about" in exit_2(tiny_argv(world, tmp_path), capsys)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_model_with_nan_weights_is_named_and_a_diverging_run_stops_in_one_line(world, tmp_path, capsys,
                                                                                monkeypatch):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "small"
    shutil.copytree(world["small"], broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights = {k: v.fill_(float("nan")) if i == 0 else v for i, (k, v) in enumerate(weights.items())}
    save_file(weights, str(broken / "model.safetensors"))
    assert "some of its weights are NaN" in exit_2(tiny_argv(world, tmp_path / "a", "--small_model", str(broken)),
                                                   capsys)

    def diverged(*args, **kw):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    monkeypatch.setattr(cg, "sample", diverged)
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_argv(world, tmp_path / "b", "--eval_size", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: sampling met NaN or infinite probabilities")


def test_prompts_that_are_cut_are_counted_before_any_model_loads(world, tmp_path, capsys, no_models):
    data = tmp_path / "long.jsonl"
    rows = [{"problem": "What is 1 + 1" + " and" * (400 if i < 3 else 0), "answer": "2"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AssertionError, match="a model was loaded"):  # no_models: it stops where the models load
        cg.main(tiny_argv(world, tmp_path / "b", "--dataset", str(data)))
    assert "warning: 3 of 8 prompts are longer than --max_prompt_length 64" in capsys.readouterr().out


def test_a_dataset_with_a_byte_order_mark_is_read(tmp_path):
    """Some editors begin UTF-8 files with a byte-order mark: a JSONL or JSON file with one loads as without."""
    rows = [{"problem": "What is 1 + 1", "answer": "2"}]
    for name, text in [("bom.jsonl", json.dumps(rows[0]) + "\n"), ("bom.json", json.dumps(rows))]:
        assert cg.load_problems(write(tmp_path, name, b"\xef\xbb\xbf" + text.encode())) == rows


def test_a_problem_twice_with_different_answers_and_unicode_answers_are_said(tmp_path, capsys):
    """The same problem with two answers (whatever the whitespace) trains both: a warning says so. Unicode math in an
    answer is written as LaTeX the grader reads (1/2 as a vulgar fraction would never match \\\\frac{1}{2}); what is
    left that it may not read is named."""
    path = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"problem": "What is 1 + 1", "answer": "2"}, {"problem": "What is  1 +\t1", "answer": "3"},
        {"problem": "Half of one", "answer": "\u00bd"}, {"problem": "Root of two", "answer": "\u221a2"},
        {"problem": "Where", "answer": "caf\u00e9"}]))
    rows = cg.load_problems(path)
    out = capsys.readouterr().out
    assert "1 problem(s) appear with different answers (e.g. 'What is 1 + 1': '2' and '3')" in out
    assert [r["answer"] for r in rows[2:4]] == ["\\frac{1}{2}", "\\sqrt{2}"]
    assert cg.accuracy_reward("\\boxed{\\frac{1}{2}}", rows[2]["answer"], "boxed") == 1.0
    assert cg.accuracy_reward("\\boxed{0.5}", rows[2]["answer"], "boxed") == 1.0
    assert "1 answer(s) hold characters the grader may not read (e.g. 'caf\u00e9')" in out
    for latex in ["x_{1}^{2}+x_{2}^{2}", "\\mathbf{A}^{-1}", "\\sqrt{2}^{3}", "\\frac{1}{2}^{n}"]:  # plain LaTeX stays
        assert trainer_io.latex_of(latex) == latex
    assert trainer_io.latex_of("x\u00b2\u00b3 + \u2153") == "x^{23} + \\frac{1}{3}"


def test_held_out_problems_written_with_other_whitespace_are_never_trained_on(world, tmp_path, capsys, no_models):
    held_out = [json.loads(l) for l in open(world["test"])][:2]
    train = [dict(r, problem="  " + r["problem"].replace(" ", "\t ") + "\n") for r in held_out]
    train += [json.loads(l) for l in open(world["train"])][:6]
    data = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in train))
    with pytest.raises(AssertionError, match="a model was loaded"):  # no_models: it stops where the models load
        cg.main(tiny_argv(world, tmp_path / "run", "--dataset", data, "--eval_size", "10"))
    assert "note: 2 problems of --dataset are also in --eval_dataset and are left out" in capsys.readouterr().out
