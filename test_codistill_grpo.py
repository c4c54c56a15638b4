"""Tests: each equation against numbers worked out by hand, the log-prob and mask machinery against HF's own
computation, the graders on typical strings, the whole loop on the tiny world, resume and checkpoints, every bad
input, and eval.py (the table's arithmetic by hand, scoring a tiny checkpoint, summaries and plots of runs).

    python -m pytest -q test_codistill_grpo.py
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline: a hub lookup fails fast, not in 20 s

import json
import math
import shutil
import signal
import statistics
import subprocess
import time
import sys

import pytest
import torch

import codistill_grpo as cg
import eval as ev
import tiny_world

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The tiny world with random weights (built in a second; the preset's warm-ups take minutes)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    return dict(cache=cache, **tiny_world.build(cache, seed=0, steps=dict(small=0, large=0)))


@pytest.fixture(scope="session")
def tiny(world):
    from transformers import AutoModelForCausalLM
    tok = cg.load_tokenizer(world["small"])
    model = AutoModelForCausalLM.from_pretrained(world["small"], dtype=torch.float32)
    return tok, model


@pytest.fixture(scope="session")
def based(world, tmp_path_factory):
    """Tiny base models that know 2 problems partly (both models right on some samples and wrong on others, so
    that rewards are mixed and both models learn): random weights get no reward at all, and then no GRPO advantage
    and no update either. strong: a large model that is right on nearly every sample."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("based")
    tok = cg.load_tokenizer(world["small"])
    rows = [json.loads(l) for l in open(world["train"])][:2]
    (root / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, target in [("small", 0.3), ("large", 0.45), ("strong", 0.97)]:
        model = AutoModelForCausalLM.from_pretrained(world["small" if name == "small" else "large"], dtype=torch.float32)
        for steps in range(5, 200, 5):  # until the model is right that often (a few steps more or less on another CPU)
            tiny_world.warmup(model, tok, rows, 5, 2e-3, seed=steps, batch_size=8, decay=False)
            if sampled_accuracy(model, tok, rows) >= target:
                break
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return dict(world, small=str(root / "small"), large=str(root / "large"), strong=str(root / "strong"),
                data=str(root / "two.jsonl"))


def sampled_accuracy(model, tok, rows, n=64):
    torch.manual_seed(0)
    texts = cg.complete(model, tok, [r["problem"] for r in rows for _ in range(n)], "boxed", 16, 64, [tok.eos_token_id],
                        n * len(rows), temperature=1.0)
    return statistics.mean(cg.final_answer(t, "boxed") == rows[i // n]["answer"] for i, t in enumerate(texts))


def tiny_argv(world, out, *extra):
    """A two-iteration run of --preset tiny on the given world's models and data, shrunk to seconds."""
    return ["--preset", "tiny", "--cache_dir", world["cache"], "--small_model", world["small"], "--large_model",
            world["large"], "--dataset", world["train"], "--eval_dataset", world["test"], "--output_dir", str(out),
            "--max_steps", "2", "--batch_size", "2", "--num_samples", "8", "--group_size", "4", "--eval_size", "4",
            "--eval_every", "1", "--micro_batch_size", "3", "--save_every", "0", *extra]


def based_argv(based, out, *extra):
    """A run on the `based` pair's two problems (held-out accuracy on the world's test problems)."""
    return tiny_argv(dict(based, train=based["data"]), out, *extra)


# ---------------------------------------------------------------------------------------------------------------
# The equations, by hand


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
    # the numbers of the Eq. (5) test, with max_len None: each row's sum over |o_i| (its mask's sum) instead of N
    ratio = torch.tensor([[1.5, 0.5], [1.1, 0.7], [0.5, 1.5]])
    logp_old = torch.tensor([[-1.0, -2.0], [-0.3, -0.4], [-3.0, -1.0]])
    logp = (logp_old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, -2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    loss = cg.policy_loss(logp, logp_old, adv, mask, max_len=None, clip_eps=0.2)
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


@pytest.mark.parametrize("algo, norm, expected", [("grpo", "auto", None), ("codistill", "auto", 3072),
                                                  ("kdrl", "auto", 3072), ("grpo", "constant", 3072),
                                                  ("codistill", "length", None)])
def test_loss_norm_defaults_to_the_papers_form_of_each_algorithm(algo, norm, expected):
    """What each sequence's token sum is divided by: N (Eq. 5, 10) or, as None, its own length (Eq. 2)."""
    assert cg.loss_divisor(cg.Args(algo=algo, loss_norm=norm)) == expected


# ---------------------------------------------------------------------------------------------------------------
# Masks and log-probs


def test_completion_mask_when_pad_equals_eos():
    eos = 0  # pad == EOS
    comp = torch.tensor([[5, 6, eos, eos, eos],
                         [5, eos, 7, eos, eos],
                         [5, 6, 7, 8, 9]])
    assert cg.completion_mask(comp, [eos]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert cg.completion_mask(torch.tensor([[9, 3, 4]]), [3, 4]).tolist() == [[1, 1, 0]]  # any of several EOS


def test_decode_stops_at_the_mask_whatever_follows(tiny):
    tok, _ = tiny
    a, b = tok("12")["input_ids"], tok(" + 3")["input_ids"]
    assert tok.convert_ids_to_tokens(0) != tok.eos_token  # id 0 is an ordinary token, as in Qwen
    comp = torch.tensor([a + [tok.eos_token_id] + b, a + b + [0]])
    mask = cg.completion_mask(comp, [tok.eos_token_id])
    assert cg.decode(tok, comp, mask) == ["12", "12 + 3" + tok.decode([0])]


def test_generated_eos_is_inside_the_mask(tiny):
    tok, model = tiny
    assert tok.pad_token_id == tok.eos_token_id
    ids, mask = cg.encode_prompts(tok, ["What is 12 + 34"] * 64, "boxed", 64, "cpu")
    torch.manual_seed(0)
    comp = cg.sample(model, ids, mask, 12, 3.0, [tok.eos_token_id], tok.pad_token_id, 64)  # hot: EOS comes early
    m = cg.completion_mask(comp, [tok.eos_token_id])
    ended = (comp == tok.eos_token_id).any(1)
    assert ended.any() and (~ended).any()
    for row, mrow in zip(comp[ended], m[ended]):
        first = (row == tok.eos_token_id).nonzero()[0].item()
        assert mrow[first] == 1 and mrow[:first].all() and not mrow[first + 1:].any()
    assert m[~ended].all()


def seqs_of(prompt_ids, prompt_mask, comp, mask):
    """Rollouts as update() and score() take them."""
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, comp=comp, mask=mask)


def naive_logprobs(model, prompt_ids, prompt_mask, comp, comp_mask, temperature):
    ids = torch.cat([prompt_ids, comp], 1)
    attn = torch.cat([prompt_mask, comp_mask], 1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, prompt_ids.shape[1] - 1:-1]
    return (logits.float() / temperature).log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)


def test_chunked_logprobs_equal_naive_values_and_gradients(tiny):
    tok, model = tiny
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67"], "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok), (2, 7))
    cmask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    grads = []
    for fn in [lambda: naive_logprobs(model, ids, pmask, comp, cmask, 0.7),
               lambda: cg.token_logprobs(model, ids, pmask, comp, cmask, 0.7, chunk=3)]:  # 14 tokens, chunks of 3
        model.zero_grad()
        lp = fn()
        (lp * cmask).sum().backward()
        grads.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0].dtype == grads[1][0].dtype == torch.float32
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(g0, g1, atol=1e-5)
    model.zero_grad()


