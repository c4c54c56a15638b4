"""The baselines and the variants in the loop on the tiny world: each --algo, hints and the ratio on hint tokens, the
loss normalisations, the forms of the KD signal, the presets' defaults, and that the learning signal has the right sign."""
import json
import math
import statistics

import pytest
import torch

import codistill_grpo as cg
from conftest import one_iteration, based_argv, flat_params, tiny_argv


REQUIRED_KEYS = {"iteration", "time/step", "time/generate", "time/score", "time/update_small", "time/update_large"}


@pytest.mark.parametrize("algo, extra, changed, frozen, prefix", [
    ("codistill", [], ["small", "large"], [], ["small", "large"]),
    ("kdrl", [], ["small"], ["large"], ["small"]),
    ("grpo", ["--policy", "small"], ["policy"], [], ["policy"]),
    ("grpo", ["--policy", "large"], ["policy"], [], ["policy"]),
])
def test_two_iterations_of_each_algo(based, tmp_path, algo, extra, changed, frozen, prefix):
    world = based
    cg.main(based_argv(based, tmp_path, "--algo", algo, *extra))
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    names = ["policy"] if algo == "grpo" else ["small", "large"]
    for n in names:
        assert f"{n}/test_accuracy" in rows[0]
    for r in rows[1:]:
        assert REQUIRED_KEYS <= r.keys()
        for p in prefix:
            assert {f"{p}/accuracy", f"{p}/loss", f"{p}/grad_norm", f"{p}/test_accuracy"} <= r.keys()
        assert "small/zero_accuracy_frac" in r or algo == "grpo"
        assert all(math.isfinite(v) for v in r.values())
        assert 0 < r[f"{prefix[0]}/accuracy"] < 1  # the reward varies: the check below is not vacuous
    if algo != "grpo":
        assert "large/accuracy" in rows[1]
    ckpt = tmp_path / "checkpoint-2"
    start = {"small": world["small"], "large": world["large"],
             "policy": world[extra[1]] if extra else None}
    for n in changed:
        assert not torch.allclose(flat_params(ckpt / n), flat_params(start[n])), f"{n} did not change"
    for n in frozen:
        assert not (ckpt / n).exists()  # kdrl's large model is an input, not an output
    timed = ["generate", "reward", "update_small" if algo != "grpo" or extra[1] == "small" else "update_large"]
    for r in rows[1:]:  # each phase the iteration went through took time, and together no more than the step
        assert all(r[f"time/{p}"] > 0 for p in timed + ["score"] * (algo != "grpo")), r
        assert sum(r[f"time/{p}"] for p in ["generate", "reward", "score", "update_small", "update_large"]) <= \
            r["time/step"]
    if algo == "kdrl":
        assert rows[2]["time/update_large"] == 0.0


def test_truncated_completions_and_equal_reward_groups_are_counted(based, tmp_path):
    # N = 2: no completion can hold an answer (' \\boxed{85}' is 6 tokens), so every reward is 0 and every group's
    # advantages are 0; most completions are cut at N without EOS (the rest ended early, some possibly empty)
    cg.main(based_argv(based, tmp_path, "--max_completion_length", "2", "--max_steps", "1", "--eval_size", "0"))
    row = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][-1]
    assert row["small/truncated_frac"] > 0.5 and row["small/completion_length"] <= 2.0
    assert 0.0 <= row["small/empty_frac"] <= 1.0 - row["small/truncated_frac"]
    assert row["small/accuracy"] == 0.0
    assert row["small/equal_reward_groups_frac"] == 1.0 and row["large/grad_norm"] == 0.0
    assert row["grade_timeouts"] == 0 and row["small/skipped_step"] == 0.0


def test_kdrl_leaves_the_large_model_untouched(based, tmp_path):
    run = cg.train(cg.parse_args(based_argv(based, tmp_path, "--algo", "kdrl")))
    large = torch.cat([p.detach().flatten() for p in run.models["large"].lm.parameters()])
    assert torch.equal(large, flat_params(based["large"])) and not run.models["large"].trained
    small = torch.cat([p.detach().flatten() for p in run.models["small"].lm.parameters()])
    assert not torch.equal(small, flat_params(based["small"]))


