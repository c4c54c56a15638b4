"""torchrun: DDP and FSDP2 with two CPU processes on gloo."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import codistill_grpo as cg
import trainer_io
from conftest import HERE, seqs_of, step_flags, based_argv, tiny_argv


def test_ranks_started_without_torchrun_say_whom_they_wait_for_and_give_up(world, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    t = time.time()
    p = subprocess.run([sys.executable, os.path.join(HERE, "codistill_grpo.py"), *tiny_argv(world, tmp_path),
                        "--dist_timeout", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and time.time() - t < 60
    assert f"rank 0 of 2 at 127.0.0.1:{port}: waiting for the other ranks (up to 3 s" in p.stderr
    assert "did not form within 3 s (--dist_timeout)" in p.stderr.strip().splitlines()[-1]


def test_each_torchrun_attempt_forms_its_group_under_its_own_prefix(monkeypatch, capsys):
    """One node: the store's keys of restart k live under 'attempt-k', so a restart never reads the last attempt's
    addresses. Several nodes (their restart counts can differ): no prefix, and rank 0 names torchrun's switch."""
    from datetime import timedelta
    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(TORCHELASTIC_USE_AGENT_STORE="True", GROUP_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(server.port), TORCHELASTIC_RESTART_COUNT="2", TORCHELASTIC_MAX_RESTARTS="3", RANK="1",
               WORLD_SIZE="2")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = cg.this_attempts_store(timedelta(seconds=5))
    assert (got["rank"], got["world_size"]) == (1, 2)
    got["store"].set("rank_0", "address")
    assert server.check(["attempt-2/rank_0"]) and not server.check(["rank_0"])
    assert server.get("attempt-2/rank_0") == b"address"
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert cg.this_attempts_store(timedelta(seconds=5)) == {} and capsys.readouterr().err == ""  # rank 1 is silent
    monkeypatch.setenv("RANK", "0")
    assert cg.this_attempts_store(timedelta(seconds=5)) == {}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that switch gives: a new store each attempt
    assert cg.this_attempts_store(timedelta(seconds=5)) == {} and capsys.readouterr().err == ""


ABORTED_IN_GLOO = "terminate called without an active exception"


