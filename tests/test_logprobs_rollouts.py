"""Rollouts and log-probs: completion masks, sampling, token log-probs against HF's own computation, one update's
scale and its numerical guards, the precision of weights and compute, the chat template."""
import json
import math

import pytest
import torch

import codistill_grpo as cg
import eval as ev
from conftest import based_argv, one_iteration, seqs_of, step_flags, tiny_argv, write_jsonl


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
        seqs = seqs_of(ids, pmask, comp, cmask)
        cg.update(cg.TokenLogprobs(model), opt, sched, seqs, old, adv, a, **step_flags(seqs))
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    before = torch.cat([p.detach().flatten() for p in model0.parameters()])
    assert not torch.allclose(after[0], before)
    assert torch.allclose(after[0], after[1], atol=1e-6) and torch.allclose(after[0], after[2], atol=1e-6)


def test_an_on_policy_step_needs_no_scoring_pass(tiny):
    """update(own=all tokens) takes pi_old from its own forward pass, detached: the step a scoring pass gives (GRPO's
    one step per batch)."""
    import copy
    tok, model0 = tiny
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67"] * 2, "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok) - 1, (4, 5), generator=torch.Generator().manual_seed(1))
    cmask = torch.ones_like(comp)
    cmask[1, 2:] = 0
    seqs = seqs_of(ids, pmask, comp, cmask)
    a = cg.Args(micro_batch_size=3, max_completion_length=5, max_grad_norm=1e9)
    after, stats = [], []
    for scored in [True, False]:
        model = copy.deepcopy(model0)
        scorer = cg.TokenLogprobs(model)
        old = cg.old_logprobs(scorer, seqs, a)[0] if scored else torch.full(comp.shape, -50.0)  # ignored when own
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        stats.append(cg.update(scorer, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), seqs, old,
                               torch.tensor([1.0, -1.0, 0.5, -0.5]), a, **step_flags(seqs, own=not scored)))
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(after[0], torch.cat([p.detach().flatten() for p in model0.parameters()]))
    assert torch.allclose(after[0], after[1], atol=1e-6)
    assert stats[1]["ratio_mean"] == 1.0 and stats[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_own_tokens_take_the_model_itself_as_pi_old_and_the_others_logp_old(tiny):
    """The large model's own hint tokens (--large_hint_ratio behaviour): on the tokens of own the ratio is against
    the model before the step, elsewhere against logp_old. A logp_old far off on own tokens changes nothing; the
    same logp_old on the other tokens changes the step."""
    import copy
    tok, model0 = tiny
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67", "What is 3 + 4"], "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok) - 1, (3, 5), generator=torch.Generator().manual_seed(2))
    seqs = seqs_of(ids, pmask, comp, torch.ones_like(comp))
    a = cg.Args(micro_batch_size=2, max_completion_length=5, max_grad_norm=1e9)
    own = torch.zeros(3, 5, dtype=torch.bool)
    own[:, :2] = True  # the first two tokens of each
    true_old = cg.old_logprobs(cg.TokenLogprobs(model0), seqs, a)[0]
    far = true_old.clone()
    far[:, :2] -= 3.0  # far off on own tokens only
    after = []
    for old, flags in [(true_old, step_flags(seqs)), (far, dict(step_flags(seqs), own=own)),
                       (far, step_flags(seqs))]:
        model = copy.deepcopy(model0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        cg.update(cg.TokenLogprobs(model), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), seqs, old,
                  torch.tensor([1.0, -1.0, 0.5]), a, **flags)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(after[0], after[1], atol=1e-6) and not torch.allclose(after[0], after[2], atol=1e-4)


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
        seqs = seqs_of(ids, pmask, comp, cmask)
        cg.update(cg.TokenLogprobs(model), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), seqs, old,
                  torch.tensor([1.0, -1.0]), a, **step_flags(seqs))
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


