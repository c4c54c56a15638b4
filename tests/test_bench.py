"""bench.py: that it runs and writes its documented figures (its numbers are measured by running it, not here)."""
import json
import os
import time

import pytest

from conftest import exit_2


@pytest.mark.parametrize("argv, message", [
    (["--json", "/no/such/folder/b.json"], "--json /no/such/folder/b.json: cannot write a file there"),
    (["--plot", "/no/such/folder/b.png"], "--plot"),
    (["--parts", "step"], "--parts step: choose from steps, logprobs, optimizer, decode"),
    (["--lengths", "16,x"], "--lengths"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--plot", "b.out"], "--plot b.out: the file name must end in one of"),  # used to fail after the whole bench
    (["--json", "b.png", "--plot", "b.png"], "--json and --plot name the same file"),
    (["--parts", "logprobs", "--plot", "b.png"], "--plot draws the step-time ratio: add steps to --parts"),
])
def test_bench_refuses_bad_flags_before_measuring(argv, message, capsys):
    import bench
    t = time.time()
    assert message in exit_2(argv, capsys, bench.main) and time.time() - t < 5


def test_bench_keeps_to_its_cache_and_names_bad_models(tmp_path, capsys):
    import bench
    (tmp_path / "afile").write_text("")
    assert "--cache_dir" in exit_2(["--cache_dir", str(tmp_path / "afile"), "--parts", "steps"], capsys, bench.main)
    assert "model /nonexistent" in exit_2(["--cache_dir", str(tmp_path / "c"), "--parts", "decode", "--small_model",
                                           "/nonexistent"], capsys, bench.main)
    assert os.listdir(tmp_path / "c") and all(d.startswith(("tiny-", "bench-pair")) for d in os.listdir(tmp_path / "c"))


@pytest.mark.slow
def test_bench_runs_and_writes_its_figures(world, tmp_path):
    import bench
    bench.main(["--lengths", "4", "--iterations", "1", "--batch_size", "2", "--logprob_seqs", "2", "--logprob_len",
                "8", "--optimizer_size", "256", "--parts", "steps,logprobs,optimizer", "--cache_dir", world["cache"],
                "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    figures = json.load(open(tmp_path / "b.json"))
    for key in ["step_ratio", "generate_share", "logprob_peak_ratio", "logprob_time_ratio", "logprob_max_abs_diff",
                "optimizer", "machine", "versions", "settings"]:
        assert key in figures
    assert set(figures["step_ratio"]) == {"4"} and figures["step_ratio"]["4"] > 0
    assert figures["logprob_max_abs_diff"] < 1e-4
    assert set(figures["optimizer"]["bytes_per_parameter"]) == {"foreach", "fused", "for-loop"}
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_times_eager_and_compiled_decoding_against_the_floor(world, tmp_path):
    import bench
    bench.main(["--lengths", "4", "--iterations", "1", "--batch_size", "1", "--parts", "decode", "--cache_dir",
                world["cache"], "--json", str(tmp_path / "b.json")])
    decode = json.load(open(tmp_path / "b.json"))["decode"]
    assert set(decode["rows"]) == {"1/eager", "1/compiled", "8/eager", "8/compiled"}
    assert decode["floor_ms"] > 0 and all(0 < r["floor_fraction"] and r["ms_per_step"] > 0
                                          for r in decode["rows"].values())