def test_entropy_is_that_of_the_sampling_distribution(tiny):
    tok, model = tiny
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67"], "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok) - 1, (2, 5), generator=torch.Generator().manual_seed(3))
    cmask = torch.ones_like(comp)
    with torch.no_grad():
        logp, entropy = cg.token_logprobs(model, ids, pmask, comp, cmask, 0.7, chunk=3, entropy=True)
        full = torch.cat([ids, comp], 1)
        attn = torch.cat([pmask, cmask], 1)
        logits = model(input_ids=full, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
        p = torch.softmax(logits[:, ids.shape[1] - 1:-1].float() / 0.7, -1)  # (2, 5, V) at the temperature
        naive = -(p * p.log()).sum(-1)
    assert torch.allclose(entropy, naive, atol=1e-4)
    assert torch.equal(logp, cg.token_logprobs(model, ids, pmask, comp, cmask, 0.7, chunk=3))


def test_logprobs_equal_the_scores_generate_sampled_with(tiny):
    from transformers import GenerationConfig
    tok, model = tiny
    model.eval()
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67", "What is 99 + 10"], "boxed", 64, "cpu")
    assert (pmask == 0).any()  # left padding is exercised
    torch.manual_seed(1)
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=10,
                           eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=pmask, generation_config=cfg, output_scores=True,
                         return_dict_in_generate=True)
    comp = out.sequences[:, ids.shape[1]:]
    scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # (S, L, V): already divided by the temperature
    from_generate = scores.gather(-1, comp[..., None]).squeeze(-1)
    cmask = cg.completion_mask(comp, [tok.eos_token_id])
    with torch.no_grad():
        ours = cg.token_logprobs(model, ids, pmask, comp, cmask, 0.7, chunk=5)
    m = cmask.bool()
    assert torch.allclose(ours[m], from_generate[m], atol=1e-4)


def test_loss_scale_does_not_depend_on_micro_batch_size(tiny):
    tok, model0 = tiny
    import copy
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67"] * 3, "boxed", 64, "cpu")
    torch.manual_seed(0)
    comp = torch.randint(1, len(tok), (6, 5))
    cmask = torch.ones_like(comp)
    cmask[0, 3:] = 0
    with torch.no_grad():
        old = cg.token_logprobs(model0, ids, pmask, comp, cmask, 1.0, 64) - 0.05  # ratios slightly off 1
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])
    after = []
    for mb in [6, 4, 1]:
        model = copy.deepcopy(model0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: the step is the gradient itself
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        a = cg.Args(micro_batch_size=mb, max_completion_length=5, max_grad_norm=1e9)
        cg.update(cg.TokenLogprobs(model), opt, sched, seqs_of(ids, pmask, comp, cmask), old, adv, a)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    before = torch.cat([p.detach().flatten() for p in model0.parameters()])
    assert not torch.allclose(after[0], before)
    assert torch.allclose(after[0], after[1], atol=1e-6) and torch.allclose(after[0], after[2], atol=1e-6)


def test_an_on_policy_step_needs_no_scoring_pass(tiny):
    """update(logp_old=None) takes pi_old from its own forward pass, detached: the step a scoring pass gives."""
    import copy
    tok, model0 = tiny
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67"] * 2, "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok) - 1, (4, 5), generator=torch.Generator().manual_seed(1))
    cmask = torch.ones_like(comp)
    cmask[1, 2:] = 0
    a = cg.Args(micro_batch_size=3, max_completion_length=5, max_grad_norm=1e9)
    after, stats = [], []
    for scored in [True, False]:
        model = copy.deepcopy(model0)
        scorer = cg.TokenLogprobs(model)
        old = cg.old_logprobs(scorer, seqs_of(ids, pmask, comp, cmask), a)[0] if scored else None
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        stats.append(cg.update(scorer, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                               seqs_of(ids, pmask, comp, cmask), old, torch.tensor([1.0, -1.0, 0.5, -0.5]), a))
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(after[0], torch.cat([p.detach().flatten() for p in model0.parameters()]))
    assert torch.allclose(after[0], after[1], atol=1e-6)
    assert stats[1]["ratio_mean"] == 1.0 and stats[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_the_log_probs_an_update_keeps_are_the_models_before_its_step(tiny):
    """With M == G the large model's step runs first and its forward pass gives the old log-probs of Eq. (6)."""
    import copy
    tok, model0 = tiny
    model = copy.deepcopy(model0)
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67", "What is 3 + 4"], "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok) - 1, (3, 5), generator=torch.Generator().manual_seed(2))
    cmask = torch.ones_like(comp)
    cmask[2, 3:] = 0
    a = cg.Args(micro_batch_size=2, max_completion_length=5)
    scorer = cg.TokenLogprobs(model)
    before = cg.old_logprobs(scorer, seqs_of(ids, pmask, comp, cmask), a)[0]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = cg.update(scorer, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), seqs_of(ids, pmask, comp, cmask),
                      before - 0.1, torch.tensor([1.0, -1.0, 0.5]), a, keep_logp=True)
    assert torch.allclose(stats["logp"], before, atol=1e-6)
    assert not torch.allclose(cg.old_logprobs(scorer, seqs_of(ids, pmask, comp, cmask), a)[0], before, atol=1e-3)  # it stepped


def test_gradient_checkpointing_gives_the_same_step(world, tiny):
    tok, _ = tiny
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67"], "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok) - 1, (2, 6))
    cmask = torch.ones_like(comp)
    after = []
    for gc in [False, True]:
        model = cg.load_model(world["small"], torch.float32, "cpu", gc)
        with torch.no_grad():
            old = cg.token_logprobs(model, ids, pmask, comp, cmask, 1.0, 64) - 0.1
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        a = cg.Args(micro_batch_size=2, max_completion_length=6, max_grad_norm=1e9)
        cg.update(cg.TokenLogprobs(model), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                  seqs_of(ids, pmask, comp, cmask), old, torch.tensor([1.0, -1.0]), a)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(after[0], after[1], atol=1e-6)


def test_models_with_differently_padded_vocabularies_train_together(based, tmp_path):
    from transformers import AutoModelForCausalLM
    padded = tmp_path / "large_padded"
    model = AutoModelForCausalLM.from_pretrained(based["large"])
    model.resize_token_embeddings(model.config.vocab_size + 64)  # as Qwen2.5-7B's 152,064 vs 1.5B's 151,936
    model.save_pretrained(padded)
    cg.load_tokenizer(based["large"]).save_pretrained(padded)
    cg.main(based_argv(based, tmp_path / "run", "--max_steps", "1", "--eval_size", "0", "--large_model", str(padded)))
    row = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert math.isfinite(row["small/kd_reward"]) and math.isfinite(row["large/loss"])


# ---------------------------------------------------------------------------------------------------------------
# Rewards and grading


def test_format_reward():
    assert cg.format_reward("<think> a </think> <answer> 3 </answer>") == 1.0
    assert cg.format_reward("<think> a </think> 3") == 0.5
    assert cg.format_reward("<think> <think> a </think> <answer> 3 </answer>") == 0.75  # doubled tag
    assert cg.format_reward("<answer>3</answer><answer>4</answer>") == 0.0
    assert cg.format_reward("no tags at all") == 0.0


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


# ---------------------------------------------------------------------------------------------------------------
# The whole loop on the tiny world


