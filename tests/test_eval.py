"""eval.py: the table's arithmetic by hand, benchmarks, scoring checkpoints, summaries and plots of training runs."""
import json
import shutil
import math
import os
import subprocess
import sys

import pytest

import codistill_grpo as cg
import eval as ev
import tiny_world
from conftest import HERE, exit_2, tiny_argv, write_jsonl


@pytest.fixture(scope="session")
def short_run(world, tmp_path_factory):
    """A real two-iteration codistill run of the tiny preset -> its output folder."""
    out = tmp_path_factory.mktemp("run") / "codistill"
    cg.main(tiny_argv(world, out, "--num_samples", "4", "--group_size", "2"))
    return out


@pytest.mark.parametrize("argv, message", [
    (["tiny:small", "--benchmarks", "toy,,toy"], "given twice"),
    (["tiny:medium", "--benchmarks", "toy"], "MODEL tiny:medium: the tiny world's models are tiny:small and tiny:large"),
])
def test_eval_refuses_repeated_or_unknown_names(argv, message, capsys):
    assert message in exit_2(argv, capsys, ev.main)


def test_eval_refuses_the_same_model_twice_and_an_out_over_its_input(world, tmp_path, capsys):
    assert "given twice" in exit_2([world["small"], world["small"] + "/", "--benchmarks", world["test"]], capsys,
                                   ev.main)
    data = tmp_path / "b.jsonl"
    write_jsonl(data, [json.loads(l) for l in open(world["test"])][:2])
    assert "it would be overwritten" in exit_2([world["small"], "--benchmarks", str(data), "--out", str(data)], capsys,
                                               ev.main)
    (tmp_path / "afile").write_text("")
    assert "--plot_dir" in exit_2(["--runs", str(tmp_path), "--plot_dir", str(tmp_path / "afile" / "sub")], capsys,
                                  ev.main)


def test_mean_std_average_and_delta_by_hand():
    rows = ev.summarize({"base": {"a": [0.5, 0.7], "b": [0.2, 0.2]},
                         "trained": {"a": [0.8, 0.8], "b": [0.1, 0.2, 0.6]}}, ["a", "b"])
    base, trained = rows
    # a: mean 60, population std sqrt((10^2 + 10^2) / 2) = 10;  b: 20 ± 0;  Average (60 + 20) / 2 = 40
    assert (base["cells"]["a"]["mean"], base["cells"]["a"]["std"]) == pytest.approx((60.0, 10.0))
    assert (base["cells"]["b"]["mean"], base["cells"]["b"]["std"]) == pytest.approx((20.0, 0.0))
    assert base["average"] == pytest.approx(40.0) and base["delta"] is None
    # b: mean 30, population std sqrt((20^2 + 10^2 + 30^2) / 3) = sqrt(466.67) = 21.602;  Average (80 + 30) / 2 = 55
    assert (trained["cells"]["b"]["mean"], trained["cells"]["b"]["std"]) == pytest.approx((30.0, math.sqrt(1400 / 3)))
    assert trained["average"] == pytest.approx(55.0) and trained["delta"] == pytest.approx(15.0)
    table = ev.benchmark_table(rows, ["a", "b"], {"trained": "grpo (policy=small)"})
    lines = table.splitlines()
    assert lines[0] == "| Model | a | b | Average |"
    assert lines[2] == "| base | 60.00 ± 10.00 | 20.00 ± 0.00 | 40.00 |"
    assert lines[3] == "| trained [grpo (policy=small)] | 80.00 ± 0.00 | 30.00 ± 21.60 | 55.00 (+15.00) |"


def test_one_seed_has_std_zero_and_a_worse_model_a_negative_change():
    rows = ev.summarize({"x": {"a": [0.5]}, "y": {"a": [0.25]}}, ["a"])
    assert rows[0]["cells"]["a"] == dict(mean=50.0, std=0.0, seeds=[0.5])
    assert "25.00 ± 0.00 | 25.00 (-25.00)" in ev.benchmark_table(rows, ["a"], {})


