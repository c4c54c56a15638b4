"""The file to run beside the paper: each equation against numbers worked out by hand, and one iteration of the
method on the tiny world, checked against the equations. In seconds:

    python -m pytest -q test_codistill_grpo.py

The rest of the tests live in tests/, by subject (the README's test command runs them all).
"""
import json
import math

import pytest
import torch

import codistill_grpo as cg
from conftest import based_argv, one_iteration


def test_kd_reward_eq6_by_hand():
    logp_large = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    logp_small = torch.tensor([[-2.0, -2.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # row 0: ((-1+2) + (-2+2)) / 4 = 0.25; row 1: (-0.5+1) / 4 = 0.125; masked tokens do not count
    assert torch.allclose(cg.kd_reward(logp_large, logp_small, mask, max_len=4), torch.tensor([0.25, 0.125]))


def test_kd_reward_with_eq4s_estimator_by_hand():
    """App. C, Fig. 9: -(1/N) sum_t (rho - log rho - 1), rho = pi_theta / pi_phi, over the completion's tokens."""
    logp_large = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -3.0, -1.0]])
    logp_small = torch.tensor([[-2.0, -2.0, -9.0], [-0.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # d = log rho: [1, 0, (8.5 masked)], [0, -2, 0]; rho - d - 1: [e - 2, 0], [0, e^-2 + 1, 0]
    expected = torch.tensor([-(math.e - 2) / 4, -(math.exp(-2) + 1) / 4])
    assert torch.allclose(cg.kd_reward_eq4(logp_large, logp_small, mask, 4), expected)
    assert (cg.kd_reward_eq4(logp_large, logp_small, mask, 4) <= 0).all()  # a KL estimate, paid as a cost


def test_token_advantages_add_each_tokens_log_ratio_by_hand():
    advantages = torch.tensor([1.0, -0.5])
    logp_large = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    logp_small = torch.tensor([[-2.0, -2.0], [-0.5, -1.0]])
    assert torch.equal(cg.token_advantages(advantages, logp_large, logp_small, 2.0),
                       torch.tensor([[3.0, 1.0], [-0.5, -4.5]]))  # A_i + 2 (log pi_theta - log pi_phi) at each token


def test_policy_loss_with_eq2s_kl_term_by_hand():
    """Eq. (2) with beta: each token's objective less beta (e^(ref - logp) - (ref - logp) - 1) (Eq. 4); at rho = 1 its
    gradient pulls log pi towards the reference."""
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, 0.0]])  # d = ref - logp = [0, 1]: D = [0, e - 2]
    loss = cg.policy_loss(logp, logp.detach(), torch.tensor([0.5]), torch.ones(1, 2), 4, 0.2, ref, 0.5)
    assert loss.item() == pytest.approx(-(0.5 + 0.5 - 0.5 * (math.e - 2)) / 4)
    loss.backward()  # d objective / d logp_2 = A rho - beta (1 - e^d) = 0.5 + 0.5 (e - 1)
    assert logp.grad[0, 1].item() == pytest.approx(-(0.5 + 0.5 * (math.e - 1)) / 4)
    assert logp.grad[0, 0].item() == pytest.approx(-0.5 / 4)  # d = 0: the KL term adds nothing
    plain = cg.policy_loss(logp, logp.detach(), torch.tensor([0.5]), torch.ones(1, 2), 4, 0.2)
    assert plain.item() == pytest.approx(-1.0 / 4)  # beta = 0: Eq. (5)


def test_policy_loss_takes_per_token_advantages():
    logp = torch.tensor([[-1.0, -2.0]])
    per_token = cg.policy_loss(logp, logp, torch.tensor([[1.0, 3.0]]), torch.ones(1, 2), 4, 0.2)
    assert per_token.item() == pytest.approx(-(1.0 + 3.0) / 4)
    assert cg.policy_loss(logp, logp, torch.tensor([[2.0, 2.0]]), torch.ones(1, 2), 4, 0.2).item() == \
        cg.policy_loss(logp, logp, torch.tensor([2.0]), torch.ones(1, 2), 4, 0.2).item()