def flat_params(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


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


def test_kdrl_leaves_the_large_model_untouched(based, tmp_path, monkeypatch):
    seen = {}
    real_train = cg.train

    def spy(a):
        seen["models"] = real_train(a)
        return seen["models"]
    monkeypatch.setattr(cg, "train", spy)
    cg.main(based_argv(based, tmp_path, "--algo", "kdrl"))
    large = torch.cat([p.detach().flatten() for p in seen["models"]["large"].parameters()])
    assert torch.equal(large, flat_params(based["large"]))
    small = torch.cat([p.detach().flatten() for p in seen["models"]["small"].parameters()])
    assert not torch.equal(small, flat_params(based["small"]))


def test_codistill_wiring_of_old_logprobs_and_advantages(based, tmp_path, monkeypatch):
    """Both steps divide by the small model's old log-probs (Eq. (5) and Eq. (10)); the small step's advantages
    are centred per group (Eq. (7)), the large step's are centred and scaled (Eq. (3)), and they differ (KD)."""
    scores, updates = [], []
    real_score, real_update = cg.old_logprobs, cg.update

    def spy_score(model, *args):
        out = real_score(model, *args)
        scores.append((model, out[0]))
        return out

    def spy_update(model, opt, sched, seqs, logp_old, advantages, a, **kw):
        updates.append((model, logp_old.clone(), advantages.clone()))
        return real_update(model, opt, sched, seqs, logp_old, advantages, a, **kw)
    monkeypatch.setattr(cg, "old_logprobs", spy_score)
    monkeypatch.setattr(cg, "update", spy_update)
    cg.main(based_argv(based, tmp_path, "--max_steps", "1", "--eval_size", "0", "--alpha", "2"))
    (small, logp_small_old), (large, logp_large_old) = scores
    (m1, old1, adv1), (m2, old2, adv2) = updates
    assert m1 is small and m2 is large and small is not large
    assert torch.equal(old1, old2)  # rho = pi_theta / pi_phi_old for the large model, Eq. (10)
    small_rows = {tuple(r.tolist()) for r in logp_small_old}
    assert all(tuple(r.tolist()) in small_rows for r in old2)  # kept rows of the small model's scores
    assert not torch.allclose(logp_small_old, logp_large_old)
    B, G = 2, 4
    assert torch.allclose(adv1.view(B, G).mean(1), torch.zeros(B), atol=1e-6)  # Eq. (7): centred, not scaled
    assert torch.allclose(adv2.view(B, G).mean(1), torch.zeros(B), atol=1e-6)
    for group in adv2.view(B, G):  # Eq. (3): unit (unbiased) std where the rewards differ
        if group.abs().sum() > 0:
            assert group.std().item() == pytest.approx(1.0, abs=1e-3)
    assert not torch.allclose(adv1, adv2)  # the KD term changes the small model's advantages


def test_with_m_equal_g_the_large_step_comes_first_and_scores_for_the_kd_reward(based, tmp_path, monkeypatch):
    """M == G: no separate scoring pass of the large model. Its step runs first, on all rollouts, against the small
    model's old log-probs (Eq. (10)); the log-probs its forward pass kept make the KD reward of the small step."""
    scores, updates = [], []
    real_score, real_update = cg.old_logprobs, cg.update

    def spy_score(model, *args):
        out = real_score(model, *args)
        scores.append((model, out[0]))
        return out

    def spy_update(model, opt, sched, seqs, logp_old, advantages, a, **kw):
        out = real_update(model, opt, sched, seqs, logp_old, advantages, a, **kw)
        updates.append((model, seqs["mask"], logp_old.clone(), advantages.clone(), out.get("logp"), seqs))
        return out
    monkeypatch.setattr(cg, "old_logprobs", spy_score)
    monkeypatch.setattr(cg, "update", spy_update)
    cg.main(based_argv(based, tmp_path, "--max_steps", "1", "--eval_size", "0", "--num_samples", "4", "--group_size",
                       "4", "--alpha", "2"))
    [(small, logp_small_old)] = scores  # only the small model is scored
    (large, mask, old_l, adv_l, logp_large_old, seqs), (m_s, _, old_s, adv_s, _, _) = updates
    assert m_s is small and large is not small and logp_large_old is not None
    base_large = cg.TokenLogprobs(cg.load_model(based["large"], torch.float32, "cpu", False))
    assert torch.allclose(cg.old_logprobs(base_large, seqs, cg.Args())[0], logp_large_old, atol=1e-5)  # before its step
    assert torch.equal(old_l, logp_small_old) and torch.equal(old_s, logp_small_old)  # all M rows, in order
    kd = cg.kd_reward(logp_large_old, logp_small_old, mask, 16)  # (B*G,)
    row = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][1]
    assert row["small/kd_reward"] == pytest.approx(kd.mean().item(), abs=1e-6)
    B, G = 2, 4
    kd_centred = (kd.view(B, G) - kd.view(B, G).mean(1, keepdim=True)).view(-1)
    reward_part = adv_s - 2 * kd_centred  # A~ = r~ - mean(r~) with r~ = r + 2 kd leaves r - mean(r) ...
    for rp, al in zip(reward_part.view(B, G), adv_l.view(B, G)):  # ... which the large step scaled by 1/std (Eq. 3)
        scale = rp.norm() / al.norm() if al.norm() > 0 else 0.0
        assert torch.allclose(rp, al * scale, atol=1e-5)


def spy_losses(monkeypatch):
    """Record every policy_loss call of a run with the model that made it ('small' / 'large', told apart by width)."""
    calls, current = [], []
    real_update, real_loss = cg.update, cg.policy_loss

    def spy_update(scorer, *args, **kw):
        current.append("small" if cg.lm_of(scorer).config.hidden_size == tiny_world.CONFIGS["small"]["hidden_size"]
                       else "large")
        return real_update(scorer, *args, **kw)

    def spy_loss(logp, logp_old, advantages, mask, max_len, clip_eps, logp_ref=None, beta=0.0):
        calls.append(dict(model=current[-1], ratio=torch.exp(logp - logp_old).detach(), mask=mask.clone(),
                          max_len=max_len, advantages=advantages.clone(), logp_ref=logp_ref, beta=beta))
        return real_loss(logp, logp_old, advantages, mask, max_len, clip_eps, logp_ref, beta)
    monkeypatch.setattr(cg, "update", spy_update)
    monkeypatch.setattr(cg, "policy_loss", spy_loss)
    return calls