@pytest.mark.parametrize("hint_ratio", ["small", "large", "ignore"])
@pytest.mark.parametrize("M", [8, 4], ids=["M>G", "M=G"])
def test_hints_and_the_ratio_on_them(world, tmp_path, hint_ratio, M):
    """T = 4 hint tokens from the (random) large model, which writes all 4 of them. The small step's ratio on its own
    tokens is against pi_phi_old, whatever --hint_ratio; on the hint tokens against pi_phi_old too with small (Eq. 5),
    against pi_theta_old with large (Eq. 8 i), and with ignore they leave the loss while the model still sees them.
    With --large_hint_ratio behaviour the large model's ratio on its own hint tokens is against itself."""
    run, _, it = one_iteration(tiny_argv(world, tmp_path, "--hint_tokens", "4", "--hint_ratio", hint_ratio,
                                         "--eval_size", "0", "--num_samples", str(M), "--hint_share", "1",
                                         "--large_hint_ratio", "behaviour"))
    assert it.hints and (it.rollouts["hint"].sum(1) == 4).all() and it.rollouts["comp"].shape[1] <= 16
    kept, small, large = it.kept, it.steps["small"], it.steps["large"]
    hint, mask = it.rollouts["hint"][kept].bool(), it.rollouts["mask"][kept].bool()  # (B*G, L)
    assert hint[:, :4].all() and not hint[:, 4:].any()
    phi_old, theta_old = it.logp_old["small"][kept], it.logp_old["large"][kept]
    assert not small.own.any() and torch.equal(small.logp_old[~hint], phi_old[~hint])  # its own tokens
    assert torch.equal(small.logp_old[hint], (theta_old if hint_ratio == "large" else phi_old)[hint])
    assert not torch.allclose(phi_old[hint], theta_old[hint])  # two different models: the choice matters
    assert torch.equal(small.loss_mask.bool(), mask & ~hint if hint_ratio == "ignore" else mask)
    assert torch.equal(large.own, hint) and torch.equal(large.logp_old[~hint], phi_old[~hint])  # Eq. (10) after


@pytest.mark.parametrize("M", [8, 4], ids=["M>G", "M=G"])
def test_the_large_models_ratio_on_hint_tokens_is_the_literal_eq_10_by_default(world, tmp_path, M):
    """Eq. (10) as printed: pi_theta / pi_phi_old on every token, the hints the large model wrote included."""
    run, _, it = one_iteration(tiny_argv(world, tmp_path, "--hint_tokens", "4", "--eval_size", "0",
                                         "--num_samples", str(M), "--hint_share", "1"))
    assert cg.parse_args([]).large_hint_ratio == "small" and it.hints
    large = it.steps["large"]
    assert not large.own.any() and torch.equal(large.logp_old, it.logp_old["small"][it.kept])


@pytest.mark.parametrize("algo, flags, norm", [("grpo", [], "length"), ("grpo", ["--loss_norm", "constant"], "constant"),
                                               ("codistill", [], "constant"), ("kdrl", [], "constant")])
def test_the_loss_divides_by_the_normalisation_of_its_equation(world, tmp_path, algo, flags, norm):
    """Eq. (2) divides each sequence's token sum by its length (GRPO, as the paper ran it), Eq. (5) and (10) by N."""
    run, _, it = one_iteration(tiny_argv(world, tmp_path, "--algo", algo, "--eval_size", "0", *flags))
    assert it.steps and all(step.norm == norm for step in it.steps.values())


def test_metrics_a_grpo_user_reads(world, tmp_path):
    """Entropy per model, TRL's clip fractions, and the mean log-ratio of the two models on the kept tokens: with
    M == G every rollout is kept, so it is the KD term times N over the mean completion length."""
    cg.main(tiny_argv(world, tmp_path, "--eval_size", "0", "--num_samples", "4"))
    row = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][2]
    for model in ["small", "large"]:
        assert 0 < row[f"{model}/entropy"] <= math.log(600)  # nats, at most log(vocabulary)
        low, high, region = (row[f"{model}/clip_ratio/{k}_mean"] for k in ["low", "high", "region"])
        assert 0 <= low <= region and 0 <= high <= region and region == pytest.approx(low + high)
    assert row["small/kd_log_ratio"] == pytest.approx(row["small/kd_reward"] * 16 / row["small/completion_length"],
                                                      rel=1e-4)


