"""Tests of eval.py: the table's arithmetic by hand, benchmark loading offline, scoring a tiny checkpoint, and the
summaries and plots of training runs (a real short run, and metrics files cut short).

    python -m pytest -q test_eval_tmp.py
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline: a hub lookup fails fast, not in 20 s

import json
import math
import subprocess
import sys

import pytest

import codistill_grpo as cg
import eval as ev

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def eval_world(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return dict(cache=cache, **cg.build_tiny_world(cache, seed=0))


@pytest.fixture(scope="session")
def short_run(eval_world, tmp_path_factory):
    """A real two-iteration codistill run of the tiny preset -> its output folder."""
    out = tmp_path_factory.mktemp("run") / "codistill"
    cg.main(["--preset", "tiny", "--cache_dir", eval_world["cache"], "--output_dir", str(out), "--max_steps", "2",
             "--batch_size", "2", "--num_samples", "4", "--group_size", "2", "--eval_size", "4", "--eval_every", "1"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# The table: mean, std, Average and change, by hand


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


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks


def test_gold_answers_of_the_benchmark_formats():
    assert ev.gold_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    assert ev.gold_answer(["$x=3$", "$x=4$"]) == "$x=3$"  # OlympiadBench: final_answer is a list
    assert ev.gold_answer("Natalia sold 48/2 = 24 clips.\n#### 1,024") == "1024"  # GSM8K


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
    before = dict(cg.HUB_DATASETS)
    for i, name in enumerate(["minerva", "math500", "amc23", "olympiadbench", "gsm8k"]):
        assert ev.load_benchmark(name) == [{"problem": f"q{i + 1}", "answer": str(i + 1)}]
    assert [c[1:] for c in calls] == [(None, "test")] * 4 + [("main", "test")]
    assert cg.HUB_DATASETS == before  # the training loader's table is left as it was


def test_toy_is_the_tiny_presets_held_out_set_and_a_missing_file_fails_fast():
    assert ev.load_benchmark("toy") == cg.tiny_problems(0)[1]
    with pytest.raises(cg.BadInput, match="nope.jsonl: no such file"):
        ev.load_benchmark("nope.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Scoring checkpoints


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_tiny_checkpoints_scored_on_toy_and_a_local_jsonl(eval_world, tmp_path, capsys):
    local = write_jsonl(tmp_path / "mine.jsonl", [{"problem": "What is 1 + 2", "answer": "3"},
                                                   {"problem": "What is 2 + 2", "answer": "4"},
                                                   {"problem": "What is 3 + 2", "answer": "5"}])
    out = tmp_path / "scores.json"
    ev.main([eval_world["small"], eval_world["large"], "--benchmarks", f"toy,{local}", "--limit", "5",
             "--max_new_tokens", "4", "--template", "boxed", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| Model | toy | mine.jsonl | Average |" in printed
    assert "greedy, template boxed, at most 4 new tokens" in printed
    res = json.loads(out.read_text())["models"]
    assert res["benchmarks"] == {"toy": 5, local: 3}
    assert [r["model"] for r in res["table"]] == [eval_world["small"], eval_world["large"]]
    for m in [eval_world["small"], eval_world["large"]]:
        mine = [r for r in res["results"] if r["model"] == m]
        assert len(mine) == 5 + 3 and {r["seed"] for r in mine} == {0}
        assert {r["benchmark"] for r in mine} == {"toy", local}
        assert all(r["correct"] in (0.0, 1.0) and isinstance(r["completion"], str) for r in mine)
        assert [r["gold"] for r in mine if r["benchmark"] == local] == ["3", "4", "5"]
    assert res["table"][1]["delta"] is not None and res["table"][0]["delta"] is None


def test_scores_count_right_answers(eval_world, tmp_path, monkeypatch):
    """Scoring and the table on known completions: the 1st and 3rd of four answers right -> 50.00."""
    rows = [{"problem": f"What is {i} + 1", "answer": str(i + 1)} for i in range(4)]
    local = write_jsonl(tmp_path / "four.jsonl", rows)
    monkeypatch.setattr(cg, "complete", lambda model, tok, problems, template, *rest: [
        f"\\boxed{{{int(p.split()[2]) + (1 if i % 2 == 0 else 5)}}}" for i, p in enumerate(problems)])
    out = tmp_path / "scores.json"
    ev.main([eval_world["small"], "--benchmarks", local, "--max_new_tokens", "2", "--template", "boxed",
             "--out", str(out)])
    res = json.loads(out.read_text())["models"]
    assert [r["correct"] for r in res["results"]] == [1.0, 0.0, 1.0, 0.0]
    assert res["table"][0]["cells"][local] == {"mean": 50.0, "std": 0.0, "seeds": [0.5]}


def test_sampled_evaluation_over_seeds(eval_world, tmp_path):
    out = tmp_path / "scores.json"
    ev.main([eval_world["small"], "--benchmarks", "toy", "--limit", "3", "--temperature", "1.0", "--seeds", "2",
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


def test_missing_benchmark_still_scores_the_others(eval_world, tmp_path, capsys):
    out = tmp_path / "scores.json"
    with pytest.raises(SystemExit) as e:
        ev.main([eval_world["small"], "--benchmarks", "toy,no-such-org/no-such-benchmark", "--limit", "2",
                 "--out", str(out)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "error: benchmark no-such-org/no-such-benchmark is missing" in captured.err
    assert "| missing |" in captured.out and "Average*" in captured.out
    res = json.loads(out.read_text())["models"]
    assert res["table"][0]["cells"]["no-such-org/no-such-benchmark"] is None and len(res["results"]) == 2


@pytest.mark.parametrize("argv, message", [
    ([], "give MODEL"),
    (["MODEL_PLACEHOLDER", "--benchmarks", "toy", "--seeds", "3"], "--seeds > 1 needs --temperature"),
    (["MODEL_PLACEHOLDER", "--benchmarks", "nope.jsonl"], "none could be loaded"),
    (["no/such-model-here", "--benchmarks", "toy"], "no/such-model-here"),
    (["--runs", "no_such_run_dir"], "no metrics.jsonl"),
])
def test_bad_input_exits_2_with_one_line(eval_world, capsys, argv, message):
    argv = [eval_world["small"] if x == "MODEL_PLACEHOLDER" else x for x in argv]
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and message in err[-1]


def test_command_line_without_models_or_runs():
    bad = subprocess.run([sys.executable, os.path.join(HERE, "eval.py")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: give MODEL")


# ---------------------------------------------------------------------------------------------------------------
# Training runs


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


def test_a_run_with_only_its_first_line_half_written(tmp_path):
    run = tmp_path / "starting"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 0, "small/te')
    ev.main(["--runs", str(run), "--plot_dir", str(tmp_path / "plots")])
    assert_pngs(tmp_path / "plots")