def test_missing_benchmark_is_marked_and_left_out_of_the_average():
    rows = ev.summarize({"x": {"a": [0.5], "gone": None, "b": [0.1]},
                         "y": {"a": [0.7], "gone": None, "b": [0.3]}}, ["a", "gone", "b"])
    assert rows[0]["cells"]["gone"] is None
    assert rows[0]["average"] == pytest.approx(30.0) and rows[1]["delta"] == pytest.approx(20.0)  # not 20 / 3 * 2
    table = ev.benchmark_table(rows, ["a", "gone", "b"], {})
    assert "| Average* |" in table.splitlines()[0]
    assert "| x | 50.00 ± 0.00 | missing | 10.00 ± 0.00 | 30.00 |" in table
    assert table.endswith("missing: gone.")


def test_hub_benchmarks_are_read_with_their_config_split_and_columns(monkeypatch):
    import datasets
    fake = {"math-ai/minervamath": {"question": "q1", "answer": "1"},
            "HuggingFaceH4/MATH-500": {"problem": "q2", "answer": "2", "solution": "..."},
            "math-ai/amc23": {"question": "q3", "answer": "3"},
            "math-ai/olympiadbench": {"question": "q4", "final_answer": ["4", "5"]},
            "openai/gsm8k": {"question": "q5", "answer": "so\n#### 5"}}
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [fake[name]]
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for i, name in enumerate(["minerva", "math500", "amc23", "olympiadbench", "gsm8k"]):
        assert ev.load_benchmark(name) == [{"problem": f"q{i + 1}", "answer": str(i + 1)}]
    assert [c[1:] for c in calls] == [(None, "test")] * 4 + [("main", "test")]  # OlympiadBench: first of the list


def test_tiny_model_names_resolve_to_the_presets_base_models(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_world, "build", lambda cache, templates, seed, verbose=True: {
        k: f"{k}:{cache}|{seed}" for k in ["small", "large", "train", "test"]})
    assert ev.model_path("tiny:small", str(tmp_path)) == f"small:{tmp_path}|0"
    assert ev.model_path("tiny:large") == f"large:{cg.Args.cache_dir}|0"
    assert ev.model_path("runs/x/checkpoint-3/small") == "runs/x/checkpoint-3/small"


def test_toy_is_the_tiny_presets_held_out_set_and_a_missing_file_fails_fast():
    assert ev.load_benchmark("toy") == tiny_world.problems(0)[1]
    with pytest.raises(cg.BadInput, match="nope.jsonl: no such file"):
        ev.load_benchmark("nope.jsonl")