@pytest.mark.parametrize("hint_ratio", ["small", "large", "ignore"])
@pytest.mark.parametrize("M", [8, 4], ids=["M>G", "M=G"])
def test_hints_and_the_ratio_on_them(world, tmp_path, monkeypatch, hint_ratio, M):
    """T = 4 hint tokens from the (random) large model, which writes all 4 of them. The small model's ratio is 1 on
    its own tokens before its step, whatever --hint_ratio; on the hint tokens it is 1 with small (Eq. 5), pi_phi /
    pi_theta_old with large (Eq. 8 i), and they leave the loss with ignore while the model still sees them. With
    --large_hint_ratio behaviour the large model's ratio on its own hint tokens is 1."""
    calls = spy_losses(monkeypatch)
    cg.main(tiny_argv(world, tmp_path, "--hint_tokens", "4", "--hint_ratio", hint_ratio, "--eval_size", "0",
                      "--max_steps", "1", "--num_samples", str(M), "--hint_share", "1",
                      "--large_hint_ratio", "behaviour"))
    row = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][1]
    assert row["small/hint_length"] == 4 and row["small/completion_length"] <= 16
    small = [c for c in calls if c["model"] == "small"]
    large = [c for c in calls if c["model"] == "large"]
    assert small and large
    for c in small:
        own = c["ratio"][:, 4:][c["mask"][:, 4:].bool()]
        assert torch.allclose(own, torch.ones_like(own), atol=1e-5)  # its own tokens, before its step
        hint = c["ratio"][:, :4]
        if hint_ratio == "ignore":
            assert c["mask"][:, :4].sum() == 0  # out of the loss (and so out of ratio_mean)
        elif hint_ratio == "small":
            assert torch.allclose(hint, torch.ones_like(hint), atol=1e-5)
        else:
            assert (hint - 1).abs().max() > 1e-2  # pi_phi / pi_theta_old: two different models
    if hint_ratio != "large":
        assert row["small/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    for c in large:
        hint = c["ratio"][:, :4]
        assert torch.allclose(hint, torch.ones_like(hint), atol=1e-5)  # behaviour: against itself
        assert (c["ratio"][:, 4:] - 1).abs().max() > 1e-2  # after the hint: against pi_phi_old, Eq. (10)


@pytest.mark.parametrize("M", [8, 4], ids=["M>G", "M=G"])
def test_the_large_models_ratio_on_hint_tokens_is_the_literal_eq_10_by_default(world, tmp_path, monkeypatch, M):
    """Eq. (10) as printed: pi_theta / pi_phi_old on every token, the hints the large model wrote included."""
    calls = spy_losses(monkeypatch)
    cg.main(tiny_argv(world, tmp_path, "--hint_tokens", "4", "--eval_size", "0", "--max_steps", "1",
                      "--num_samples", str(M), "--hint_share", "1"))
    assert cg.parse_args([]).large_hint_ratio == "small"
    large = [c for c in calls if c["model"] == "large"]
    assert large and all((c["ratio"][:, :4] - 1).abs().max() > 1e-2 for c in large)  # pi_theta / pi_phi_old


@pytest.mark.parametrize("algo, flags, max_len", [("grpo", [], None), ("grpo", ["--loss_norm", "constant"], 16),
                                                   ("codistill", [], 16), ("kdrl", [], 16)])
def test_the_loss_divides_by_the_normalisation_of_its_equation(world, tmp_path, monkeypatch, algo, flags, max_len):
    calls = spy_losses(monkeypatch)
    cg.main(tiny_argv(world, tmp_path, "--algo", algo, "--eval_size", "0", "--max_steps", "1", *flags))
    assert calls and all(c["max_len"] == max_len for c in calls)


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


def test_rollout_with_hints_starts_with_the_large_models_tokens(world, tiny):
    from transformers import AutoModelForCausalLM
    tok, small = tiny
    large = AutoModelForCausalLM.from_pretrained(world["large"], dtype=torch.float32)
    a = cg.Args(num_samples=3, max_completion_length=10, hint_tokens=4, gen_batch_size=64)
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67"], "boxed", 64, "cpu")
    eos = [tok.eos_token_id]
    torch.manual_seed(0)
    seqs = cg.rollout(small, large, ids, pmask, a, eos, tok.pad_token_id, hints=True)
    comp, mask, hint = seqs["comp"], seqs["mask"], seqs["hint"]
    assert torch.equal(seqs["prompt_ids"], ids.repeat_interleave(3, 0))
    assert comp.shape[0] == 6 and comp.shape[1] <= 10
    assert (hint.sum(1) <= 4).all() and (hint <= mask).all()
    # the hint is what the large model samples under the same seed
    torch.manual_seed(0)
    expected = cg.sample(large, ids.repeat_interleave(3, 0), pmask.repeat_interleave(3, 0), 4, 1.0, eos,
                         tok.pad_token_id, 64)
    for row, h, e in zip(comp, hint, expected):
        n = h.sum().item()
        assert torch.equal(row[:n], e[:n])


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's, without its system turn


@pytest.fixture(scope="session")
def chat(world, tmp_path_factory):
    """The tiny models with a tokenizer given Qwen's ChatML template and its two special tokens (embeddings grown)."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("chat")
    tok = cg.load_tokenizer(world["small"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    for name in ["small", "large"]:
        model = AutoModelForCausalLM.from_pretrained(world[name])
        model.resize_token_embeddings(len(tok))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return dict(world, small=str(root / "small"), large=str(root / "large"))


def test_chat_template_wraps_the_prompt_and_ends_at_the_end_of_turn(chat):
    tok = cg.load_tokenizer(chat["small"])
    ids, mask = cg.encode_prompts(tok, ["What is 1 + 2"], "boxed", 64, "cpu", chat=True)
    assert tok.decode(ids[0][mask[0].bool()]) == ("<|im_start|>user\n" + cg.TEMPLATES["boxed"].format(
        prompt="What is 1 + 2") + "<|im_end|>\n<|im_start|>assistant\n")
    plain, _ = cg.encode_prompts(tok, ["What is 1 + 2"], "boxed", 64, "cpu")
    assert tok.decode(plain[0]) == cg.TEMPLATES["boxed"].format(prompt="What is 1 + 2")  # off: the raw prompt
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert cg.end_of_turn_id(tok) == im_end
    assert cg.eos_ids_of(tok, chat=True) == sorted({tok.eos_token_id, im_end})
    assert cg.eos_ids_of(tok) == [tok.eos_token_id]


def test_a_run_with_the_chat_template(chat, tmp_path, monkeypatch):
    seen = []
    real_sample = cg.sample

    def spy(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_ids, *args, **kw):
        seen.append((prompt_ids, eos_ids))
        return real_sample(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_ids, *args, **kw)
    monkeypatch.setattr(cg, "sample", spy)
    cg.main(tiny_argv(chat, tmp_path, "--small_model", chat["small"], "--large_model", chat["large"], "--max_steps",
                      "1", "--chat_template"))
    tok = cg.load_tokenizer(chat["small"])
    prompt_ids, eos_ids = seen[0]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos_ids
    assert tok.decode(prompt_ids[0]).endswith("<|im_start|>assistant\n")
    assert json.load(open(tmp_path / "args.json"))["chat_template"] is True


def test_chat_template_without_one_in_the_tokenizer_exit_2(world, tmp_path, capsys, no_models):
    tok = cg.load_tokenizer(world["small"])
    tok.chat_template = None  # the tiny world's tokenizer has Qwen's ChatML; a base model's may have none
    tok.save_pretrained(tmp_path / "no_chat")
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_argv(world, tmp_path / "run", "--chat_template", "--small_model", str(tmp_path / "no_chat")))
    assert e.value.code == 2 and "has no chat template" in capsys.readouterr().err


def test_checkpoints_load_with_from_pretrained_alone(world, tmp_path):
    cg.main(tiny_argv(world, tmp_path, "--eval_size", "0", "--save_every", "1"))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for it in [1, 2]:
        for n in ["small", "large"]:
            path = tmp_path / f"checkpoint-{it}" / n
            AutoModelForCausalLM.from_pretrained(path)
            assert AutoTokenizer.from_pretrained(path).eos_token_id is not None
        assert json.load(open(tmp_path / f"checkpoint-{it}" / "args.json"))["iteration"] == it


def test_hub_generation_settings_change_neither_sampling_nor_checkpoints(based, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig
    src = tmp_path / "instruct"
    model = AutoModelForCausalLM.from_pretrained(based["small"])
    model.generation_config = GenerationConfig(repetition_penalty=1.3, top_k=20, do_sample=True, temperature=0.7,
                                               eos_token_id=model.config.eos_token_id)
    model.save_pretrained(src)
    cg.load_tokenizer(based["small"]).save_pretrained(src)
    loaded = cg.load_model(str(src), torch.float32, "cpu", False)
    tok = cg.load_tokenizer(str(src))
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2"] * 4, "boxed", 64, "cpu")
    torch.manual_seed(0)
    out = loaded.generate(input_ids=ids, attention_mask=pmask, output_scores=True, return_dict_in_generate=True,
                          generation_config=GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                                             max_new_tokens=6, eos_token_id=[tok.eos_token_id],
                                                             pad_token_id=tok.pad_token_id))
    comp = out.sequences[:, ids.shape[1]:]
    m = cg.completion_mask(comp, [tok.eos_token_id]).bool()
    from_generate = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)
    with torch.no_grad():
        ours = cg.token_logprobs(loaded, ids, pmask, comp, m.long(), 1.0, 64)
    assert torch.allclose(ours[m], from_generate[m], atol=1e-4)  # no repetition penalty, no top-k crept in
    cg.main(based_argv(based, tmp_path / "run", "--small_model", str(src), "--max_steps", "1", "--eval_size", "0"))
    saved = GenerationConfig.from_pretrained(tmp_path / "run" / "checkpoint-1" / "small")
    assert (saved.repetition_penalty, saved.top_k, saved.temperature) == (1.3, 20, 0.7)


def test_preset_sets_defaults_and_flags_override():
    a = cg.parse_args(["--preset", "paper-llama", "--num_samples", "16"])
    assert (a.template, a.lr_small, a.group_size, a.num_samples) == ("boxed", 1e-7, 8, 16)
    a = cg.parse_args([])
    assert (a.num_samples, a.group_size, a.max_completion_length, a.lr_small, a.epochs) == (14, 8, 3072, 5e-6, 8)


def test_the_tiny_world_is_built_once_per_setting(tmp_path, monkeypatch):
    first = tiny_world.build(str(tmp_path), seed=0, steps=dict(small=2, large=2))
    calls = []
    monkeypatch.setattr(tiny_world, "warmup", lambda model, *args, **kw: calls.append(1) or model)
    assert tiny_world.build(str(tmp_path), seed=0, steps=dict(small=2, large=2)) == first and calls == []  # cached
    other = tiny_world.build(str(tmp_path), seed=0, steps=dict(small=2, large=3))  # a changed setting: a new entry
    assert other["small"] != first["small"] and calls == [1, 1]
    assert os.path.exists(os.path.join(first["small"], "config.json"))  # the old entry is kept


def test_the_tiny_worlds_problems_have_no_carries_and_its_warm_up_decays_to_zero(world):
    train, test = tiny_world.problems(0)
    assert len(train) == 10_000 and len(test) == 500 and not {r["problem"] for r in train} & {r["problem"] for r in test}
    for r in train[:200]:
        x, y = r["problem"].removeprefix("What is ").split(" + ")
        assert len(x) == len(y) == 4 and r["answer"] == str(int(x) + int(y))
        assert all(int(a) + int(b) <= 9 for a, b in zip(x, y))  # each answer digit: the sum of the two above it
    tok = cg.load_tokenizer(world["small"])
    model = cg.load_model(world["small"], torch.float32, "cpu", False)
    lrs = []
    real_step = torch.optim.AdamW.step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", lambda opt, *a, **k: lrs.append(opt.param_groups[0]["lr"]) or
                   real_step(opt, *a, **k))
        tiny_world.warmup(model, tok, train[:50], 40, 1e-3, seed=0, batch_size=4)
    assert lrs[0] == pytest.approx(1e-3 / 2) and max(lrs) == pytest.approx(1e-3)  # 5% ramp: 2 steps
    assert lrs[-1] < 1e-3 * 0.01 and lrs == lrs[:2] + sorted(lrs[2:], reverse=True)  # cosine down to ~0


def test_the_warm_up_reaches_its_fixed_point_the_spread_targets(world):
    """Soft targets with spread s: at the optimum each answer digit is right with probability 1 - 0.9 s and each
    other digit has s / 10 (the world's base models are built to sit there). One problem, trained to convergence."""
    tok = cg.load_tokenizer(world["small"])
    model = cg.load_model(world["small"], torch.float32, "cpu", False)
    row = {"problem": "What is 3066 + 3630", "answer": "6696"}
    tiny_world.warmup(model, tok, [row], 300, 3e-3, seed=0, batch_size=8, spread=0.5)
    text = cg.TEMPLATES["boxed"].format(prompt=row["problem"]) + " \\boxed{"
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = model(ids).logits[0, -1].softmax(-1)
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    assert p[digits[6]].item() == pytest.approx(0.55, abs=0.03)
    assert all(p[d].item() == pytest.approx(0.05, abs=0.02) for d in digits if d != digits[6])


def test_an_interrupted_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def ctrl_c(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(tiny_world, "warmup", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tiny_world.build(str(tmp_path), seed=0, steps=dict(small=2, large=2))
    assert os.listdir(tmp_path) == []


def test_a_killed_build_is_cleaned_up_and_a_damaged_world_built_again(tmp_path, capsys):
    """SIGKILL leaves a build's temporary folder behind: the next build removes it when its process is gone. A
    cached world with a file missing or cut short is built again, with a line saying so."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"tiny-0123456789.tmp{dead.pid}").mkdir()
    (tmp_path / f"tiny-0123456789.tmp{os.getpid()}").mkdir()  # a live process's build stays
    paths = tiny_world.build(str(tmp_path), seed=0, steps=dict(small=0, large=0))
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(os.path.dirname(paths["small"])),
                                                   f"tiny-0123456789.tmp{os.getpid()}"])
    weights = os.path.join(paths["large"], "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    assert tiny_world.build(str(tmp_path), seed=0, steps=dict(small=0, large=0)) == paths
    assert "is damaged (large/model.safetensors" in capsys.readouterr().out
    assert tiny_world.damaged(paths) is None
    os.remove(os.path.join(paths["small"], "tokenizer.json"))
    tiny_world.build(str(tmp_path), seed=0, steps=dict(small=0, large=0))
    assert "is damaged (no small/tokenizer.json)" in capsys.readouterr().out


def expected_reward(model_dir, rows, n=256):
    """Mean accuracy of n sampled completions per problem (temperature 1): the reward on the model's own rollouts."""
    tok = cg.load_tokenizer(model_dir)
    model = cg.load_model(model_dir, torch.float32, "cpu", False)
    torch.manual_seed(0)
    problems = [r["problem"] for r in rows for _ in range(n)]
    texts = cg.complete(model, tok, problems, "boxed", 16, 64, cg.eos_ids_of(tok, model), 512, temperature=1.0)
    return statistics.mean(cg.grade_batch(texts, [r["answer"] for r in rows for _ in range(n)], "boxed")())


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


# ---------------------------------------------------------------------------------------------------------------
# The paper as written: fp32 masters, hints early, the baselines' defaults, the forms of the KD signal


def test_bf16_compute_keeps_fp32_masters_and_a_tiny_step_moves_every_weight(based, tmp_path, monkeypatch):
    """--dtype bfloat16 computes in bf16, but the weights and AdamW states stay fp32: one step at lr 1e-7 changes
    essentially every weight that had a gradient (stepping bf16 weights, about 0.1% did), and the checkpoint holds
    exactly what the masters hold."""
    seen, grads = {}, {}
    real_train, real_step = cg.train, torch.optim.AdamW.step

    def spy_train(a):
        seen["models"] = real_train(a)
        return seen["models"]

    def spy_step(opt, *args, **kw):  # which weights had a gradient, and their dtype, as the optimizer saw them
        for group in opt.param_groups:
            for p in group["params"]:
                grads[id(p)] = (p.dtype, None if p.grad is None else (p.grad != 0).clone(), p.detach().clone())
        return real_step(opt, *args, **kw)
    monkeypatch.setattr(cg, "train", spy_train)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    cg.main(based_argv(based, tmp_path, "--algo", "grpo", "--dtype", "bfloat16", "--lr_small", "1e-7", "--max_steps",
                       "1", "--eval_size", "0", "--num_samples", "8"))
    model = seen["models"]["small"]
    had, moved = 0, 0
    for p in model.parameters():
        dtype, nonzero, before = grads[id(p)]
        assert dtype == torch.float32 and nonzero is not None
        had += nonzero.sum().item()
        moved += ((p.detach() != before) & nonzero).sum().item()
    assert had > 0.5 * sum(p.numel() for p in model.parameters()) and moved > 0.99 * had, (had, moved)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "checkpoint-1" / "policy" / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert saved[name].dtype == torch.float32 and torch.equal(saved[name], tensor), name


def test_hints_last_for_their_share_of_the_planned_run(based, tmp_path):
    """Hints (T > 0) in the first --hint_share of the iterations: by default 1/8, the paper's first epoch of 8."""
    def hinted(out, *flags):
        cg.main(based_argv(based, out, "--hint_tokens", "3", "--eval_size", "0", *flags))
        return [r["iteration"] for r in map(json.loads, open(out / "metrics.jsonl")) if "small/hint_length" in r]
    assert hinted(tmp_path / "a", "--max_steps", "8") == [1]
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


@pytest.mark.parametrize("form", ["reward", "reward_eq4", "loss", "token"])
def test_each_form_of_the_kd_signal_reaches_the_small_step(based, tmp_path, monkeypatch, form):
    """--kd_form: Eq. (6) in the reward (the paper), Eq. (4)'s estimator in the reward (Fig. 9), Eq. (2)'s KL term in
    the loss with pi_ref = pi_theta_old (Sec. 3.1), or each token's log-ratio in its advantage. rollouts.jsonl holds
    r, the KD term, r~ and A~ of each completion and its per-token log-ratios: recompute each form from them."""
    calls = spy_losses(monkeypatch)
    cg.main(based_argv(based, tmp_path, "--kd_form", form, "--eval_size", "0", "--alpha", "2"))
    rows = [json.loads(l) for l in open(tmp_path / "rollouts.jsonl")]
    assert {r["kd_form"] for r in rows} == {form} and [r["iteration"] for r in rows] == [1, 1, 2, 2]
    for row in rows:
        for c in row["completions"]:
            d = torch.tensor(c["kd_tokens"])
            assert len(c["tokens"]) == len(d) > 0
            eq6, eq4 = d.sum().item() / 16, -(d.exp() - d - 1).sum().item() / 16
            assert c["kd"] == pytest.approx(eq4 if form == "reward_eq4" else eq6, abs=1e-3)
            assert c["r_kd"] == pytest.approx(c["r"] + 2 * c["kd"], abs=1e-5)  # ranks the M (Sec. 3.3)
        kept = [c for c in row["completions"] if c["kept"]]
        paid = [c["r_kd"] if form in ("reward", "reward_eq4") else c["r"] for c in kept]  # what A~ centres
        assert [c["A_kd"] for c in kept] == pytest.approx([x - sum(paid) / len(paid) for x in paid], abs=1e-5)
    small = [c for c in calls if c["model"] == "small"]
    assert len(small) == 2 * 3  # 2 iterations, B*G = 8 rollouts in micro-batches of 3
    for c in small:
        assert c["beta"] == (2.0 if form == "loss" else 0.0) and (c["logp_ref"] is not None) == (form == "loss")
        assert c["advantages"].dim() == (2 if form == "token" else 1)
    large = [c for c in calls if c["model"] == "large"]
    assert large and all(c["beta"] == 0.0 and c["advantages"].dim() == 1 for c in large)  # its step is the same


def test_token_level_advantages_are_the_sequences_plus_each_tokens_log_ratio(based, tmp_path, monkeypatch):
    calls = spy_losses(monkeypatch)
    cg.main(based_argv(based, tmp_path, "--kd_form", "token", "--eval_size", "0", "--max_steps", "1",
                       "--micro_batch_size", "8", "--alpha", "2"))
    [small] = [c for c in calls if c["model"] == "small"]
    [row, _] = [json.loads(l) for l in open(tmp_path / "rollouts.jsonl")]  # the first prompt's M = 8 completions
    expected = [[c["A_kd"] + 2 * d for d in c["kd_tokens"]] for c in row["completions"] if c["kept"]]
    A, mask = small["advantages"][:4], small["mask"][:4].bool()  # (G, L): the first prompt's kept rollouts
    for got in (a[m].tolist() for a, m in zip(A, mask)):  # in some order: match each to one of the expected
        assert any(len(e) == len(got) and all(abs(x - y) < 1e-3 for x, y in zip(e, got)) for e in expected), got


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the flag or the row, status 2, before any model is loaded


@pytest.fixture
def no_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(cg, "load_model", boom)


@pytest.mark.parametrize("flags, message", [
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
])
def test_bad_settings_exit_2(world, tmp_path, capsys, no_models, flags, message):
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_argv(world, tmp_path, *flags))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags", [["--preset", "huge"], ["--algo", "ppo"]])
def test_unknown_preset_or_algo_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        cg.main(flags)
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_dataset_row_without_answer_exit_2(world, tmp_path, capsys, no_models):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "What is 1 + 1", "answer": "2"}\n{"problem": "What is 2 + 2"}\n')
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_argv(world, tmp_path, "--dataset", str(bad)))
    assert e.value.code == 2 and "line 2" in capsys.readouterr().err  # the file's line, 1-based


def test_tokenizers_that_differ_exit_2(world, tmp_path, capsys, no_models):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(world["large"], other)
    tok = cg.load_tokenizer(str(other))
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_argv(world, tmp_path, "--large_model", str(other)))
    assert e.value.code == 2 and "--large_model" in capsys.readouterr().err