def test_a_run_with_the_chat_template(chat, tmp_path):
    run, _, it = one_iteration(tiny_argv(chat, tmp_path, "--small_model", chat["small"], "--large_model",
                                         chat["large"], "--chat_template"))
    tok = cg.load_tokenizer(chat["small"])
    assert tok.convert_tokens_to_ids("<|im_end|>") in run.eos_ids
    assert tok.decode(it.rollouts["prompt_ids"][0]).endswith("<|im_start|>assistant\n")
    assert json.load(open(tmp_path / "args.json"))["chat_template"] is True


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


def test_bf16_compute_keeps_fp32_masters_and_a_tiny_step_moves_every_weight(based, tmp_path, monkeypatch):
    """--dtype bfloat16 computes in bf16, but the weights and AdamW states stay fp32: one step at lr 1e-7 changes
    essentially every weight that had a gradient (stepping bf16 weights, about 0.1% did), and the checkpoint holds
    exactly what the masters hold."""
    grads = {}
    real_step = torch.optim.AdamW.step

    def spy_step(opt, *args, **kw):  # which weights had a gradient, and their dtype, as the optimizer saw them
        for group in opt.param_groups:
            for p in group["params"]:
                grads[id(p)] = (p.dtype, None if p.grad is None else (p.grad != 0).clone(), p.detach().clone())
        return real_step(opt, *args, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    run = cg.train(cg.parse_args(based_argv(based, tmp_path, "--algo", "grpo", "--dtype", "bfloat16", "--lr_small",
                                            "1e-7", "--max_steps", "1", "--eval_size", "0", "--num_samples", "8")))
    model = run.models["small"].lm
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


def test_a_non_finite_gradient_skips_the_step(tiny):
    import copy
    tok, model0 = tiny
    model = copy.deepcopy(model0)
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2"] * 2, "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok) - 1, (2, 4))
    opt, sched = cg.make_optimizer(model, 1e-2, cg.Args(), total_steps=10)
    seqs = seqs_of(ids, pmask, comp, torch.ones_like(comp))
    stats = cg.update(cg.TokenLogprobs(model), opt, sched, seqs, torch.zeros(2, 4), torch.tensor([float("nan"), 1.0]),
                      cg.Args(max_completion_length=4), **step_flags(seqs))
    assert stats["skipped_step"] == 1.0 and not math.isfinite(stats["grad_norm"])
    for p, p0 in zip(model.parameters(), model0.parameters()):
        assert torch.equal(p, p0)


# ---------------------------------------------------------------------------------------------------------------
# One compute precision: decoding from a copy in the compute dtype, the head in fp32, every path alike


def cache_dtypes(model, tok):
    """The dtypes of the keys and values a generate() call of the model leaves in its KV cache."""
    ids, mask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67"], "boxed", 64, "cpu")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return {t.dtype for layer in cache.layers for t in (layer.keys, layer.values)}


def test_under_bf16_rollouts_decode_from_a_bf16_copy_that_a_step_refreshes(based, tmp_path):
    """--dtype bfloat16: generate() runs a copy of each model in bf16, so its KV cache is bf16 throughout (autocast
    over the fp32 masters leaves the keys in fp32: RoPE promotes them); after the model's step the copy is stale,
    and sampler_of refreshes it to the masters cast to bf16. In one fp32 process the sampler is the model itself."""
    run, _, it = one_iteration(based_argv(based, tmp_path / "bf16", "--dtype", "bfloat16", "--eval_size", "0"))
    small = run.models["small"]
    assert small.sampler is not small.lm and {p.dtype for p in small.lm.parameters()} == {torch.float32}
    assert small.stale  # it stepped after decoding this iteration's rollouts
    sampler = cg.sampler_of(small)
    assert not small.stale and cache_dtypes(sampler, run.tokenizer) == {torch.bfloat16}
    masters = dict(small.lm.named_parameters())
    for name, w in sampler.named_parameters():
        assert w.dtype == torch.bfloat16 and torch.equal(w, masters[name].detach().to(torch.bfloat16)), name
    fp32, _, _ = one_iteration(based_argv(based, tmp_path / "fp32", "--eval_size", "0"))
    assert fp32.models["small"].sampler is fp32.models["small"].lm and not fp32.models["small"].stale