def test_tiny_checkpoints_scored_on_toy_and_a_local_jsonl(world, tmp_path, capsys):
    local = write_jsonl(tmp_path / "mine.jsonl", [{"problem": "What is 1 + 2", "answer": "3"},
                                                   {"problem": "What is 2 + 2", "answer": "4"},
                                                   {"problem": "What is 3 + 2", "answer": "5"}])
    out = tmp_path / "scores.json"
    ev.main([world["small"], world["large"], "--benchmarks", f"toy,{local}", "--limit", "5",
             "--max_new_tokens", "4", "--template", "boxed", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| Model | toy | mine.jsonl | Average |" in printed
    assert "greedy, template boxed, at most 4 new tokens" in printed
    res = json.loads(out.read_text())["models"]
    assert res["benchmarks"] == {"toy": 5, local: 3}
    assert [r["model"] for r in res["table"]] == [world["small"], world["large"]]
    for m in [world["small"], world["large"]]:
        mine = [r for r in res["results"] if r["model"] == m]
        assert len(mine) == 5 + 3 and {r["seed"] for r in mine} == {0}
        assert {r["benchmark"] for r in mine} == {"toy", local}
        assert all(r["correct"] in (0.0, 1.0) and isinstance(r["completion"], str) for r in mine)
        assert [r["gold"] for r in mine if r["benchmark"] == local] == ["3", "4", "5"]
    assert res["table"][1]["delta"] is not None and res["table"][0]["delta"] is None


def test_scores_count_right_answers(world, tmp_path, monkeypatch):
    """Scoring and the table on known completions: the 1st and 3rd of four answers right -> 50.00."""
    rows = [{"problem": f"What is {i} + 1", "answer": str(i + 1)} for i in range(4)]
    local = write_jsonl(tmp_path / "four.jsonl", rows)
    monkeypatch.setattr(cg, "complete", lambda model, tok, problems, template, *rest, **kw: [
        f"\\boxed{{{int(p.split()[2]) + (1 if i % 2 == 0 else 5)}}}" for i, p in enumerate(problems)])
    out = tmp_path / "scores.json"
    ev.main([world["small"], "--benchmarks", local, "--max_new_tokens", "2", "--template", "boxed",
             "--out", str(out)])
    res = json.loads(out.read_text())["models"]
    assert [r["correct"] for r in res["results"]] == [1.0, 0.0, 1.0, 0.0]
    assert res["table"][0]["cells"][local] == {"mean": 50.0, "std": 0.0, "seeds": [0.5]}


def test_sampled_evaluation_over_seeds(world, tmp_path):
    out = tmp_path / "scores.json"
    ev.main([world["small"], "--benchmarks", "toy", "--limit", "3", "--temperature", "1.0", "--seeds", "2",
             "--out", str(out)])
    res = json.loads(out.read_text())["models"]
    assert sorted(r["seed"] for r in res["results"]) == [0, 0, 0, 1, 1, 1]
    assert len(res["table"][0]["cells"]["toy"]["seeds"]) == 2
    assert res["settings"]["template"] == "boxed" and res["settings"]["max_new_tokens"] == 16  # the tiny preset's


def test_template_and_lengths_default_to_the_checkpoints_run(short_run):
    args = ev.trained_args(str(short_run / "checkpoint-2" / "small"))
    assert args["template"] == "boxed" and args["algo"] == "codistill"
    assert ev.setting(None, "template", [{}, args], toy_only=False) == "boxed"
    assert ev.setting("r1", "template", [args], toy_only=False) == "r1"  # the flag wins
    assert ev.setting(None, "max_completion_length", [{}], toy_only=False) == 3072  # the paper's N
    assert ev.label_of(args) == "codistill (alpha=1, T=0)"


def test_missing_benchmark_still_scores_the_others(world, tmp_path, capsys):
    out = tmp_path / "scores.json"
    with pytest.raises(SystemExit) as e:
        ev.main([world["small"], "--benchmarks", "toy,no-such-org/no-such-benchmark", "--limit", "2",
                 "--out", str(out)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "error: benchmark no-such-org/no-such-benchmark is missing" in captured.err
    assert "| missing |" in captured.out and "Average*" in captured.out
    res = json.loads(out.read_text())["models"]
    assert res["table"][0]["cells"]["no-such-org/no-such-benchmark"] is None and len(res["results"]) == 2


@pytest.mark.parametrize("argv, message", [
    ([], "give MODEL"),
    (["MODEL_PLACEHOLDER", "--benchmarks", "toy", "--seeds", "3", "--temperature", "0"], "--seeds > 1 needs"),
    (["MODEL_PLACEHOLDER", "--benchmarks", "nope.jsonl"], "none could be loaded"),
    (["no/such-model-here", "--benchmarks", "toy"], "no/such-model-here"),
    (["--runs", "no_such_run_dir"], "no metrics.jsonl"),
    (["MODEL_PLACEHOLDER", "--benchmarks", "toy", "--temperature", "-1", "--seeds", "3"],
     "--temperature must be 0 (greedy) or a positive number"),
    (["MODEL_PLACEHOLDER", "--benchmarks", "toy", "--temperature", "nan"], "--temperature must be"),
    (["MODEL_PLACEHOLDER", "--benchmarks", "toy", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["MODEL_PLACEHOLDER", "--benchmarks", "toy", "--out", "/no/such/folder/scores.json"], "--out"),
])
def test_bad_input_exits_2_with_one_line(world, capsys, argv, message):
    argv = [world["small"] if x == "MODEL_PLACEHOLDER" else x for x in argv]
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and message in err[-1]


def test_eval_refuses_a_plot_dir_that_is_a_file_and_runs_it_cannot_read(short_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    message = exit_2(["--runs", str(short_run), "--plot_dir", str(tmp_path / "a_file")], capsys, ev.main)
    assert "--plot_dir" in message and "a file is in the way" in message
    for name, content in [("empty", b""), ("latin", b'{"iteration": 0}\n{"iteration": 1, "x": "\xe9"}\n')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_bytes(content)
    assert "no rows yet" in exit_2(["--runs", str(tmp_path / "empty")], capsys, ev.main)
    assert "line 2 is not UTF-8" in exit_2(["--runs", str(tmp_path / "latin")], capsys, ev.main)


def test_eval_writes_each_benchmark_as_it_finishes(world, tmp_path, monkeypatch):
    """A crash in the second benchmark leaves the first one's scores on disk."""
    first = write_jsonl(tmp_path / "first.jsonl", [{"problem": "What is 1 + 1", "answer": "2"}])
    second = write_jsonl(tmp_path / "second.jsonl", [{"problem": "What is 2 + 2", "answer": "4"}])
    real, calls = ev.score_model, []

    def crash_on_the_second(model, tok, rows, s, seed):
        calls.append(rows)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return real(model, tok, rows, s, seed)
    monkeypatch.setattr(ev, "score_model", crash_on_the_second)
    out = tmp_path / "scores.json"
    with pytest.raises(RuntimeError):
        ev.main([world["small"], "--benchmarks", f"{first},{second}", "--max_new_tokens", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["partial"] and list(saved["accuracies"][world["small"]]) == [first, second]
    assert len(saved["results"]) == 1 and saved["results"][0]["benchmark"] == first


def test_command_line_without_models_or_runs():
    bad = subprocess.run([sys.executable, os.path.join(HERE, "eval.py")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: give MODEL")


def assert_pngs(plot_dir):
    for name in ["test_accuracy.png", "zero_accuracy_frac.png", "step_time.png"]:
        data = (plot_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name


def test_plots_and_summary_from_a_real_short_run(short_run, tmp_path, capsys):
    ev.main(["--runs", str(short_run), "--plot_dir", str(tmp_path / "plots"), "--out", str(tmp_path / "s.json")])
    assert_pngs(tmp_path / "plots")
    printed = capsys.readouterr().out
    assert "| codistill (alpha=1, T=0) | 2 |" in printed
    summary = json.loads((tmp_path / "s.json").read_text())["runs"][0]
    rows = [json.loads(l) for l in open(short_run / "metrics.jsonl")]
    assert summary["small/test_accuracy"] == [rows[0]["small/test_accuracy"], rows[-1]["small/test_accuracy"]]
    assert summary["time/step"] == pytest.approx((rows[1]["time/step"] + rows[2]["time/step"]) / 2)


def test_runs_of_different_lengths_and_a_truncated_last_line(short_run, tmp_path, capsys):
    """A grpo run written by hand, 4 iterations, its last line cut mid-write, beside the real 2-iteration run."""
    rows = [{"iteration": 0, "policy/test_accuracy": 0.1}]
    rows += [{"iteration": i, "policy/accuracy": 0.5, "policy/zero_accuracy_frac": z, "time/step": t,
              "time/generate": t / 2, "time/score": 0.1, "time/update_small": 0.0, "time/update_large": t / 4}
             for i, z, t in [(1, 0.5, 2.0), (2, 0.25, 4.0), (3, 0.0, 6.0)]]
    rows[2]["policy/test_accuracy"] = 0.3
    run = tmp_path / "grpo_large"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"algo": "grpo", "policy": "large"}))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "metrics.jsonl").write_text(text + '{"iteration": 4, "policy/accura')
    assert [r["iteration"] for r in ev.read_metrics(run / "metrics.jsonl")] == [0, 1, 2, 3]

    ev.main(["--runs", str(short_run), str(run), "--plot_dir", str(tmp_path / "plots"),
             "--out", str(tmp_path / "s.json")])
    assert_pngs(tmp_path / "plots")
    assert "| grpo (policy=large) | 3 | - | 10.00% -> 30.00% | 0.25 | 4.00 | 2.00 | - | 0.10 | 0.00 | 1.00 |" \
        in capsys.readouterr().out
    grpo = json.loads((tmp_path / "s.json").read_text())["runs"][1]
    assert grpo["large/test_accuracy"] == [0.1, 0.3] and grpo["small/test_accuracy"] is None


def test_runs_differing_only_in_seed_make_tables_over_seeds(tmp_path, capsys):
    """Two seeds of a CoDistill setting and two CT runs that start from their own seed's checkpoint: each pair is one
    group, mean ± population std by hand; a single run stays alone."""
    def run(folder, seed, small, large, **args):
        d = tmp_path / folder / str(seed)
        d.mkdir(parents=True)
        (d / "args.json").write_text(json.dumps(dict(algo="codistill", seed=seed, output_dir=str(d), **args)))
        rows = [{"iteration": i, "small/test_accuracy": s, "large/test_accuracy": l}
                for i, (s, l) in enumerate(zip(small, large))]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d)
    dirs = [run("cd", 1, [0.1, 0.2], [0.5, 0.6], alpha=1.0), run("cd", 2, [0.1, 0.4], [0.5, 0.9], alpha=1.0),
            run("other", 3, [0.1, 0.1], [0.5, 0.5], alpha=2.0),
            run("ct", 1, [0.3, 0.3], [0.6, 0.7], large_model="runs/cd/1/checkpoint-1/large"),
            run("ct", 2, [0.3, 0.3], [0.9, 0.9], large_model="runs/cd/2/checkpoint-1/large")]
    groups = ev.group_runs([ev.load_run(d) for d in dirs])
    assert [(label, len(g)) for label, g in groups] == [("cd", 2), ("codistill (alpha=2, T=0)", 1), ("ct", 2)]
    ev.main(["--runs", *dirs, "--plot_dir", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    # small, cd: start 10, 10; end 20, 40 -> 30.00 ± 10.00; change 10, 30 -> 20.00 ± 10.00
    assert "| cd | 2 | 10.00 ± 0.00 | 30.00 ± 10.00 | 20.00 ± 10.00 |" in out
    # large, ct: start 60, 90 -> 75 ± 15; end 70, 90 -> 80 ± 10; change 10, 0 -> 5 ± 5
    assert "| ct | 2 | 75.00 ± 15.00 | 80.00 ± 10.00 | 5.00 ± 5.00 |" in out
    assert_pngs(tmp_path / "plots")


def test_a_run_with_only_its_first_line_half_written_has_no_rows(tmp_path, capsys):
    run = tmp_path / "starting"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 0, "small/te')
    with pytest.raises(SystemExit) as e:
        ev.main(["--runs", str(run), "--plot_dir", str(tmp_path / "plots")])
    assert e.value.code == 2 and "no rows yet" in capsys.readouterr().err


def test_a_repeated_seed_is_refused_and_the_global_batch_groups_runs(tmp_path, capsys):
    """Two runs of one setting with the same seed would count as two seeds (a spread understated): refused. A run of
    2 processes x B is another setting than one process with B, and the same as one process with 2 B."""
    def run(folder, seed, batch_size=2, **args):
        d = tmp_path / folder
        d.mkdir(parents=True)
        (d / "args.json").write_text(json.dumps(dict(algo="codistill", seed=seed, batch_size=batch_size, **args)))
        (d / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "small/test_accuracy": 0.1}) + "\n")
        return str(d)
    a, b = run("a/1", 1), run("a/2", 2)
    twin = run("again/1", 1)
    assert "the same settings and the same --seed 1" in exit_2(["--runs", a, b, twin], capsys, ev.main)
    two = run("two/3", 3, processes=2)
    doubled = run("doubled/4", 4, batch_size=4, processes=1)
    groups = ev.group_runs([ev.load_run(d) for d in [a, b, two, doubled]])
    assert [len(g) for _, g in groups] == [2, 2]  # {a, b} and {2 x 2, 1 x 4}


def test_a_damaged_checkpoint_is_named_before_anything_is_scored(world, tmp_path, capsys, monkeypatch):
    """A damaged second model stops eval.py before it scores the first (an hour's work on a real benchmark), with one
    message, not one nested in another."""
    broken = tmp_path / "broken"
    shutil.copytree(world["large"], broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    scored = []
    monkeypatch.setattr(ev, "score_model", lambda *args: scored.append(args) or [])
    message = exit_2([world["small"], str(broken), "--benchmarks", world["test"], "--limit", "2"], capsys, ev.main)
    assert f"model {broken}: model.safetensors is damaged" in message and message.count("model ") == 1, message
    assert scored == []