def torchrun(*argv, nproc=2, fresh=None):
    """Run `torchrun --standalone --nproc_per_node=nproc argv...` -> CompletedProcess (output captured). A run that
    starts from nothing (fresh: the folder it writes, emptied before the second run) is run once more if a rank
    aborted inside torch with ABORTED_IN_GLOO (SIGABRT on gloo: 1 in 170 two-process runs here, once in a CI run;
    cause not found, see the README's known limits); any other failure is returned as it is."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)  # this file runs as a worker too
    for attempt in range(2 if fresh else 1):
        if attempt:
            shutil.rmtree(fresh, ignore_errors=True), os.makedirs(fresh)
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                            *argv], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode == 0 or ABORTED_IN_GLOO not in p.stdout + p.stderr:
            break
        print(f"a rank aborted in gloo ({ABORTED_IN_GLOO}); running it again", file=sys.stderr)
    return p


def test_every_prompt_of_an_epoch_goes_to_exactly_one_rank():
    n, B, W = 23, 3, 2
    seen = []
    for it in range(1, n // (B * W) + 1):  # one epoch of global batches
        shares = [cg.batch_indices(n, B, 5, it, rank=r, world=W) for r in range(W)]
        assert all(epoch == 0 for epoch, _ in shares)
        seen += [i for _, rows in shares for i in rows]
        # the global batch is what one process with W x B prompts takes
        assert [i for _, rows in shares for i in rows] == cg.batch_indices(n, B * W, 5, it)[1]
    assert len(seen) == len(set(seen)) == (n // (B * W)) * B * W
    assert cg.batch_indices(n, B, 5, n // (B * W) + 1, rank=1, world=W)[0] == 1  # then the next epoch


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_run_codistill(based, tmp_path, fsdp):
    out = tmp_path / "run"
    argv = based_argv(based, out, "--batch_size", "1", "--eval_size", "3", "--hint_tokens", "2", "--hint_share", "0.5",
                      *(["--fsdp"] if fsdp else []))  # 2 ranks x 1 prompt: the 2 problems of `based`
    p = torchrun("codistill_grpo.py", *argv, fresh=out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]  # one row per iteration: rank 0 writes, once
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["small/test_accuracy"] <= 1.0 for r in rows)
    assert rows[1]["small/hint_length"] > 0 and "large/loss" in rows[2] and "small/hint_length" not in rows[2]
    from transformers import AutoModelForCausalLM
    for name in ["small", "large"]:  # plain Hugging Face folders, loaded without any distributed code
        AutoModelForCausalLM.from_pretrained(out / "checkpoint-2" / name)


def distributed_worker(mode, small, out, dtype="float32"):
    """Run under torchrun by the next test: one update on this rank's half of a fixed batch of 8 sequences, with
    DDP or FSDP2; rank 0 writes the reduced loss and the weights gathered from the ranks, and a checkpoint."""
    from transformers import AutoModelForCausalLM
    cg.setup_distributed()
    R, W = cg.rank(), cg.world()
    tok = cg.load_tokenizer(small)
    model = AutoModelForCausalLM.from_pretrained(small, dtype=torch.float32)
    batch = fixed_batch(tok, model)
    share = [x[R * 8 // W:(R + 1) * 8 // W] for x in batch]  # this rank's half of the global batch
    a = cg.Args(fsdp=mode == "fsdp", micro_batch_size=3, max_completion_length=5, max_grad_norm=1e9,
                output_dir=out)
    scorer = cg.parallelize(model, a, trained=True, compute_dtype=getattr(torch, dtype))
    opt = torch.optim.SGD(scorer.parameters(), lr=1.0)  # the step is the gradient itself: its scale shows
    seqs = seqs_of(*share[:4])
    stats = cg.update(scorer, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), seqs, *share[4:], a,
                      **step_flags(seqs))
    loss = cg.all_reduce([stats["loss"]])[0] / W
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for n, p in model.named_parameters()}  # gathered from the shards by DTensor itself
    if R == 0:
        torch.save(dict(loss=loss, grad_norm=stats["grad_norm"], weights=weights), os.path.join(out, "result.pt"))
    cg.save_checkpoint({"small": scorer}, {"small": (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))},
                       tok, a, 1)
    torch.distributed.destroy_process_group()


def fixed_batch(tok, model):
    """8 prompts, completions of varied lengths, old log-probs a little off and mixed advantages."""
    ids, pmask = cg.encode_prompts(tok, [f"What is {a} + {b}" for a, b in zip(range(10, 90, 10), range(91, 99))],
                                   "boxed", 64, "cpu")
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(1, len(tok) - 1, (8, 5), generator=g)
    cmask = (torch.arange(5)[None] < torch.tensor([5, 3, 4, 5, 2, 5, 1, 4])[:, None]).long()
    with torch.no_grad():
        old = cg.token_logprobs(model, ids, pmask, comp, cmask, 1.0, 64) - 0.05
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.5, 0.25])
    return ids, pmask, comp, cmask, old, adv


FP32, BF16 = (1e-6, 1e-5, 1e-5), (1e-5, 1e-4, 5e-4)  # loss (absolute), grad norm (relative), weights (absolute)


@pytest.mark.slow
@pytest.mark.parametrize("mode, dtype, tolerance", [("ddp", "float32", FP32), ("fsdp", "float32", FP32),
                                                    ("ddp", "bfloat16", BF16), ("fsdp", "bfloat16", BF16)])
def test_two_processes_make_the_one_process_step(based, tmp_path, mode, dtype, tolerance):
    """One process, DDP and FSDP2 compute alike: the same loss and the same step on the same global batch, in fp32
    and with bf16 compute. Measured in bf16: the loss equal, the grad norm within 2.5e-5 (relative), the weights
    after an SGD step of lr 1 within 1.8e-4: the ranks' micro-batches are other shapes, and bf16 rounds by shape.
    FSDP2 with bf16 weights gathered (param_dtype=bf16: the residual stream and norms in bf16) was off by 1.4e-4,
    5.2e-4 and 1.9e-3, outside these tolerances."""
    loss_tol, grad_tol, weight_tol = tolerance
    from transformers import AutoModelForCausalLM
    p = torchrun(__file__, "distributed-worker", mode, based["small"], str(tmp_path), dtype, fresh=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt")
    # the same global batch in one process
    tok = cg.load_tokenizer(based["small"])
    model = AutoModelForCausalLM.from_pretrained(based["small"], dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = fixed_batch(tok, model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    a = cg.Args(micro_batch_size=3, max_completion_length=5, max_grad_norm=1e9)
    seqs = seqs_of(*batch[:4])
    stats = cg.update(cg.TokenLogprobs(model, getattr(torch, dtype)), opt,
                      torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), seqs, *batch[4:], a, **step_flags(seqs))
    assert got["loss"] == pytest.approx(stats["loss"], abs=loss_tol)
    assert got["grad_norm"] == pytest.approx(stats["grad_norm"], rel=grad_tol)
    moved = 0.0
    for n, w in model.named_parameters():  # float tolerance: the ranks' sums are added in another order
        assert torch.allclose(got["weights"][n], w, atol=weight_tol), n
        moved = max(moved, (w - before[n]).abs().max().item())
    assert moved > 1e-3  # the step did something, so equal weights mean equal steps
    # the 2-process checkpoint loads in one process, without distributed code, and holds the gathered weights
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1" / "small", dtype=torch.float32)
    for n, w in saved.named_parameters():
        assert torch.equal(w, got["weights"][n]), n
    # its optimizer state is keyed by parameter name, so it loads into another world size
    state = torch.load(tmp_path / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert all(isinstance(k, str) for k in state["optimizers"]["small"]["param_groups"][0]["params"])


@pytest.mark.slow
def test_a_two_process_run_resumes_in_one_process(based, tmp_path):
    out = tmp_path / "run"
    p = torchrun("codistill_grpo.py", *based_argv(based, out, "--batch_size", "1", "--fsdp", "--max_steps", "1"),
                 fresh=out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cg.main(["--output_dir", str(out), "--resume", "--max_steps", "2"])
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and (out / "checkpoint-2" / "small").exists()


@pytest.mark.slow
def test_a_resume_with_another_number_of_processes_keeps_the_global_batch_and_the_data(based, tmp_path):
    """2 processes x B = 1, stopped after iteration 2 and resumed in 1 process: B becomes 2 (the global batch kept,
    recorded in args.json and resumes.jsonl), and iterations 3 and 4 train on the problems the straight 2-process
    run trained on. Held-out accuracy decodes the same completions whatever the number of processes; 3 processes
    cannot share the global batch of 2 and are refused."""
    flags = ["--batch_size", "1", "--save_every", "2", "--eval_every", "1", "--eval_size", "8", "--gen_batch_size", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    world = based  # the `based` models (they write answers) on the world's 10,000 problems
    for out, steps in [(straight, "4"), (split, "2")]:
        p = torchrun("codistill_grpo.py", *tiny_argv(world, out, *flags, "--max_steps", steps), fresh=out)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cg.main(["--output_dir", str(split), "--resume", "--max_steps", "4"])
    saved = json.load(open(split / "args.json"))
    assert (saved["batch_size"], saved["processes"]) == (2, 1)
    [resume] = [json.loads(l) for l in open(split / "resumes.jsonl")]
    assert resume["processes"] == [2, 1] and resume["changed"]["batch_size"] == [1, 2]
    first = lambda out, it: [r["problem"] for r in map(json.loads, open(out / "rollouts.jsonl")) if r["iteration"] == it][0]
    assert [first(split, it) for it in (3, 4)] == [first(straight, it) for it in (3, 4)]
    row0 = json.loads(open(straight / "metrics.jsonl").readline())  # the starting models, decoded by 2 processes
    args = cg.parse_args(tiny_argv(world, tmp_path / "x", *flags))
    tok = cg.load_tokenizer(world["small"])
    model = cg.load_model(world["small"], torch.float32, "cpu", False)
    rows = trainer_io.read_jsonl(world["test"])[:8]
    one = cg.heldout_accuracy(model, tok, rows, args, cg.eos_ids_of(tok, model))  # and by one
    assert one["test_digit_accuracy"] > 0  # random weights: some digits in place, not vacuous
    assert row0["small/test_digit_accuracy"] == pytest.approx(one["test_digit_accuracy"], abs=1e-12)
    assert row0["small/test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1e-12)
    p = torchrun("codistill_grpo.py", "--output_dir", str(split), "--resume", "--max_steps", "5", nproc=3)
    assert p.returncode != 0 and "3 processes cannot share equally" in p.stderr
    # the first command line again (as torchrun's restarts and --resume auto give it): B = 1 on 2 processes is
    # the run's global batch of 2, so it is no changed setting
    p = torchrun("codistill_grpo.py", *tiny_argv(world, split, *flags, "--max_steps", "5", "--resume", "auto"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [json.loads(l)["processes"] for l in open(split / "resumes.jsonl")] == [[2, 1], [1, 2]]


# ---------------------------------------------------------------------------------------------------------------
# Faults and restarts under torchrun (two CPU processes on gloo; the two-node command as two launchers)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*argv, nproc=2, extra=(), log=None):
    """torchrun in the background, its output into a file -> (Popen, the file)."""
    out = open(log, "w+")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *extra, f"--nproc_per_node={nproc}", *argv],
                         cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return p, out


def workers_of(launcher):
    """{rank: pid} of a torchrun launcher's worker processes (its children running codistill_grpo.py)."""
    out = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-A"], capture_output=True, text=True).stdout
    pids = [int(line.split()[0]) for line in out.splitlines()
            if int(line.split()[1]) == launcher and "codistill_grpo.py" in line]
    environ = lambda pid: dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
    return {int(environ(pid)["RANK"]): pid for pid in pids}


