"""Sampler and log-probs (cello.py section 3) on tiny random Llama models built from a config.

Run: python -m pytest -q tests/test_sampling.py
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cello

torch.set_num_threads(1)
EOS, PAD = 1, 0


def tiny_llama(seed=0, vocab=61, attn="sdpa"):
    """A 2-layer Llama with peaked (not near-uniform) next-token distributions, so greedy has no near-ties."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def random_tokens(lengths, seed, vocab=61):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


PROMPTS = random_tokens([7, 13, 2, 10], seed=1)  # different lengths: left padding inside sample


def padded(rows):
    out = torch.zeros((len(rows), max(len(r) for r in rows)))
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def test_left_and_right_padding_exact():
    ids, mask, positions = cello.left_pad([[5, 6, 7], [8]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and mask.dtype == torch.long
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]  # each real token at its unpadded position
    values, real = cello.right_pad([[5, 6, 7], [8], []], fill=9)
    assert values.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]] and values.dtype == torch.long
    assert real.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    values, real = cello.right_pad([[], []], dtype=torch.float32)  # still one column: shapes stay [B, 1]
    assert values.tolist() == [[0.0], [0.0]] and values.dtype == torch.float32 and not real.any()


def test_greedy_equals_generate_token_for_token(model):
    ids, mask, _ = cello.left_pad(PROMPTS, PAD, "cpu")
    new = 20
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                               eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:].tolist()
    # a token the greedy run really produces serves as EOS for the second comparison, so rows stop early
    eos = generated[0][5]
    generated_eos = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                   eos_token_id=eos, pad_token_id=PAD)[:, ids.shape[1]:].tolist()
    for eos_id, expected in ((EOS, generated), (eos, generated_eos)):
        out = cello.sample(model, PROMPTS, 2, new, stop_ids=eos_id, pad_id=PAD, temperature=0)
        for r, response in enumerate(out["responses"]):
            want = expected[r // 2]
            if eos_id in want:
                want = want[:want.index(eos_id) + 1]
            assert response == want
            assert out["finished"][r] == (eos_id in want)
    assert len({len(r) for r in out["responses"]}) > 1  # rows really stopped at different steps


def test_sampling_records_no_autograd_graph_even_when_the_caller_has_gradients_on(model):
    # bench_core.py and check_gpu.py call sample without torch.no_grad(); a graph over every decode
    # step would cost time and keep every step's activations alive
    grad_modes = []
    hook = model.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    try:
        with torch.enable_grad():
            cello.sample(model, PROMPTS, 2, 5, stop_ids=-1, pad_id=PAD, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(grad_modes) == len(PROMPTS) + 4 and not any(grad_modes)  # 4 prefills, then 4 decode steps


def test_a_row_stops_at_any_of_several_stop_ids_as_generate_does(model, tmp_path):
    ids, mask, _ = cello.left_pad(PROMPTS, PAD, "cpu")
    free = cello.sample(model, PROMPTS, 1, 15, stop_ids=-1, pad_id=PAD, temperature=0)["responses"]
    first, second = free[0][3], free[2][5]  # tokens rows 0 and 2 really produce
    assert first != second
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False,
                               eos_token_id=[first, second], pad_token_id=PAD)[:, ids.shape[1]:].tolist()
    out = cello.sample(model, PROMPTS, 1, 15, stop_ids=[first, second], pad_id=PAD, temperature=0)
    for want, response in zip(generated, out["responses"]):
        ends = [i for i, t in enumerate(want) if t in (first, second)]
        assert response == (want[:ends[0] + 1] if ends else want)
    assert out["responses"][0][-1] == first and out["responses"][2][-1] == second
    # a model folder's stop ids: the tokenizer's EOS and every EOS its generation config lists (Qwen2.5-Instruct)
    model.generation_config.eos_token_id = [7, 3]
    model.save_pretrained(tmp_path)

    class Tokenizer:
        eos_token_id = 5
    assert cello.stop_token_ids(str(tmp_path), Tokenizer()) == [3, 5, 7]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')  # one id, not a list (Llama's)
    assert cello.stop_token_ids(str(tmp_path), Tokenizer()) == [5, 7]
    (tmp_path / "generation_config.json").write_text('{"bos_token_id": 2}')  # no EOS listed: the tokenizer's
    assert cello.stop_token_ids(str(tmp_path), Tokenizer()) == [5]
    (tmp_path / "generation_config.json").write_text('[7]')  # JSON, but not an object: one line, no traceback
    with pytest.raises(SystemExit, match="generation_config.json is not a JSON object"):
        cello.stop_token_ids(str(tmp_path), Tokenizer())
    model.generation_config.eos_token_id = EOS