def test_preset_sets_defaults_and_flags_override():
    a = cg.parse_args(["--preset", "paper-llama", "--num_samples", "16"])
    assert (a.template, a.lr_small, a.group_size, a.num_samples) == ("boxed", 1e-7, 8, 16)
    a = cg.parse_args([])
    assert (a.num_samples, a.group_size, a.max_completion_length, a.lr_small, a.epochs) == (14, 8, 3072, 5e-6, 8)


def expected_reward(model_dir, rows, n=256):
    """Mean accuracy of n sampled completions per problem (temperature 1): the reward on the model's own rollouts."""
    tok = cg.load_tokenizer(model_dir)
    model = cg.load_model(model_dir, torch.float32, "cpu", False)
    torch.manual_seed(0)
    problems = [r["problem"] for r in rows for _ in range(n)]
    texts = cg.complete(model, tok, problems, "boxed", 16, 64, cg.eos_ids_of(tok, model), 512, temperature=1.0)
    return statistics.mean(cg.grade_batch(texts, [r["answer"] for r in rows for _ in range(n)], "boxed")())


@pytest.mark.slow
def test_a_short_tiny_run_raises_the_small_models_reward(based, tmp_path):
    """The learning signal has the right sign: 24 CoDistill iterations on the two problems the `based` small model
    half knows, with a large model that knows them, raise the small model's expected reward (seed fixed; measured
    36.7% -> 42.6% with 512 samples each, about 2 standard errors; 8 iterations moved it less than the noise)."""
    out = tmp_path / "run"
    cg.main(based_argv(based, out, "--max_steps", "24", "--eval_size", "0", "--lr_small", "3e-4", "--large_model",
                       based["strong"]))
    rows = [json.loads(l) for l in open(based["data"])]
    before, after = expected_reward(based["small"], rows), expected_reward(str(out / "checkpoint-24" / "small"), rows)
    assert after > before + 0.02, (before, after)


@pytest.mark.slow
def test_hints_last_for_their_share_of_the_planned_run(based, tmp_path, capsys):
    """Hints (T > 0) in the first --hint_share of the iterations: by default 1/8, the paper's first epoch of 8. The
    run says which iterations those are, and how long an epoch is (with --max_steps, a share is no epoch)."""
    def hinted(out, *flags):
        cg.main(based_argv(based, out, "--hint_tokens", "3", "--eval_size", "0", *flags))
        return [r["iteration"] for r in map(json.loads, open(out / "metrics.jsonl")) if "small/hint_length" in r]
    assert hinted(tmp_path / "a", "--max_steps", "8") == [1]
    assert "hints (T = 3) in iterations 1..1: --hint_share 0.125 of the 8 planned; an epoch is 1 iteration(s)" in \
        capsys.readouterr().out  # the `based` data: 2 problems, B = 2
    assert hinted(tmp_path / "b", "--max_steps", "4", "--hint_share", "0.5") == [1, 2]
    assert hinted(tmp_path / "c", "--max_steps", "2", "--hint_share", "0") == []
    paper = cg.parse_args([])
    assert paper.hint_share * paper.epochs == 1  # the first epoch
    llama = cg.parse_args(["--preset", "paper-llama"])
    assert llama.hint_share * llama.epochs == 1


def test_grpo_samples_g_unless_told_otherwise():
    """Sec. 4: "For GRPO, we generate and update using only G = 8 rollouts"; M > G is an explicit control."""
    assert (cg.parse_args(["--algo", "grpo"]).num_samples, cg.parse_args(["--algo", "grpo"]).group_size) == (8, 8)
    tiny = cg.parse_args(["--preset", "tiny", "--algo", "grpo"])
    assert tiny.num_samples == tiny.group_size == 4
    assert cg.parse_args(["--preset", "tiny", "--algo", "grpo", "--group_size", "2"]).num_samples == 2
    control = cg.parse_args(["--preset", "tiny", "--algo", "grpo", "--num_samples", "8"])
    assert (control.num_samples, control.group_size) == (8, 4)
    assert cg.parse_args(["--algo", "codistill"]).num_samples == 14  # Table 3