def test_downsample_keeps_top_and_bottom_half():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7, 0.2],
                            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    idx = cg.downsample(rewards, G=4)
    assert idx.shape == (2, 4)
    assert set(idx[0].tolist()) == {1, 4, 0, 5}  # 0.9, 0.7 highest; 0.1, 0.2 lowest
    assert set(idx[1].tolist()) == {0, 1, 4, 5}
    assert cg.downsample(rewards, G=6).tolist() == [list(range(6))] * 2  # M == G keeps all, in order


def test_downsample_g2_keeps_max_and_min():
    rewards = torch.tensor([[0.3, -1.0, 2.0, 0.0]])
    assert sorted(cg.downsample(rewards, G=2)[0].tolist()) == [1, 2]


def test_group_advantages_eq3_and_eq7_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    # mean 0.5; unbiased std sqrt((4 * 0.25) / 3) = 0.577350; 0.5 / (0.577350 + 1e-4) = 0.865875
    a3 = cg.group_advantages(r, scale_by_std=True)
    assert torch.allclose(a3[0], torch.tensor([0.865875, -0.865875, -0.865875, 0.865875]), atol=1e-5)
    assert torch.equal(a3[1], torch.zeros(4))  # all rewards equal: no signal, no NaN
    a7 = cg.group_advantages(r, scale_by_std=False)
    assert torch.allclose(a7[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.equal(a7[1], torch.zeros(4))


def test_policy_loss_eq5_by_hand():
    # log-ratios chosen so that each case of min(rho A, clip(rho) A) appears; eps = 0.2, N = 4
    ratio = torch.tensor([[1.5, 0.5], [1.1, 0.7], [0.5, 1.5]])
    logp_old = torch.tensor([[-1.0, -2.0], [-0.3, -0.4], [-3.0, -1.0]])
    logp = (logp_old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, -2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    loss = cg.policy_loss(logp, logp_old, adv, mask, max_len=4, clip_eps=0.2)
    # row 0, A=+1:  min(1.5, 1.2) = 1.2 (clipped) ; min(0.5, 0.8) = 0.5        -> 1.7 / 4 = 0.425
    # row 1, A=-2:  min(-2.2, -2.2) = -2.2 ; second token masked               -> -2.2 / 4 = -0.55
    # row 2, A=-1:  min(-0.5, -0.8) = -0.8 (clipped) ; min(-1.5, -1.2) = -1.5  -> -2.3 / 4 = -0.575
    # loss = -(0.425 - 0.55 - 0.575) / 3 = 0.233333
    assert loss.item() == pytest.approx(0.7 / 3, abs=1e-6)
    loss.backward()
    # d loss / d logp = -(1/3)(1/4) * rho * A where the unclipped branch is taken and the token is in the mask
    expected = torch.tensor([[0.0, -0.5 / 12], [2.2 / 12, 0.0], [0.0, 1.5 / 12]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_policy_loss_is_mean_over_sequences_and_divides_by_constant_n():
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, 1.0])
    short = torch.tensor([[1, 0, 0], [1, 0, 0]])
    # rho = 1 everywhere: per sequence sum(mask) / N, so a 1-token completion counts 1/N, not 1 (no length bias)
    assert cg.policy_loss(logp, logp, adv, short, max_len=10, clip_eps=0.2).item() == pytest.approx(-0.1)


def test_policy_loss_eq2_divides_each_sequence_by_its_length_by_hand():
    # the numbers of the Eq. (5) test, with max_len the lengths: each row's sum over |o_i| (its mask's sum), not N
    ratio = torch.tensor([[1.5, 0.5], [1.1, 0.7], [0.5, 1.5]])
    logp_old = torch.tensor([[-1.0, -2.0], [-0.3, -0.4], [-3.0, -1.0]])
    logp = (logp_old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, -2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    loss = cg.policy_loss(logp, logp_old, adv, mask, max_len=mask.sum(-1), clip_eps=0.2)
    # row 0: 1.7 / 2 = 0.85 ; row 1: -2.2 / 1 = -2.2 ; row 2: -2.3 / 2 = -1.15 -> loss = -(0.85 - 2.2 - 1.15) / 3
    assert loss.item() == pytest.approx(2.5 / 3, abs=1e-6)
    loss.backward()
    # d loss / d logp = -(1/3)(1/|o_i|) * rho * A on the unclipped, unmasked tokens
    expected = torch.tensor([[0.0, -0.5 / 6], [2.2 / 3, 0.0], [0.0, 1.5 / 6]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_clip_fractions_count_only_tokens_whose_gradient_the_clip_removes_by_hand():
    ratio = torch.tensor([[1.5, 0.5], [1.1, 0.7], [0.5, 1.5]])
    adv = torch.tensor([1.0, -2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    low, high, region = cg.clip_fractions(ratio, adv, mask, clip_eps=0.2)
    # 5 tokens in the mask. low (rho < 0.8, A < 0): row 2's 0.5 (row 1's 0.7 is masked; row 0's 0.5 has A > 0).
    # high (rho > 1.2, A > 0): row 0's 1.5 (row 2's 1.5 has A < 0). |rho - 1| > eps alone would count 4 of 5.
    assert (low, high, region) == (pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.4))


@pytest.mark.parametrize("algo, norm, expected", [("grpo", "auto", "length"), ("codistill", "auto", "constant"),
                                                  ("kdrl", "auto", "constant"), ("grpo", "constant", "constant"),
                                                  ("codistill", "length", "length")])
def test_loss_norm_defaults_to_the_papers_form_of_each_algorithm(algo, norm, expected):
    """What each sequence's token sum is divided by: the constant N (Eq. 5, 10) or its own length (Eq. 2)."""
    assert cg.loss_norm(cg.Args(algo=algo, loss_norm=norm)) == expected


def test_completion_mask_when_pad_equals_eos():
    eos = 0  # pad == EOS
    comp = torch.tensor([[5, 6, eos, eos, eos],
                         [5, eos, 7, eos, eos],
                         [5, 6, 7, 8, 9]])
    assert cg.completion_mask(comp, [eos]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert cg.completion_mask(torch.tensor([[9, 3, 4]]), [3, 4]).tolist() == [[1, 1, 0]]  # any of several EOS


def test_format_reward():
    assert cg.format_reward("<think> a </think> <answer> 3 </answer>") == 1.0
    assert cg.format_reward("<think> a </think> 3") == 0.5
    assert cg.format_reward("<think> <think> a </think> <answer> 3 </answer>") == 0.75  # doubled tag
    assert cg.format_reward("<answer>3</answer><answer>4</answer>") == 0.0
    assert cg.format_reward("no tags at all") == 0.0


def test_one_codistill_iteration_is_the_papers_equations(based, tmp_path):
    """One iteration on the tiny world, checked against the equations: both models score the small model's rollouts
    as they were before their steps (step 3); r~ = r + alpha KD (Eq. 6) ranks the M rollouts and the G/2 highest and
    G/2 lowest are kept (Sec. 3.3); A~ centres r~ (Eq. 7), A centres and scales r (Eq. 3); the small step's ratio is
    against pi_phi_old (Eq. 5), and so is the large step's (Eq. 10); then both models have moved."""
    run, _, it = one_iteration(based_argv(based, tmp_path, "--eval_size", "0", "--alpha", "2"))
    B, M, G, N = 2, 8, 4, 16
    for name in ["small", "large"]:
        base = cg.TokenLogprobs(cg.load_model(based[name], torch.float32, "cpu", False))
        assert torch.allclose(cg.old_logprobs(base, it.rollouts, run.args)[0], it.logp_old[name], atol=1e-6)
        moved = [not torch.equal(p, q) for p, q in zip(run.models[name].lm.parameters(), base.lm.parameters())]
        assert any(moved), name
    assert not torch.allclose(it.logp_old["small"], it.logp_old["large"])
    assert 0 < it.r.mean().item() < 1  # mixed rewards: what follows is not vacuous
    kd = cg.kd_reward(it.logp_old["large"], it.logp_old["small"], it.rollouts["mask"], N)  # (B*M,)
    assert torch.equal(it.kd, kd) and torch.equal(it.r_kd, it.r + 2 * kd)
    kept = (cg.downsample(it.r_kd.view(B, M), G) + M * torch.arange(B)[:, None]).view(-1)  # (B*G,)
    assert torch.equal(it.kept, kept)
    r_kd, r = it.r_kd[kept].view(B, G), it.r[kept].view(B, G)
    assert torch.allclose(it.A_kd, (r_kd - r_kd.mean(1, keepdim=True)).view(-1))
    assert torch.allclose(it.A, ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1))
    assert not torch.allclose(it.A_kd, it.A)  # the KD term moves the small model's advantages
    small, large = it.steps["small"], it.steps["large"]
    assert torch.equal(small.advantages, it.A_kd) and torch.equal(large.advantages, it.A)
    assert torch.equal(small.logp_old, it.logp_old["small"][kept])  # Eq. (5): pi_phi / pi_phi_old
    assert torch.equal(large.logp_old, it.logp_old["small"][kept])  # Eq. (10): pi_theta / pi_phi_old
    assert not small.own.any() and not large.own.any() and torch.equal(small.loss_mask, it.rollouts["mask"][kept])
    assert small.norm == large.norm == "constant" and small.beta == large.beta == 0.0


def test_with_m_equal_g_every_rollout_is_kept_and_both_models_are_scored_before_their_steps(based, tmp_path):
    """M == G: no downsampling, every rollout kept in order; the large model is scored like the small one (a separate
    no-grad pass before its step), and A~ minus alpha times the centred KD term is A's unscaled reward part."""
    run, _, it = one_iteration(based_argv(based, tmp_path, "--eval_size", "0", "--num_samples", "4", "--alpha", "2"))
    B, G = 2, 4
    assert torch.equal(it.kept, torch.arange(B * G))
    base_large = cg.TokenLogprobs(cg.load_model(based["large"], torch.float32, "cpu", False))
    assert torch.allclose(cg.old_logprobs(base_large, it.rollouts, run.args)[0], it.logp_old["large"], atol=1e-6)
    kd = it.kd.view(B, G)
    reward_part = it.A_kd.view(B, G) - 2 * (kd - kd.mean(1, keepdim=True))  # r - mean(r) ...
    for rp, a in zip(reward_part, it.A.view(B, G)):  # ... which Eq. (3) scales by 1 / (std + 1e-4)
        scale = rp.norm() / a.norm() if a.norm() > 0 else 0.0
        assert torch.allclose(rp, a * scale, atol=1e-5)


def test_rollouts_jsonl_shows_one_iteration_in_numbers(based, tmp_path):
    """At iteration 1 and with each held-out evaluation: per prompt, every one of the M completions with r, the KD
    term, r~ = r + alpha * KD (Eq. 6), kept or not (Sec. 3.3: the G/2 highest and G/2 lowest r~), A~ (Eq. 7) and A
    (Eq. 3) of the kept."""
    cg.main(based_argv(based, tmp_path, "--max_steps", "3", "--eval_every", "2", "--alpha", "2"))
    rows = [json.loads(l) for l in open(tmp_path / "rollouts.jsonl")]
    assert sorted({r["iteration"] for r in rows}) == [1, 2, 3] and len(rows) == 6  # 2 prompts per iteration
    for row in rows:
        c = row["completions"]
        assert len(c) == 8 and row["alpha"] == 2.0 and row["answer"] in {json.loads(l)["answer"]
                                                                           for l in open(based["data"])}
        for x in c:
            assert x["r_kd"] == pytest.approx(x["r"] + 2.0 * x["kd"], abs=1e-6)
        kept = [x for x in c if x["kept"]]
        dropped = [x for x in c if not x["kept"]]
        assert len(kept) == 4
        order = sorted(x["r_kd"] for x in c)
        assert sorted(x["r_kd"] for x in dropped) == order[2:6]  # the middle four go
        r_kd = torch.tensor([x["r_kd"] for x in kept])
        r = torch.tensor([x["r"] for x in kept])
        assert torch.allclose(torch.tensor([x["A_kd"] for x in kept]), r_kd - r_kd.mean(), atol=1e-5)
        assert torch.allclose(torch.tensor([x["A"] for x in kept]), (r - r.mean()) / (r.std() + 1e-4), atol=1e-4)
        assert all(x["A"] is None and x["A_kd"] is None for x in dropped)


def test_policy_loss_stays_finite_for_far_off_policy_tokens():
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    logp_old = torch.tensor([[-1000.0, 500.0]])  # log-ratios of +1000 and -501: exp would overflow
    loss = cg.policy_loss(logp, logp_old, torch.tensor([-1.0]), torch.ones(1, 2), max_len=2, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