def test_eos_stops_a_row_and_is_included_and_max_new_tokens_is_respected(model):
    free = cello.sample(model, PROMPTS, 1, 15, stop_ids=-1, pad_id=PAD, temperature=0)["responses"]
    assert all(len(r) == 15 for r in free)
    eos = free[1][4]  # row 1 produces this token at step 4 (maybe earlier too)
    out = cello.sample(model, PROMPTS, 1, 15, stop_ids=eos, pad_id=PAD, temperature=0)
    for full, response, finished in zip(free, out["responses"], out["finished"]):
        if eos in full:
            assert response == full[:full.index(eos) + 1] and finished
        else:
            assert response == full and not finished
    assert len(out["responses"][1]) <= 5 and out["responses"][1][-1] == eos
    # a stop token drawn as the last token the budget allows ends a finished response, not a cut one
    at = max(k for k in range(15) if free[1].index(free[1][k]) == k)  # the last step that draws a new token
    stop = free[1][at]
    last = cello.sample(model, PROMPTS, 1, at + 1, stop_ids=stop, pad_id=PAD, temperature=0)
    assert last["responses"][1] == free[1][:at + 1] and last["finished"][1]
    short = cello.sample(model, PROMPTS, 3, 3, stop_ids=-1, pad_id=PAD, temperature=1.0)
    assert [len(r) for r in short["responses"]] == [3] * 12 and short["finished"] == [False] * 12
    assert cello.sample(model, PROMPTS, 2, 0, stop_ids=EOS, pad_id=PAD)["responses"] == [[]] * 8


def test_a_model_with_non_finite_logits_is_a_clear_error():
    broken = tiny_llama()
    with torch.no_grad():
        broken.lm_head.weight[3, 0] = float("inf")  # inf * 0 and inf - inf: NaN logits
        broken.lm_head.weight[3, 1] = -float("inf")
    with pytest.raises(ValueError, match="the model's logits are not finite"):
        cello.sample(broken, PROMPTS, 2, 4, stop_ids=EOS, pad_id=PAD, temperature=1.0)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    def run(seed):
        return cello.sample(model, PROMPTS, 3, 12, stop_ids=EOS, pad_id=PAD, temperature=1.0, top_p=0.95,
                            generator=torch.Generator().manual_seed(seed))
    a, b, c = run(5), run(5), run(6)
    assert a == b
    assert a["responses"] != c["responses"]
    assert len({tuple(r) for r in a["responses"]}) > 1  # the G samples of a prompt differ from each other


def test_tiny_top_p_is_greedy(model):
    greedy = cello.sample(model, PROMPTS, 1, 10, stop_ids=EOS, pad_id=PAD, temperature=0)
    nucleus = cello.sample(model, PROMPTS, 1, 10, stop_ids=EOS, pad_id=PAD, temperature=0.7, top_p=1e-6,
                           generator=torch.Generator().manual_seed(0))
    assert nucleus["responses"] == greedy["responses"]


@pytest.mark.parametrize("top_p,expected", [(1.0, [0.5, 0.0, 0.3, 0.2, 0.0]),
                                             (0.75, [0.625, 0.0, 0.375, 0.0, 0.0])])