def wait_for(condition, what, seconds=300):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.2)


def text_of(out):
    out.seek(0)
    return out.read()


@pytest.mark.slow
def test_ranks_started_with_different_flags_stop_before_any_work(world, tmp_path):
    """The README's two-node command as two launchers on one machine, the second given other flags: both stop with
    status 2 before loading anything, and one line names every flag the ranks disagree on."""
    port, out = free_port(), tmp_path / "run"
    common = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]
    nodes = [launch("codistill_grpo.py", *tiny_argv(world, out, *flags), nproc=1, log=tmp_path / f"node{i}.log",
                    extra=[*common, f"--node_rank={i}"])
             for i, flags in enumerate([[], ["--lr_small", "0.5", "--seed", "7", "--max_steps", "3"]])]
    for p, _ in nodes:
        p.wait(timeout=300)
    logs = [text_of(f) for _, f in nodes]
    assert all(p.returncode != 0 for p, _ in nodes) and 'codistill_grpo.py", line' not in "".join(logs), logs
    line = [l for log in logs for l in log.splitlines() if l.startswith("error: the ranks were started with")]
    assert line and all(f"--{k} (rank 0: {a}, rank 1: {b})" in line[0]
                        for k, a, b in [("lr_small", "0.0001", "0.5"), ("seed", "0", "7"), ("max_steps", "2", "3")])
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_process_group_that_cannot_form_says_why_at_once(world, tmp_path):
    """A port already taken: the rank stops within seconds and names the cause, not a timeout it never waited."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(taken.getsockname()[1]))
        t = time.time()
        p = subprocess.run([sys.executable, os.path.join(HERE, "codistill_grpo.py"), *tiny_argv(world, tmp_path),
                            "--dist_timeout", "600"], capture_output=True, text=True, env=env, timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and time.time() - t < 120 and "could not form after" in last and "in use" in last, last


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_a_rank_that_hangs_or_dies_is_named_with_the_checkpoint_to_resume_from(based, tmp_path, victim):
    """One rank stopped (SIGSTOP: it hangs) or killed: the other stops after --dist_timeout (or at once) with one
    line, its rank, and the newest checkpoint to resume from, whichever rank it is."""
    import signal
    out = tmp_path / "run"
    p, log = launch("codistill_grpo.py", *based_argv(based, out, "--batch_size", "1", "--max_steps", "200",
                                                     "--save_every", "1", "--eval_size", "0", "--dist_timeout", "20"),
                    log=tmp_path / "run.log")
    wait_for(lambda: (out / "checkpoint-2").exists(), "checkpoint-2")
    pids = workers_of(p.pid)
    assert sorted(pids) == [0, 1]
    os.kill(pids[victim], signal.SIGSTOP if victim == 1 else signal.SIGKILL)
    p.wait(timeout=300)
    text = text_of(log)
    survivor = 1 - victim  # it loses the other in a collective, or torchrun stops it first (SIGTERM)
    lines = [l for l in text.splitlines() if f"rank {survivor} of 2" in l and "newest checkpoint" in l]
    assert lines and "--resume" in lines[0], text[-3000:]
    assert 'codistill_grpo.py", line' not in text, text[-3000:]  # no traceback of ours (torchrun prints its own)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_run_goes_on_from_its_checkpoint(based, tmp_path):
    """torchrun --max-restarts 1 with --resume auto: a rank killed mid-run, both workers restart, resume from the
    newest checkpoint, and the run ends whole. The first restart must form its group: torchrun keeps one store across
    restarts, and without a prefix per attempt the restarted ranks read the dead ones' addresses ('Connection
    refused', on every restart of a CI run with 3)."""
    import signal
    out = tmp_path / "run"
    p, log = launch("codistill_grpo.py", *based_argv(based, out, "--batch_size", "1", "--max_steps", "6",
                                                     "--save_every", "2", "--eval_size", "0", "--resume", "auto"),
                    extra=["--max-restarts=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}"],
                    log=tmp_path / "run.log")
    wait_for(lambda: (out / "checkpoint-2").exists(), "checkpoint-2")
    os.kill(workers_of(p.pid)[1], signal.SIGKILL)
    assert p.wait(timeout=600) == 0, text_of(log)[-3000:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == list(range(7)) and (out / "checkpoint-6").exists()
    resumes = [json.loads(l) for l in open(out / "resumes.jsonl")]
    assert resumes and all(r["iteration"] >= 2 for r in resumes)


@pytest.mark.slow
def test_killing_the_launcher_ends_its_ranks(based, tmp_path):
    """kill -9 of torchrun: its ranks end within seconds (Linux sends each SIGTERM), and free the run folder."""
    import signal
    out = tmp_path / "run"
    p, log = launch("codistill_grpo.py", *based_argv(based, out, "--batch_size", "1", "--max_steps", "500",
                                                     "--save_every", "1", "--eval_size", "0"), log=tmp_path / "run.log")
    wait_for(lambda: (out / "checkpoint-1").exists(), "checkpoint-1")
    pids = list(workers_of(p.pid).values())
    assert len(pids) == 2
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                             for pid in pids), "end of the orphaned ranks", seconds=60)
    cg.main(["--output_dir", str(out), "--resume", "--max_steps", "3"])  # the folder is free again