def test_the_log_prob_head_is_fp32_under_bf16_compute(tiny):
    """Under --dtype bfloat16 the decoder runs in bf16 (autocast) and the output head and log-softmax in fp32: the
    log-probs are those of an fp32 head on the decoder's hidden states, not of logits rounded to bf16."""
    tok, model = tiny
    ids, pmask = cg.encode_prompts(tok, ["What is 1 + 2", "What is 45 + 67"], "boxed", 64, "cpu")
    comp = torch.randint(1, len(tok) - 1, (2, 6), generator=torch.Generator().manual_seed(4))
    cmask = torch.ones_like(comp)
    with torch.no_grad():
        ours = cg.TokenLogprobs(model, torch.bfloat16)(ids, pmask, comp, cmask, 1.0, 5)[0]  # chunks of 5 tokens
        attn = torch.cat([pmask, cmask], 1)
        with torch.autocast("cpu", torch.bfloat16):
            hidden = model.get_decoder()(input_ids=torch.cat([ids, comp], 1), attention_mask=attn,
                                         position_ids=(attn.cumsum(1) - 1).clamp(min=0)).last_hidden_state
            rounded = model.get_output_embeddings()(hidden[:, ids.shape[1] - 1:-1])  # bf16 logits
        head = hidden[:, ids.shape[1] - 1:-1].float() @ model.get_output_embeddings().weight.float().T  # fp32
    gather = lambda logits: logits.float().log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)
    assert rounded.dtype == torch.bfloat16
    assert torch.allclose(ours, gather(head), atol=1e-5)
    assert (ours - gather(rounded)).abs().max() > 1e-4  # what a bf16 head would have given instead


def test_eval_decodes_a_checkpoint_as_the_trainers_held_out_evaluation(based, tmp_path):
    """eval.py loads a checkpoint in its run's --dtype and decodes in its batches: the same greedy texts as the
    trainer's held-out accuracy (its bf16 sampler) for the same problems."""
    out = tmp_path / "run"
    run = cg.train(cg.parse_args(based_argv(based, out, "--dtype", "bfloat16", "--eval_temperature", "0",
                                            "--max_steps", "1", "--eval_size", "8")))
    rows = run.eval_rows
    trainer = cg.complete(cg.sampler_of(run.models["small"]), run.tokenizer, [r["problem"] for r in rows], "boxed",
                          16, 64, run.eos_ids, run.args.gen_batch_size)
    bench_file = write_jsonl(tmp_path / "held_out.jsonl", rows)
    ev.main([str(out / "checkpoint-1" / "small"), "--benchmarks", bench_file, "--out", str(tmp_path / "s.json")])
    scored = json.load(open(tmp_path / "s.json"))["models"]
    assert scored["settings"]["dtype"] == "bfloat16" and scored["settings"]["temperature"] == 0
    assert [r["completion"] for r in scored["results"]] == trainer


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens(tiny):
    """--compile_decode: a static KV cache and a compiled decoding step (30 s to compile here) give the tokens eager
    generate gives, greedy and sampled from the same seed."""
    tok, model = tiny
    problems = [f"What is {1000 + 37 * i} + {2000 + 11 * i}" for i in range(16)]
    eager = cg.complete(model, tok, problems, "boxed", 12, 64, [tok.eos_token_id], 16)
    assert cg.complete(model, tok, problems, "boxed", 12, 64, [tok.eos_token_id], 16, compiled=True) == eager
    ids, mask = cg.encode_prompts(tok, problems, "boxed", 64, "cpu")
    sampled = []
    for compiled in [False, True]:
        torch.manual_seed(3)
        sampled.append(cg.sample(model, ids, mask, 12, 1.0, [tok.eos_token_id], tok.pad_token_id, 16, compiled, 76))
    assert torch.equal(*sampled)
