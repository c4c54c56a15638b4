"""Grading: the rewards of typical strings, hostile answers, a worker killed past its time limit or dead."""
import json
import os
import signal
import time

import pytest

import codistill_grpo as cg
import trainer_io
from conftest import tiny_argv


@pytest.mark.parametrize("completion, gold, template, expected", [
    ("<think> 2+2 </think> <answer> 4 </answer>", "4", "r1", 1.0),
    ("<think> 2+2 </think> <answer> 5 </answer>", "4", "r1", 0.0),
    ("<think> 2+2 </think> the answer is 4", "4", "r1", 0.0),  # r1 grades only the <answer> tag
    ("<answer> 3 </answer> wait <answer> 4 </answer>", "4", "r1", 1.0),  # the last answer counts
    ("<answer> 0.5 </answer>", "\\frac{1}{2}", "r1", 1.0),
    ("<answer> \\frac{1}{2} </answer>", "\\frac{1}{2}", "r1", 1.0),
    ("<answer> \\frac{1}{3} </answer>", "\\frac{1}{2}", "r1", 0.0),
    ("<answer> \\sqrt{2} </answer>", "\\sqrt{2}", "r1", 1.0),  # bare LaTeX inside the tag
    ("<answer> $\\boxed{12}$ </answer>", "12", "r1", 1.0),
    (" 37 + 48 = \\boxed{85}", "85", "boxed", 1.0),
    (" 37 + 48 = \\boxed{84}", "85", "boxed", 0.0),
    ("so \\boxed{3} no, \\boxed{85}", "85", "boxed", 1.0),
    ("the answer is \\boxed{\\frac{3}{4}}", "\\dfrac{3}{4}", "boxed", 1.0),
    ("", "85", "boxed", 0.0),
    ("\\boxed{__import__('os').system('echo hi')}", "0", "boxed", 0.0),
])
def test_accuracy_reward(completion, gold, template, expected):
    assert cg.accuracy_reward(completion, gold, template) == expected


def test_last_boxed_balances_braces():
    assert cg.last_boxed("so $\\boxed{\\frac{1}{2}}$ and") == "\\frac{1}{2}"
    assert cg.last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert cg.last_boxed("no box") is None


@pytest.mark.parametrize("completion", [
    "\\boxed{9^{9^{9^{9}}}}",
    "<answer> 9^{9^{9^{9^{9}}}} </answer>",
    "\\boxed{" + "1" * 1_000_000 + "}",
    "\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}",
    "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    "\\boxed{__import__('os').system('touch /tmp/codistill_pwned')}",
    "<answer> __import__('os').system('touch /tmp/codistill_pwned') </answer>",
    "__import__('os').system('touch /tmp/codistill_pwned')",
    "\\boxed{1000000!}",
])
def test_hostile_completions_score_zero_within_the_limit(completion):
    template = "r1" if completion.startswith("<answer>") else "boxed"
    t = time.perf_counter()
    assert cg.accuracy_reward(completion, "3", template, timeout=1.0) == 0.0
    assert time.perf_counter() - t < 1.0 + 1.0
    assert not os.path.exists("/tmp/codistill_pwned")
    assert cg.accuracy_reward("\\boxed{3}", "3", "boxed") == 1.0  # the grader still works afterwards


def test_a_grading_hang_is_killed_and_counted():
    before = cg.GRADER["timeouts"]
    assert cg.accuracy_reward("\\boxed{9^{9^{9^{9}}}}", "3", "boxed", timeout=0.5) == 0.0
    assert cg.GRADER["timeouts"] == before + 1


def test_a_hang_in_a_batch_costs_only_its_own_answer():
    before = cg.GRADER["timeouts"]
    wait = cg.grade_batch(["\\boxed{3}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{4}", "\\boxed{5}"], ["3", "3", "4", "6"],
                          "boxed", timeout=2.0)  # returns at once; the worker grades while we wait below
    assert wait() == [1.0, 0.0, 1.0, 0.0]  # the answers after the hang are graded by a fresh worker
    assert cg.GRADER["timeouts"] == before + 1


def test_metrics_rows_stay_valid_json_with_a_non_finite_value(capsys):
    import io
    f = io.StringIO()
    cg.write_row(f, {"iteration": 3, "small/loss": float("nan"), "small/grad_norm": float("inf"), "lr": 1e-4})
    row = json.loads(f.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in the file"))
    assert row == {"iteration": 3, "small/loss": None, "small/grad_norm": None, "lr": 1e-4}
    assert "non-finite small/loss, small/grad_norm" in capsys.readouterr().err


def test_a_dead_grading_worker_is_replaced_and_its_answer_scores_zero():
    cg.grade_batch(["\\boxed{1}"], ["1"], "boxed")()  # a worker is running
    os.kill(cg.GRADER["process"].pid, signal.SIGKILL)  # dead between two batches (the OOM killer)
    cg.GRADER["process"].join()
    before = cg.GRADER["timeouts"]
    assert cg.grade_batch(["\\boxed{2}", "\\boxed{3}"], ["2", "3"], "boxed")() == [1.0, 1.0]
    hang = "\\boxed{9^{9^{9^{9}}}}"
    wait = cg.grade_batch([hang, "\\boxed{2}", "\\boxed{3}"], ["1", "2", "3"], "boxed", timeout=30)
    time.sleep(1)  # the worker is busy with the first answer
    os.kill(cg.GRADER["process"].pid, signal.SIGKILL)  # dies while grading
    t = time.time()
    assert wait() == [0.0, 1.0, 1.0] and time.time() - t < 10  # not the 30 s of the time limit
    assert cg.GRADER["timeouts"] == before + 1


def test_numbers_keep_their_value_as_answers(tmp_path):
    assert trainer_io.checked_row({"problem": "p", "answer": 0.00001}, "row 1")["answer"] == "0.00001"
    assert trainer_io.checked_row({"problem": "p", "answer": 1e20}, "row 1")["answer"] == "1" + "0" * 20
    assert trainer_io.checked_row({"problem": "p", "answer": 2.0}, "row 1")["answer"] == "2"
    assert trainer_io.checked_row({"problem": "p", "answer": -12}, "row 1")["answer"] == "-12"
    path = tmp_path / "d.jsonl"
    path.write_text('{"problem": "p", "answer": 0.00001}\n')
    [row] = cg.load_problems(str(path))
    assert cg.accuracy_reward("\\boxed{0.00001}", row["answer"], "boxed") == 1.0


@pytest.fixture
def slow_grader(monkeypatch):
    """A grading worker whose every answer takes 30 s (forked after the patch; the real one comes back after): longer
    than the scoring it overlaps, so that none is done before the trainer waits for it."""
    def restart():
        if "process" in cg.GRADER:
            cg.GRADER.pop("process").kill()
    restart()
    monkeypatch.setattr(cg, "grade", lambda *args: time.sleep(30) or 1.0)
    yield
    restart()


def test_a_grade_timeout_too_small_for_any_answer_is_warned_about(world, tmp_path, capsys, slow_grader):
    cg.main(tiny_argv(world, tmp_path, "--grade_timeout", "0.01", "--max_steps", "1", "--eval_size", "2"))
    err = capsys.readouterr().err
    assert "warning: 16 of 16 iteration 1's answers were not graded within --grade_timeout 0.01 s" in err
    assert "warning: 4 of 4 held-out answers were not graded within" in err  # iteration 0: both models
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert rows[1]["grade_timeouts"] == 16 and rows[0]["test_grade_timeouts"] == 4 and rows[1]["small/accuracy"] == 0
