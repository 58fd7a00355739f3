"""The sampler and log-prob paths on a tiny Qwen2: grouped-query attention with 7 query heads per key/value
head (Qwen2.5-7B: 28 / 4), q/k/v biases, untied output head, two EOS ids."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import cello
from test_sampling import assert_grads_close, grads_of, padded, random_tokens

torch.set_num_threads(1)
PAD, EOS = 0, 1
PROMPTS = random_tokens([7, 13, 2, 10], seed=1, vocab=97)  # different lengths


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=56, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.3, bos_token_id=None, eos_token_id=[EOS, 2],
                         pad_token_id=PAD, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # q/k/v biases start at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.3)
    return model


def test_qwen2_gqa_greedy_equals_generate_and_stops_at_either_eos(qwen):
    ids, mask, _ = cello.left_pad(PROMPTS, PAD, "cpu")
    free = qwen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=PAD)[:, ids.shape[1]:].tolist()
    assert cello.sample(qwen, PROMPTS, 2, 16, stop_ids=-1, pad_id=PAD, temperature=0)["responses"] == \
        [row for row in free for _ in range(2)]
    stops = [free[0][5], free[2][3]]  # two "EOS ids" that rows really emit
    want = qwen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=stops,
                         pad_token_id=PAD)[:, ids.shape[1]:].tolist()
    out = cello.sample(qwen, PROMPTS, 1, 16, stop_ids=stops, pad_id=PAD, temperature=0)
    for w, got, fin in zip(want, out["responses"], out["finished"]):
        ends = [i for i, t in enumerate(w) if t in stops]
        assert got == (w[:ends[0] + 1] if ends else w) and fin == bool(ends)
    assert out["responses"][0][-1] == stops[0] and out["responses"][2][-1] == stops[1]


def test_qwen2_gqa_sampled_logprobs_and_shared_prompt_gradients(qwen):
    out = cello.sample(qwen, PROMPTS, 3, 10, stop_ids=EOS, pad_id=PAD, temperature=0.8,
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for shared in (True, False):
            logprobs, _ = cello.response_logprobs(qwen, PROMPTS, out["responses"], 0.8, shared_prompt=shared)
            # decoding sums in another order than one forward: float32 noise reached 1.4e-5 in some seeds
            assert torch.allclose(logprobs, padded(out["logprobs"]), atol=5e-5, rtol=0)
    responses = random_tokens([5, 0, 9, 1, 4, 4, 7, 2, 6, 3, 8, 1], seed=2, vocab=97)  # G = 3, one empty
    weights = torch.randn(12, 9, generator=torch.Generator().manual_seed(1))

    def loss(shared):
        logprobs, mask = cello.response_logprobs(qwen, PROMPTS, responses, 0.8, shared_prompt=shared, chunk_size=5)
        return (logprobs * mask * weights).sum()
    assert_grads_close(grads_of(qwen, lambda: loss(True)), grads_of(qwen, lambda: loss(False)))