def test_draws_follow_the_probabilities_and_never_pick_a_zero_one(top_p, expected):
    """20,000 draws from known probabilities (top-p 0.75 keeps 0.5 and 0.3, renormalised): each frequency
    within 0.015 (over 4 standard deviations of a binomial share), tokens of probability 0 never."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    logits = probs.log().expand(20000, -1).clone()
    tokens, logprobs = cello._next_token(logits, 1.0, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5) / len(tokens)
    assert freq[1] == 0 and freq[4] == 0 and (top_p == 1.0 or freq[3] == 0)
    assert torch.allclose(freq, torch.tensor(expected), atol=0.015), freq
    assert torch.allclose(logprobs, probs.log()[tokens])  # log-probs stay those of the full distribution


def test_nucleus_drops_a_token_whose_mass_before_reaches_top_p_exactly():
    """Sorted, the probabilities are 0.5, 0.3125, 0.1875 (exact in binary): the mass before 0.1875 is
    exactly top_p = 0.8125, so it is out of the nucleus (kept: tokens until their mass reaches top_p)."""
    probs = torch.tensor([0.1875, 0.5, 0.3125])
    tokens, _ = cello._next_token(probs.log().expand(4000, -1).clone(), 1.0, 0.8125, torch.Generator().manual_seed(0))
    assert torch.bincount(tokens, minlength=3).tolist() == [0, 2487, 1513]


@pytest.mark.parametrize("r, token", [(0.0, 2), (1 - 2 ** -53, 1)])
def test_inverse_cdf_at_the_ends_of_the_uniform_draw(r, token, monkeypatch):
    """u = (1 - r) * total with r in [0, 1): r = 0 gives u = total, the last token of nonzero probability
    (never the zero-probability one after it, nor an index past the vocabulary); r near 1 gives the first."""
    logits = torch.tensor([[0.0, 0.5, 0.5, 0.0]]).log()
    monkeypatch.setattr(cello.torch, "rand", lambda *a, **k: torch.full((1, 1), r, dtype=torch.float64))
    assert cello._next_token(logits, 1.0, 1.0, None)[0].tolist() == [token]


def test_a_low_temperature_draws_and_scores_under_that_temperature():
    """Odds 1 : 3 at T = 0.25 become 1 : 81: token 0 is drawn about once in 82 (not 1 in 4, the T = 1 draw;
    not never, greedy's), and the log-probs are log(1/82) and log(81/82), not greedy's T = 1 values."""
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(8200, -1).clone()
    tokens, logprobs = cello._next_token(logits, 0.25, 1.0, torch.Generator().manual_seed(0))
    assert 70 <= (tokens == 0).sum() <= 130  # 100 expected (sd 10); T = 1 would draw ~2,050, greedy 0
    expected = torch.tensor([math.log(1 / 82), math.log(81 / 82)])[tokens]
    assert torch.allclose(logprobs, expected, atol=1e-6, rtol=0)


def test_top_p_1_keeps_the_tokens_behind_a_mass_that_rounds_to_1_in_float32(monkeypatch):
    """p = [1 - 1.9e-13, 9.4e-14, 9.4e-14]: in float32 the first is 1.0, so the mass before the other two is
    1.0 too. top_p = 1 is no nucleus at all: they stay drawable, and u = total (r = 0) draws the last one."""
    logits = torch.tensor([[0.0, -30.0, -30.0]])
    monkeypatch.setattr(cello.torch, "rand", lambda *a, **k: torch.zeros((1, 1), dtype=torch.float64))
    assert cello._next_token(logits, 1.0, 1.0, None)[0].tolist() == [2]


def test_tokens_below_float32_resolution_behind_a_likely_one_are_drawn():
    """Token 0 has probability 0.9, then 2^22 tokens 2.4e-8 each (0.1 in all): less than half the
    float32 spacing near 0.9, so a float32 cdf rounds most of their intervals to width 0 and they
    could never be drawn. The float64 draw reaches them; their share of the draws stays ~0.1."""
    tail = 2 ** 22
    logits = torch.full((1, tail + 1), math.log(0.1 / tail))
    logits[0, 0] = math.log(0.9)
    cdf32 = logits.log_softmax(-1).exp().cumsum(-1)[0]  # what a float32 draw would search
    width_in_float32 = torch.cat([cdf32[:1], cdf32[1:] - cdf32[:-1]])
    draws = [cello._next_token(logits.expand(5, -1), 1.0, 1.0, torch.Generator().manual_seed(seed))[0]
             for seed in range(20)]
    tokens = torch.cat(draws)
    drawn_tail = tokens[tokens > 0]
    assert 3 <= len(drawn_tail) <= 25  # 100 draws, 10 expected
    assert (width_in_float32[drawn_tail] == 0).sum() >= 2  # tokens a float32 draw could never pick


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.8), (0, 1.0)])
def test_sampled_logprobs_equal_recomputed_logprobs(model, temperature, top_p):
    out = cello.sample(model, PROMPTS, 3, 12, stop_ids=5, pad_id=PAD, temperature=temperature, top_p=top_p,
                       generator=torch.Generator().manual_seed(11))
    sampled = padded(out["logprobs"])
    with torch.no_grad():
        for shared in (True, False):
            logprobs, mask = cello.response_logprobs(model, PROMPTS, out["responses"], temperature=temperature,
                                                     shared_prompt=shared)
            assert mask.sum() == sum(len(r) for r in out["responses"])
            # decoding sums in another order than one forward: float32 noise reached 1.1e-5 in some seeds
            assert torch.allclose(logprobs, sampled, atol=5e-5, rtol=0)
    assert (sampled < 0).any()


def naive_token_logprobs(model, ids, mask, temperature):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float() / temperature
    return logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, :-1] * mask[:, 1:]


def grads_of(model, fn):
    model.zero_grad()
    fn().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def assert_grads_close(a, b):
    """Parameter gradients agree to |a - b| <= max(1e-5, 2e-6 max|b|) + 1e-4 |b| elementwise: float32 sums
    in another order (the shared-prompt path sums G responses' gradients through one prompt), whose
    rounding scales with the largest terms of the tensor, not with each element."""
    assert a.keys() == b.keys()
    for name in a:
        atol = max(1e-5, 2e-6 * b[name].abs().max().item())
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), (name, (a[name] - b[name]).abs().max())
    assert max(g.abs().max() for g in a.values()) > 1e-2  # the gradients are not trivially zero


@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_chunked_logprobs_equal_naive_values_and_gradients(model, chunk_size):
    seqs = random_tokens([9, 4, 12], seed=3)
    weights = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    for ids, mask, _ in (cello.left_pad(seqs, PAD, "cpu"),
                         (padded(seqs).long(), (padded([[1] * len(s) for s in seqs])).long(), None)):
        chunked = cello.token_logprobs(model, ids, mask, temperature=0.7, chunk_size=chunk_size)
        naive = naive_token_logprobs(model, ids, mask, 0.7)
        assert chunked.shape == (3, 11)
        assert torch.allclose(chunked, naive, atol=1e-5, rtol=0)
        real = (mask[:, :-1] * mask[:, 1:]).bool()
        assert (chunked[~real] == 0).all() and (chunked[real] != 0).all()
        g_chunked = grads_of(model, lambda: (cello.token_logprobs(model, ids, mask, 0.7, chunk_size) * weights).sum())
        g_naive = grads_of(model, lambda: (naive_token_logprobs(model, ids, mask, 0.7) * weights).sum())
        assert_grads_close(g_chunked, g_naive)


def test_chunked_backward_recomputes_each_chunk_instead_of_keeping_logits(model):
    """With grad on, each chunk of the output projection is checkpointed: backward runs the output layer
    again, once per chunk, so no chunk's [chunk, V] logits stay alive between forward and backward."""
    seqs = random_tokens([9, 4, 12], seed=4)
    ids, mask = padded(seqs).long(), padded([[1] * len(s) for s in seqs]).long()
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(out.shape[-2]))
    try:
        logprobs = cello.token_logprobs(model, ids, mask, chunk_size=5)
        forward_calls = list(calls)
        logprobs.sum().backward()
    finally:
        hook.remove()
        model.zero_grad()
    # positions projected per call: the model's own call projects none, then 22 targets in chunks of 5
    assert forward_calls == [0, 5, 5, 5, 5, 2]
    assert sorted(calls[len(forward_calls):]) == [2, 5, 5, 5, 5]


def test_target_masks_keep_only_the_masked_tokens(model):
    """SFT passes its loss mask: values there equal the full computation, every other token is 0,
    and the returned mask marks only the kept tokens."""
    prompts = random_tokens([6], seed=8)
    responses = random_tokens([9, 12], seed=9)
    targets = [[0] * 4 + [1] * 5, [0] * 3 + [1] * 4 + [0] * 5]
    for shared in (True, False):
        with torch.no_grad():
            full, _ = cello.response_logprobs(model, prompts, responses, shared_prompt=shared)
            only, kept = cello.response_logprobs(model, prompts, responses, shared_prompt=shared, target_masks=targets)
        assert kept.tolist() == padded(targets).tolist()
        keep = kept.bool()
        assert torch.allclose(only[keep], full[keep], atol=1e-6, rtol=0)
        assert (only[~keep] == 0).all() and (full[keep] != 0).all()
    nothing, kept = cello.response_logprobs(model, prompts, responses[:1], target_masks=[[0] * 9])
    assert kept.sum() == 0 and (nothing == 0).all()
    for shared in (True, False):  # empty responses: nothing to score, with a mask as without one
        with torch.no_grad():
            empty, kept = cello.response_logprobs(model, prompts, [[], []], shared_prompt=shared, target_masks=[[], []])
        assert empty.shape == kept.shape == (2, 1) and kept.sum() == 0 and (empty == 0).all()
    with pytest.raises(ValueError, match="one 0/1 per response token"):
        cello.response_logprobs(model, prompts, responses, target_masks=[[1] * 9, [1] * 11])


def test_padding_never_changes_logprobs(model):
    seqs = random_tokens([6, 15, 3], seed=4)
    with torch.no_grad():
        ids, mask, _ = cello.left_pad(seqs, PAD, "cpu")
        batch = cello.token_logprobs(model, ids, mask)
        for i, s in enumerate(seqs):
            alone = cello.token_logprobs(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
            assert torch.allclose(batch[i, -(len(s) - 1):], alone[0], atol=1e-5, rtol=0)
        # one group alone vs. the same group next to prompts and responses of other lengths
        prompts = random_tokens([3, 11], seed=5)
        responses = random_tokens([4, 1, 9, 2], seed=6)
        for shared in (True, False):
            both, _ = cello.response_logprobs(model, prompts, responses, 0.9, shared_prompt=shared)
            alone, _ = cello.response_logprobs(model, prompts[:1], responses[:2], 0.9, shared_prompt=shared)
            assert torch.allclose(both[:2, :4], alone, atol=1e-5, rtol=0)
            assert (both[1, 1:] == 0).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_equals_per_sequence_values_and_gradients(attn):
    model = tiny_llama(seed=2, attn=attn)
    prompts = random_tokens([8, 3, 14], seed=7)  # different lengths in one batch
    responses = random_tokens([5, 0, 9, 1, 4, 4, 7, 2, 6], seed=8)  # G = 3, one empty response
    weights = torch.randn(9, 9, generator=torch.Generator().manual_seed(1))

    def loss(shared):
        logprobs, mask = cello.response_logprobs(model, prompts, responses, 0.7, shared_prompt=shared, chunk_size=4)
        return (logprobs * mask * weights).sum()

    with torch.no_grad():
        a, mask_a = cello.response_logprobs(model, prompts, responses, 0.7, shared_prompt=True)
        b, mask_b = cello.response_logprobs(model, prompts, responses, 0.7, shared_prompt=False)
    assert torch.equal(mask_a, mask_b) and mask_a.sum() == 38 and a.shape == (9, 9) and mask_a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert_grads_close(grads_of(model, lambda: loss(True)), grads_of(model, lambda: loss(False)))


def test_shared_prompt_backward_accumulates_the_responses_weight_gradients_first():
    """The shared path runs backward in two passes (responses, then the prompt from the keys and values
    they read), so each decoder weight accumulates twice, once per pass, and no response gradient waits
    for the prompt's pass. In one pass autograd would sum both contributions first: one accumulation
    per weight, the responses' held until the prompt's backward reached it."""
    model = tiny_llama(seed=3).train()
    layer_params = [p for layer in model.model.layers for p in layer.parameters()]
    accumulated = []
    for i, p in enumerate(layer_params):
        p.register_post_accumulate_grad_hook(lambda p, i=i: accumulated.append(i))
    logprobs, mask = cello.response_logprobs(model, PROMPTS[:1], random_tokens([3, 5, 2], seed=9))
    (logprobs * mask).sum().backward()
    n = len(layer_params)
    assert len(accumulated) == 2 * n
    for k in range(2):  # two passes, each meets every weight once
        assert sorted(accumulated[k * n:(k + 1) * n]) == list(range(n))

    model.zero_grad(set_to_none=True)
    accumulated.clear()
    logprobs, mask = cello.response_logprobs(model, PROMPTS[:1], random_tokens([3, 5, 2], seed=9),
                                             shared_prompt=False)
    (logprobs * mask).sum().backward()
    assert sorted(accumulated) == list(range(n))  # per-sequence: one forward, one accumulation each


def test_bad_input_is_rejected_with_a_clear_message(model):
    with pytest.raises(ValueError, match="at least one token"):
        cello.sample(model, [[3], []], 1, 4, stop_ids=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        cello.sample(model, [[3]], 1, 4, stop_ids=EOS, pad_id=PAD, top_p=0)
    with pytest.raises(ValueError, match="num_samples=0"):  # else [] rows, silently
        cello.sample(model, [[3]], 0, 4, stop_ids=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="temperature=-0.5"):  # else a draw from the inverted distribution
        cello.sample(model, [[3]], 1, 4, stop_ids=EOS, pad_id=PAD, temperature=-0.5)
    with pytest.raises(ValueError, match="multiple of P"):
        cello.response_logprobs(model, [[3], [4]], [[5], [6], [7]])
    for shared in (True, False):  # an empty prompt would wrap round to the last position, silently
        with pytest.raises(ValueError, match="non-empty prompts"):
            cello.response_logprobs(model, [[]], [[5, 6]], shared_prompt=shared)


def test_a_stop_on_the_last_step_flags_its_own_row_after_others_were_dropped(model):
    """Row 0 stops at step 1 and leaves the batch; row 3 stops on the last step: its flag must go to
    row 3, not to the row at its place in the shrunken batch."""
    out = cello.sample(model, PROMPTS, 1, 6, stop_ids=[7, 54], pad_id=PAD, temperature=0)
    assert out["responses"] == [[7], [11, 27, 39, 27, 20, 23], [39, 31, 9, 7], [42, 57, 23, 3, 29, 54]]
    assert out["finished"] == [True, False, True, True]


def test_lm_head_calls_default_chunk_and_the_empty_call_every_rank_makes(model):
    """token_logprobs' default chunk takes all 22 real tokens in one call (after the model's own call on
    0 positions, logits_to_keep empty: _final_hidden); with no target token at all, one 1-token call
    still runs the head, so that every FSDP2 rank makes the same calls."""
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(out.shape[-2]))
    try:
        seqs = random_tokens([9, 4, 12], seed=4)
        with torch.no_grad():
            cello.token_logprobs(model, padded(seqs).long(), padded([[1] * len(s) for s in seqs]).long())
        assert calls == [0, 22]
        calls.clear()
        with torch.no_grad():
            cello.response_logprobs(model, random_tokens([6], seed=8), random_tokens([9], seed=9),
                                    shared_prompt=False, target_masks=[[0] * 9])
        assert calls == [0, 1]
    finally:
        hook.remove()


FSDP_SCRIPT = r'''
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.dirname(sys.argv[2]))
import cello
from test_sampling import tiny_llama, random_tokens, PROMPTS, EOS, PAD
torch.set_num_threads(1)
sharded = int(os.environ.get("WORLD_SIZE", "0")) > 1
model = tiny_llama(seed=4)
if sharded:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
# count FSDP2's weight all-gathers during sampling (a private hook point of torch's FSDP2)
import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
gathers = []
if sharded and hasattr(param_group, "foreach_all_gather"):
    all_gather = param_group.foreach_all_gather
    param_group.foreach_all_gather = lambda *a, **k: gathers.append(1) or all_gather(*a, **k)
out = cello.sample(model, PROMPTS, 2, 8, stop_ids=EOS, pad_id=PAD, temperature=0.8,
                   generator=torch.Generator().manual_seed(0))
responses = out["responses"]
result = {"responses": responses, "sample_logprobs": out["logprobs"], "gathers": len(gathers)}
for shared in (True, False):
    logprobs, mask = cello.response_logprobs(model, PROMPTS, responses, 0.8, shared_prompt=shared)
    (logprobs * mask).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.flatten()[:50].tolist()
    model.zero_grad()
    result[f"logprobs_{shared}"] = logprobs.detach().tolist()
    result[f"grads_{shared}"] = grads
if not sharded or dist.get_rank() == 0:
    with open(sys.argv[3], "w") as f:
        json.dump(result, f)
if sharded:
    dist.destroy_process_group()
    cello.exit_after_torchrun()  # a live gloo thread can abort a finished rank at teardown (SIGABRT)
'''


@pytest.mark.slow
def test_two_process_fsdp2_matches_one_process(tmp_path):
    """sample + response_logprobs under torchrun (gloo, FSDP2 per layer then root) equal one process."""
    script = tmp_path / "fsdp_probe.py"
    script.write_text(FSDP_SCRIPT)
    root, here = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.abspath(__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(script), root, here, str(tmp_path / "one.json")], check=True, env=env,
                   timeout=300)
    # --standalone: torchrun picks a free port itself (a fixed port failed when another job held it)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), root, here, str(tmp_path / "two.json")], check=True, env=env, timeout=300)
    import json
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert one["responses"] == two["responses"]
    assert two["gathers"] == 3  # each FSDP module (2 layers, root) gathered once for all 8 decode steps
    assert torch.allclose(padded(one["sample_logprobs"]), padded(two["sample_logprobs"]), atol=1e-5)
    for shared in (True, False):
        assert torch.allclose(torch.tensor(one[f"logprobs_{shared}"]), torch.tensor(two[f"logprobs_{shared}"]),
                              atol=1e-5)
        for name, g in one[f"grads_{shared}"].items():
            assert torch.allclose(torch.tensor(g), torch.tensor(two[f"grads_{shared}"][name]), atol=1e-5), name