def test_command_line_exit_status_and_help():
    script = os.path.join(HERE, "codistill_grpo.py")
    bad = subprocess.run([sys.executable, script, "--group_size", "7"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --group_size")
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert help_.returncode == 0
    for flag, symbol in [("--num_samples", "M:"), ("--group_size", "G:"), ("--max_completion_length", "N:"),
                         ("--hint_tokens", "T:"), ("--alpha", "alpha:"), ("--clip_eps", "eps:")]:
        assert flag in help_.stdout and symbol in help_.stdout


# ---------------------------------------------------------------------------------------------------------------
# Never lose a run: exact resume, atomic checkpoints


def test_the_file_reads_as_the_paper_method_above_the_machinery():
    """The method (the equations with every KD form, rollouts, log-probs, one step, the loop) comes first, in at most
    600 lines; one banner; then machinery; the whole file at most 1,500 lines. No function is longer than 60 lines,
    in any of the project's files. The tiny world is a file of its own, imported only for `tiny:` names, and so are
    the trainer's files (problems, checkpoints, the run folder: trainer_io.py)."""
    import ast
    text = open(os.path.join(HERE, "codistill_grpo.py")).read()
    lines = text.splitlines()
    [banner] = [i + 1 for i, l in enumerate(lines) if l.startswith("# ==") and "machinery" in l]
    defs = {n.name: n.lineno for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert banner <= 600
    for name in ["kd_reward", "kd_reward_eq4", "token_advantages", "downsample", "group_advantages", "policy_loss",
                 "small_step_terms", "rollout", "token_logprobs", "update", "roles", "train"]:
        assert defs[name] < banner, name
    for name in ["grade_batch", "parallelize", "setup", "main"]:
        assert defs[name] > banner, name
    assert "import tiny_world" not in "\n".join(lines[:banner])  # the method never touches the toy
    assert len(lines) <= 1500
    io_defs = {n.name for n in ast.parse(open(os.path.join(HERE, "trainer_io.py")).read()).body
               if isinstance(n, (ast.FunctionDef, ast.ClassDef))}  # the trainer's files, apart from the trainer
    for name in ["load_problems", "save_checkpoint", "find_checkpoint", "check_output_dir", "BadInput"]:
        assert name in io_defs and name not in defs, name
    for path in ["codistill_grpo.py", "trainer_io.py", "tiny_world.py", "eval.py", "bench.py"]:
        tree = ast.parse(open(os.path.join(HERE, path)).read())
        long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                and n.end_lineno - n.lineno + 1 > 60}
        assert not long, path


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


def rows_without_timings(path):
    rows = [json.loads(l) for l in open(path)]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


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


def test_sigkill_while_saving_leaves_the_previous_checkpoint_and_resume_uses_it(based, tmp_path):
    out = tmp_path / "run"
    argv = based_argv(based, out, "--max_steps", "3", "--save_every", "1", "--eval_size", "0")
    script = f"""
import os, signal, sys
sys.path.insert(0, {HERE!r})
import codistill_grpo as cg
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


# ---------------------------------------------------------------------------------------------------------------
# Grading that cannot hurt training


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


# ---------------------------------------------------------------------------------------------------------------
# Numerical guards


def test_policy_loss_stays_finite_for_far_off_policy_tokens():
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    logp_old = torch.tensor([[-1000.0, 500.0]])  # log-ratios of +1000 and -501: exp would overflow
    loss = cg.policy_loss(logp, logp_old, torch.tensor([-1.0]), torch.ones(1, 2), max_len=2, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


def test_a_non_finite_gradient_skips_the_step(tiny):
    import copy
    tok, model0 = tiny
    model = copy.deepcopy(model0)
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2"] * 2, "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok) - 1, (2, 4))
    opt, sched = cg.make_optimizer(model, 1e-2, cg.Args(), total_steps=10)
    stats = cg.update(cg.TokenLogprobs(model), opt, sched, seqs_of(ids, pmask, comp, torch.ones_like(comp)),
                      torch.zeros(2, 4), torch.tensor([float("nan"), 1.0]), cg.Args(max_completion_length=4))
    assert stats["skipped_step"] == 1.0 and not math.isfinite(stats["grad_norm"])
    for p, p0 in zip(model.parameters(), model0.parameters()):
        assert torch.equal(p, p0)


def test_nan_weights_never_reach_a_checkpoint(world, tiny, tmp_path):
    import copy
    tok, model0 = tiny
    model = copy.deepcopy(model0)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    a = cg.Args(output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="non-finite"):
        cg.save_checkpoint({"small": cg.TokenLogprobs(model)}, {}, tok, a, 1)
    assert not (tmp_path / "checkpoint-1").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input around runs: status 2, nothing already saved is touched


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(world, tmp_path):
    out = tmp_path / "run"
    cg.main(tiny_argv(world, out, "--eval_size", "0", "--save_every", "1"))
    return out


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


def test_unwritable_output_folder_exit_2(world, tmp_path, capsys, no_models):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_argv(world, tmp_path / "a_file" / "run"))
    assert e.value.code == 2 and "--output_dir" in capsys.readouterr().err


def test_dataset_with_no_rows_exit_2(world, tmp_path, capsys, no_models):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_argv(world, tmp_path / "run", "--dataset", str(tmp_path / "empty.jsonl")))
    assert e.value.code == 2 and "no rows" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Bad input never costs a run (#14)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def exit_2(argv, capsys, main=None):
    """Run main(argv), which must stop with exit status 2 -> its one error line."""
    with pytest.raises(SystemExit) as e:
        (main or cg.main)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.mark.parametrize("content, message", [
    ('{"problem": "What is 1 + 1", "answer": ["2"]}\n', "line 1: 'answer' must be non-blank text or a number"),
    ('{"problem": "What is 1 + 1", "answer": true}\n', "line 1: 'answer' must be non-blank text or a number"),
    ('{"problem": "What is 1 + 1", "answer": "  "}\n', "line 1: 'answer' must be non-blank text or a number"),
    ('{"problem": 12, "answer": "2"}\n', "line 1: 'problem' must be non-blank text"),
    ('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": 2}\n{"problem": "c", "answer": 3\n',
     "line 4 is not valid JSON"),  # blank lines counted; a damaged line that is not the last one
    ('{"problem": "a", "answer": "1"}\n["a list"]\n', "line 2 is not a JSON object"),
])
def test_a_bad_dataset_row_is_named_by_its_line(world, tmp_path, capsys, no_models, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content + '{"problem": "z", "answer": "0"}\n')
    assert message in exit_2(tiny_argv(world, tmp_path / "run", "--dataset", str(bad)), capsys)


def test_non_utf8_and_json_list_datasets_name_the_line_and_the_row(world, tmp_path, capsys, no_models):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n')
    assert "line 2 is not UTF-8" in exit_2(tiny_argv(world, tmp_path / "r1", "--dataset", str(latin)), capsys)
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps([{"problem": "a", "answer": 1}, {"problem": "b", "answer": None}]))
    assert "row 2: 'answer'" in exit_2(tiny_argv(world, tmp_path / "r2", "--dataset", str(listed)), capsys)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps([{"problem": "a", "answer": 12}, {"problem": "b", "answer": 0.5}]))
    assert cg.load_problems(str(ok)) == [{"problem": "a", "answer": "12"}, {"problem": "b", "answer": "0.5"}]


def test_metrics_rows_stay_valid_json_with_a_non_finite_value(capsys):
    import io
    f = io.StringIO()
    cg.write_row(f, {"iteration": 3, "small/loss": float("nan"), "small/grad_norm": float("inf"), "lr": 1e-4})
    row = json.loads(f.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in the file"))
    assert row == {"iteration": 3, "small/loss": None, "small/grad_norm": None, "lr": 1e-4}
    assert "non-finite small/loss, small/grad_norm" in capsys.readouterr().err


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


def test_output_dir_that_is_a_checkpoint_or_a_missing_reporter_exit_2(world, finished_run, tmp_path, capsys,
                                                                      no_models, monkeypatch):
    before = snapshot(finished_run)
    message = exit_2(["--resume", str(finished_run / "checkpoint-1"), "--output_dir",
                      str(finished_run / "checkpoint-1")], capsys)
    assert "is a checkpoint folder" in message and snapshot(finished_run) == before
    monkeypatch.setattr(cg.importlib.util, "find_spec", lambda name: None)
    assert "the wandb package is not installed" in exit_2(tiny_argv(world, tmp_path / "r", "--report_to", "wandb"),
                                                          capsys)


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


# ===============================================================================================================
# eval.py

@pytest.fixture(scope="session")
def short_run(world, tmp_path_factory):
    """A real two-iteration codistill run of the tiny preset -> its output folder."""
    out = tmp_path_factory.mktemp("run") / "codistill"
    cg.main(tiny_argv(world, out, "--num_samples", "4", "--group_size", "2"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Nothing lost, nothing silently wrong (#23)


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
    assert cg.checked_row({"problem": "p", "answer": 0.00001}, "row 1")["answer"] == "0.00001"
    assert cg.checked_row({"problem": "p", "answer": 1e20}, "row 1")["answer"] == "1" + "0" * 20
    assert cg.checked_row({"problem": "p", "answer": 2.0}, "row 1")["answer"] == "2"
    assert cg.checked_row({"problem": "p", "answer": -12}, "row 1")["answer"] == "-12"
    path = tmp_path / "d.jsonl"
    path.write_text('{"problem": "p", "answer": 0.00001}\n')
    [row] = cg.load_problems(str(path))
    assert cg.accuracy_reward("\\boxed{0.00001}", row["answer"], "boxed") == 1.0


def test_prompts_that_are_cut_are_counted_and_a_length_too_short_for_the_template_refused(world, tmp_path, capsys,
                                                                                          no_models):
    assert "cannot hold the boxed template itself" in exit_2(
        tiny_argv(world, tmp_path / "a", "--max_prompt_length", "5"), capsys)
    data = tmp_path / "long.jsonl"
    rows = [{"problem": "What is 1 + 1" + " and" * (400 if i < 3 else 0), "answer": "2"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AssertionError, match="a model was loaded"):  # no_models: it stops where the models load
        cg.main(tiny_argv(world, tmp_path / "b", "--dataset", str(data)))
    assert "warning: 3 of 8 prompts are longer than --max_prompt_length 64" in capsys.readouterr().out


def test_prompts_cut_are_in_the_first_row(world, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"problem": "What is 1 + 1" + " and" * (400 if i < 3 else 0), "answer": "2"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cg.main(tiny_argv(world, tmp_path / "run", "--dataset", str(data), "--max_steps", "1"))
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["prompts_cut/train"] == 3 and row["prompts_cut/held_out"] == 0


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


def test_no_room_for_a_checkpoint_is_refused_before_training(world, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    assert "one checkpoint takes about" in exit_2(tiny_argv(world, tmp_path), capsys)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_model_folder_without_its_tokenizer_is_named(world, tmp_path, capsys):
    broken = tmp_path / "small"
    shutil.copytree(world["small"], broken)
    (broken / "tokenizer.json").unlink()
    message = exit_2(tiny_argv(world, tmp_path / "run", "--small_model", str(broken)), capsys)
    assert f"model {broken}: its tokenizer is empty" in message
    message = exit_2([str(broken), "--benchmarks", world["test"], "--limit", "2"], capsys, ev.main)
    assert "its tokenizer is empty" in message


def test_a_checkpoint_naming_an_unknown_algo_says_so(finished_run, capsys):
    args = json.load(open(finished_run / "checkpoint-2" / "args.json"))
    (finished_run / "checkpoint-2" / "args.json").write_text(json.dumps(dict(args, algo="ppo")))
    assert "unknown --algo 'ppo'" in exit_2(["--resume", str(finished_run / "checkpoint-2")], capsys)


def test_a_folder_as_dataset_is_refused(world, tmp_path, capsys, no_models):
    assert "is a folder" in exit_2(tiny_argv(world, tmp_path / "r", "--dataset", str(tmp_path)), capsys)
    assert "no such file" in exit_2(tiny_argv(world, tmp_path / "r", "--dataset", "nope.jsonl"), capsys)


@pytest.mark.parametrize("argv, message", [
    (["--json", "/no/such/folder/b.json"], "--json /no/such/folder/b.json: cannot write a file there"),
    (["--plot", "/no/such/folder/b.png"], "--plot"),
    (["--parts", "step"], "--parts step: choose from steps, logprobs, rollouts"),
    (["--lengths", "16,x"], "--lengths"),
    (["--iterations", "0"], "--iterations must be >= 1"),
])
def test_bench_refuses_bad_flags_before_measuring(argv, message, capsys):
    import bench
    t = time.time()
    assert message in exit_2(argv, capsys, bench.main) and time.time() - t < 5


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


def edit_json(path, **changes):
    saved = json.load(open(path))
    saved.update(changes)
    path.write_text(json.dumps({k: v for k, v in saved.items() if v is not None}))


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


def test_cut_short_or_unreadable_data_is_named(world, tmp_path, capsys, no_models):
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answ')  # a dataset's last line cut short
    assert "line 2 is not valid JSON" in exit_2(tiny_argv(world, tmp_path / "r", "--dataset", str(cut)), capsys)
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"problem": "x", "answer": ' + "9" * 5000 + "}\n")
    assert "line 1 is not valid JSON" in exit_2(tiny_argv(world, tmp_path / "r", "--dataset", str(huge)), capsys)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    assert "not JSON that can be read" in exit_2(tiny_argv(world, tmp_path / "r", "--dataset", str(deep)), capsys)


def test_a_cached_world_cut_short_is_built_again(tmp_path, capsys):
    paths = tiny_world.build(str(tmp_path), seed=0, steps=dict(small=0, large=0))
    with open(paths["train"], "r+b") as f:
        f.truncate(10_000)
    tiny_world.build(str(tmp_path), seed=0, steps=dict(small=0, large=0))
    assert "is damaged (train.jsonl has" in capsys.readouterr().out and tiny_world.damaged(paths) is None


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


@pytest.mark.parametrize("make, message", [(lambda p: p.write_text(""), "is a file, not a folder"),
                                           (lambda p: p.symlink_to(p.parent / "nowhere"), "is a link to nowhere")])
def test_an_output_dir_that_is_no_folder_is_named(world, tmp_path, capsys, no_models, make, message):
    make(tmp_path / "out")
    assert message in exit_2(tiny_argv(world, tmp_path / "out"), capsys)


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


def test_bench_keeps_to_its_cache_and_names_bad_models(tmp_path, capsys):
    import bench
    (tmp_path / "afile").write_text("")
    assert "--cache_dir" in exit_2(["--cache_dir", str(tmp_path / "afile"), "--parts", "steps"], capsys, bench.main)
    assert "model /nonexistent" in exit_2(["--cache_dir", str(tmp_path / "c"), "--parts", "rollouts", "--small_model",
                                           "/nonexistent"], capsys, bench.main)
    assert os.listdir(tmp_path / "c") and all(d.startswith(("tiny-", "bench-pair")) for d in os.listdir(tmp_path / "c"))


# ---------------------------------------------------------------------------------------------------------------
# torchrun: DDP and FSDP2 with two CPU processes on gloo


def torchrun(*argv, nproc=2):
    """Run `torchrun --standalone --nproc_per_node=nproc argv...` -> CompletedProcess (output captured)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *argv], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)


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


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_run_codistill(based, tmp_path, fsdp):
    out = tmp_path / "run"
    argv = based_argv(based, out, "--batch_size", "1", "--eval_size", "3", "--hint_tokens", "2", "--hint_share", "0.5",
                      *(["--fsdp"] if fsdp else []))  # 2 ranks x 1 prompt: the 2 problems of `based`
    p = torchrun("codistill_grpo.py", *argv)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]  # one row per iteration: rank 0 writes, once
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["small/test_accuracy"] <= 1.0 for r in rows)
    assert rows[1]["small/hint_length"] > 0 and "large/loss" in rows[2] and "small/hint_length" not in rows[2]
    from transformers import AutoModelForCausalLM
    for name in ["small", "large"]:  # plain Hugging Face folders, loaded without any distributed code
        AutoModelForCausalLM.from_pretrained(out / "checkpoint-2" / name)