def test_kdrl_says_when_its_teacher_never_had_grpo(based, tmp_path, capsys):
    cg.main(based_argv(based, tmp_path / "a", "--algo", "kdrl", "--max_steps", "1", "--eval_size", "0"))
    assert "freezes a large model that first had GRPO" in capsys.readouterr().out
    cg.main(based_argv(based, tmp_path / "teacher", "--algo", "grpo", "--policy", "large", "--max_steps", "1",
                       "--eval_size", "0"))
    cg.main(based_argv(based, tmp_path / "b", "--algo", "kdrl", "--max_steps", "1", "--eval_size", "0",
                       "--large_model", str(tmp_path / "teacher" / "checkpoint-1" / "policy")))
    assert "freezes a large model that first had GRPO" not in capsys.readouterr().out


@pytest.mark.parametrize("form", ["reward", "reward_eq4", "loss", "token", "rank_only", "advantage_only"])
def test_each_form_of_the_kd_signal_reaches_the_small_step(based, tmp_path, form):
    """--kd_form: Eq. (6) in the reward (the paper), Eq. (4)'s estimator in the reward (Fig. 9), Eq. (2)'s KL term in
    the loss with pi_ref = pi_theta_old (Sec. 3.1), or each token's log-ratio in its advantage; and Eq. (6) in one
    of its two uses only: ranking the M (rank_only) or in A~ (advantage_only, the M ranked by r). The rows of
    rollouts.jsonl hold r, the KD term, r~ and A~ of each completion and its per-token log-ratios: recompute each
    form from them."""
    run, batch, it = one_iteration(based_argv(based, tmp_path, "--kd_form", form, "--eval_size", "0", "--alpha", "2"))
    rows = cg.rollout_table(run, batch, it)()
    assert {r["kd_form"] for r in rows} == {form} and len(rows) == 2
    for row in rows:
        for c in row["completions"]:
            d = torch.tensor(c["kd_tokens"])
            assert len(c["tokens"]) == len(d) > 0
            eq6, eq4 = d.sum().item() / 16, -(d.exp() - d - 1).sum().item() / 16
            assert c["kd"] == pytest.approx(eq4 if form == "reward_eq4" else eq6, abs=1e-3)
            assert c["r_kd"] == pytest.approx(c["r"] + 2 * c["kd"], abs=1e-5)  # ranks the M (Sec. 3.3)
        kept = [c for c in row["completions"] if c["kept"]]
        ranked = sorted(c["r" if form == "advantage_only" else "r_kd"] for c in row["completions"])
        assert sorted(c["r" if form == "advantage_only" else "r_kd"] for c in kept) == ranked[:2] + ranked[-2:]
        paid = [c["r_kd"] if form in ("reward", "reward_eq4", "advantage_only") else c["r"] for c in kept]
        assert [c["A_kd"] for c in kept] == pytest.approx([x - sum(paid) / len(paid) for x in paid], abs=1e-5)
    small, large = it.steps["small"], it.steps["large"]
    assert small.beta == (2.0 if form == "loss" else 0.0)
    assert small.advantages.dim() == (2 if form == "token" else 1)
    assert large.beta == 0.0 and torch.equal(large.advantages, it.A)  # its step is the same in every form


def test_token_level_advantages_are_the_sequences_plus_each_tokens_log_ratio(based, tmp_path):
    run, _, it = one_iteration(based_argv(based, tmp_path, "--kd_form", "token", "--eval_size", "0", "--alpha", "2"))
    log_ratio = (it.logp_old["large"] - it.logp_old["small"])[it.kept]  # (B*G, L)
    assert torch.allclose(it.steps["small"].advantages, it.A_kd[:, None] + 2 * log_ratio)
    assert not torch.allclose(it.steps["small"].advantages, it.A_kd[:, None].expand_as(log_ratio))