@pytest.mark.slow
def test_a_full_disk_while_saving_under_fsdp_stops_every_rank_with_one_line(based, tmp_path):
    out = tmp_path / "run"
    p = torchrun(__file__, "failing-save", *based_argv(based, out, "--batch_size", "1", "--fsdp", "--max_steps", "3",
                                                       "--save_every", "1", "--eval_size", "0"))
    assert p.returncode != 0 and 'codistill_grpo.py", line' not in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    errors = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("error: saving")]
    assert len(errors) == 1 and "--resume" in errors[0]
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-1"]


@pytest.mark.slow
def test_ranks_with_different_metrics_reduce_the_same_keys(tmp_path):
    """A metric one rank lacks (digits right, when its answers hold no integer) is averaged over the ranks that have
    it, and every rank reduces every key: no collective of other lengths on the ranks."""
    p = torchrun(__file__, "reduce-worker", str(tmp_path), fresh=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for r in range(2):
        got = json.load(open(tmp_path / f"rank{r}.json"))
        assert got == {"iteration": 3, "a": 2.0, "only_on_rank_0": 5.0, "time/step": 4.0, "tokens_per_s": 30.0}


def reduce_worker(out):
    """Run under torchrun by the test above: rank 0 has a metric rank 1 lacks."""
    cg.setup_distributed()
    R = cg.rank()
    metrics = dict(iteration=3, a=1.0 + 2 * R, **({} if R else {"only_on_rank_0": 5.0}), **{"time/step": 3.0 + R},
                   tokens_per_s=10.0 + 10 * R)
    json.dump(cg.reduce_metrics(metrics), open(os.path.join(out, f"rank{R}.json"), "w"))
    torch.distributed.destroy_process_group()


def failing_save(*argv):
    """Run under torchrun by the test above: the trainer, with rank 0's disk full when it writes checkpoint-2."""
    real = torch.save

    def full(obj, path, *a, **k):
        if "checkpoint-2" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256")
        return real(obj, path, *a, **k)
    torch.save = full
    cg.main(list(argv))


if __name__ == "__main__" and sys.argv[1:2] == ["distributed-worker"]:  # started by torchrun, see torchrun()
    distributed_worker(*sys.argv[2:])
if __name__ == "__main__" and sys.argv[1:2] == ["failing-save"]:
    failing_save(*sys.argv[2:])
if __name__ == "__main__" and sys.argv[1:2] == ["reduce-worker"]:
    reduce_worker(sys.argv[2])