def distributed_worker(mode, small, out):
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
    scorer = cg.parallelize(model, a, trained=True, compute_dtype=torch.float32)
    opt = torch.optim.SGD(scorer.parameters(), lr=1.0)  # the step is the gradient itself: its scale shows
    stats = cg.update(scorer, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), seqs_of(*share[:4]),
                      *share[4:], a)
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


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_make_the_one_process_step(based, tmp_path, mode):
    from transformers import AutoModelForCausalLM
    p = torchrun(__file__, "distributed-worker", mode, based["small"], str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt")
    # the same global batch in one process
    tok = cg.load_tokenizer(based["small"])
    model = AutoModelForCausalLM.from_pretrained(based["small"], dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = fixed_batch(tok, model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    a = cg.Args(micro_batch_size=3, max_completion_length=5, max_grad_norm=1e9)
    stats = cg.update(cg.TokenLogprobs(model), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                      seqs_of(*batch[:4]), *batch[4:], a)
    assert got["loss"] == pytest.approx(stats["loss"], abs=1e-6)
    assert got["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-5)
    moved = 0.0
    for n, w in model.named_parameters():  # float tolerance: the ranks' sums are added in another order
        assert torch.allclose(got["weights"][n], w, atol=1e-5), n
        moved = max(moved, (w - before[n]).abs().max().item())
    assert moved > 1e-3  # the step did something, so equal weights mean equal steps
    # the 2-process checkpoint loads in one process, without distributed code, and holds the gathered weights
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1" / "small", dtype=torch.float32)
    for n, w in saved.named_parameters():
        assert torch.equal(w, got["weights"][n]), n
    # its optimizer state is keyed by parameter name, so it loads into another world size
    state = torch.load(tmp_path / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert all(isinstance(k, str) for k in state["optimizers"]["small"]["param_groups"][0]["params"])


def test_a_two_process_run_resumes_in_one_process(based, tmp_path):
    out = tmp_path / "run"
    p = torchrun("codistill_grpo.py", *based_argv(based, out, "--batch_size", "1", "--fsdp", "--max_steps", "1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cg.main(["--output_dir", str(out), "--resume", "--max_steps", "2"])
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and (out / "checkpoint-2" / "small").exists()


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
    monkeypatch.setattr(tiny_world, "build", lambda cache, seed, verbose=True: {
        k: f"{k}:{cache}|{seed}" for k in ["small", "large", "train", "test"]})
    assert ev.model_path("tiny:small", str(tmp_path)) == f"small:{tmp_path}|0"
    assert ev.model_path("tiny:large") == f"large:{cg.Args.cache_dir}|0"
    assert ev.model_path("runs/x/checkpoint-3/small") == "runs/x/checkpoint-3/small"


def test_toy_is_the_tiny_presets_held_out_set_and_a_missing_file_fails_fast():
    assert ev.load_benchmark("toy") == tiny_world.problems(0)[1]
    with pytest.raises(cg.BadInput, match="nope.jsonl: no such file"):
        ev.load_benchmark("nope.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Scoring checkpoints


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


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


# ===============================================================================================================
# bench.py: that it runs and writes its documented figures (its numbers are measured by running it, not here)


def test_bench_runs_and_writes_its_figures(world, tmp_path):
    import bench
    bench.main(["--lengths", "4", "--iterations", "1", "--batch_size", "2", "--logprob_seqs", "2", "--logprob_len",
                "8", "--cache_dir", world["cache"], "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    figures = json.load(open(tmp_path / "b.json"))
    for key in ["step_ratio", "generate_share", "logprob_peak_ratio", "logprob_time_ratio", "logprob_max_abs_diff",
                "rollout_speed_ratio", "machine", "versions", "settings"]:
        assert key in figures
    assert set(figures["step_ratio"]) == {"4"} and figures["step_ratio"]["4"] > 0
    assert figures["logprob_max_abs_diff"] < 1e-4
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


if __name__ == "__main__" and sys.argv[1:2] == ["distributed-worker"]:  # started by torchrun, see torchrun()
    distributed_worker(*sys.argv[2:])
