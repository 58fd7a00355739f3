"""GRPO: the math on hand-computed cases, one update on a toy reward, and the loop end to end
(1 process, 2-process torchrun with FSDP2, resume after a kill)."""
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

import grpo
from conftest import ROOT

T = torch.tensor


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def test_advantage_uses_unbiased_std_and_eps():
    # [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.70710678 (population std would be 0.5 -> A = +-1)
    a = grpo.group_advantages(T([1.0, 0.0]), 2)
    assert a.tolist() == pytest.approx([0.5 / 0.70710778, -0.5 / 0.70710778], abs=1e-7)
    assert a[0].item() == pytest.approx(0.7071057, abs=1e-6)
    # [1, 1, 0, 0]: mean 0.5, unbiased var (4 * 0.25) / 3 = 1/3, std 0.57735027
    a = grpo.group_advantages(T([1.0, 1.0, 0.0, 0.0]), 4)
    assert a.tolist() == pytest.approx([0.8660239, 0.8660239, -0.8660239, -0.8660239], abs=1e-6)


def test_advantage_per_group_and_dr_grpo():
    # two groups of 2: the second has equal rewards, so exactly zero
    a = grpo.group_advantages(T([1.0, -1.0, 0.25, 0.25]), 2)
    assert a[2].item() == 0.0 and a[3].item() == 0.0
    assert a[0].item() == pytest.approx(1 / (math.sqrt(2) + 1e-6), abs=1e-6)  # mean 0, std sqrt(2)
    # Dr. GRPO: no std division
    a = grpo.group_advantages(T([1.0, 0.0, 0.5, 0.5, 0.5, -1.0]), 3, scale_by_std=False)
    assert a.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.5, 0.5, -1.0], abs=1e-7)


def test_advantage_equal_rewards_and_group_of_one_are_zero():
    assert grpo.group_advantages(T([0.3, 0.3, 0.3]), 3).tolist() == [0.0, 0.0, 0.0]
    assert grpo.group_advantages(T([-1.0] * 4), 4).tolist() == [0.0] * 4
    # 8 x 0.3 (a valid answer with 3 of 5 cells right): in float32 the mean is off by an ulp, the std is
    # ~3e-8 and every A would be ~0.029, a push from a group that carries no signal; float64 gives 0
    assert grpo.group_advantages(T([0.3] * 8), 8).tolist() == [0.0] * 8
    # a group of one has no spread: defined as 0 (unbiased std would be NaN)
    assert grpo.group_advantages(T([0.7, -1.0]), 1).tolist() == [0.0, 0.0]
    assert grpo.group_advantages(T([1.0, 0.0]), 2).dtype == torch.float32  # computed in float64, returned as given


def test_zero_advantage_share_counts_groups_of_equal_rewards_exactly():
    # one group of 8 x 0.1 (1 of 5 cells right): its float32 std is ~8e-9, not 0, yet A is exactly 0
    assert T([0.1] * 8).view(-1, 8).std(dim=1).item() != 0
    assert grpo.zero_advantage_share(T([0.1] * 8), 8) == 1.0
    assert grpo.zero_advantage_share(T([0.0, 0.5, 1.0]), 3) == 0.0  # one A is 0 (the middle), not all
    assert grpo.zero_advantage_share(T([0.3] * 4 + [0.3, 0.3, 1.0, -1.0] + [-1.0] * 4), 4) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# Clipped surrogate, k3, aggregation
# ---------------------------------------------------------------------------------------------

def test_clipped_surrogate_values_and_gradients():
    # one token per response; rho = 1.5, 1.5, 0.5, 0.5, 1.0 and A = +1, -1, +1, -1, +2
    old = T([[0.0], [0.0], [0.0], [0.0], [0.0]])
    logp = T([[math.log(1.5)], [math.log(1.5)], [math.log(0.5)], [math.log(0.5)], [0.0]], requires_grad=True)
    adv = T([1.0, -1.0, 1.0, -1.0, 2.0])
    loss, rho, clipped = grpo.clipped_surrogate(logp, old, adv, 0.2, 0.2)
    assert rho.view(-1).tolist() == pytest.approx([1.5, 1.5, 0.5, 0.5, 1.0], abs=1e-6)
    # -min(1.5, 1.2) = -1.2 ; -min(-1.5, -1.2) = 1.5 ; -min(0.5, 0.8) = -0.5 ; -min(-0.5, -0.8) = 0.8 ; -2
    assert loss.view(-1).tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8, -2.0], abs=1e-6)
    assert clipped.view(-1).tolist() == [True, False, False, True, False]
    loss.sum().backward()
    # d(-rho * A)/dlogp = -rho * A where unclipped, 0 where clipped
    assert logp.grad.view(-1).tolist() == pytest.approx([0.0, 1.5, -0.5, 0.0, -2.0], abs=1e-6)


def test_clipped_tokens_are_counted_by_side():
    # the five tokens above (rho 1.5, 1.5, 0.5, 0.5, 1.0; A +1, -1, +1, -1, +2) plus a sixth that is
    # padding and would be clipped high (rho 1.5, A +1): one clipped above 1.2, one below 0.8
    logp = T([[math.log(1.5), math.log(1.5)], [math.log(1.5), 0.0], [math.log(0.5), 0.0], [math.log(0.5), 0.0],
              [0.0, 0.0]])
    mask = T([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    _, stats = grpo.grpo_loss(logp, torch.zeros(5, 2), None, T([1.0, -1.0, 1.0, -1.0, 2.0]), mask, "token-mean", 5.0)
    assert (stats["tokens"], stats["clipped_low"], stats["clipped_high"]) == (5, 1, 1)


def test_clip_higher_is_asymmetric():
    logp = T([[math.log(1.25)]])
    loss, _, clipped = grpo.clipped_surrogate(logp, T([[0.0]]), T([1.0]), clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and not clipped.item()  # 1.25 < 1.28: inside
    loss, _, clipped = grpo.clipped_surrogate(logp, T([[0.0]]), T([1.0]), clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2) and clipped.item()
    # below 1 the low bound applies, whatever clip_high is: rho 0.75, A = -1 -> clip(0.75, 0.8, 1.28) = 0.8
    loss, _, clipped = grpo.clipped_surrogate(T([[math.log(0.75)]]), T([[0.0]]), T([-1.0]), clip_low=0.2,
                                              clip_high=0.28)
    assert loss.item() == pytest.approx(0.8) and clipped.item()


def test_tokens_outside_clip_range_get_zero_gradient():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(6, 7, generator=g) * 0.5).requires_grad_()
    old = torch.zeros(6, 7)
    adv = T([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    loss, rho, clipped = grpo.clipped_surrogate(logp, old, adv, 0.2, 0.2)
    loss.sum().backward()
    assert clipped.any() and (~clipped).any()
    assert (logp.grad[clipped] == 0).all()
    expected = (-rho * adv[:, None]).detach()
    assert torch.allclose(logp.grad[~clipped], expected[~clipped])
    # the clipped tokens are exactly those outside [0.8, 1.2] on the side their advantage favours,
    # and both sides occur
    a = adv[:, None].expand_as(rho)
    assert torch.equal(clipped, (rho > 1.2) & (a > 0) | (rho < 0.8) & (a < 0))
    assert ((rho > 1.2) & clipped).any() and ((rho < 0.8) & clipped).any()


def test_log_ratio_is_clamped():
    loss, rho, _ = grpo.clipped_surrogate(T([[0.0]]), T([[-1000.0]]), T([-1.0]))
    assert rho.item() == pytest.approx(math.exp(20)) and torch.isfinite(loss).all()
    kl = grpo.kl_k3(T([[-1000.0]]), T([[0.0]]))
    assert kl.item() == pytest.approx(math.exp(20) - 21)
    # and on the other side: d = ref - logp = -1000 is clamped to -20, so k3 = exp(-20) + 20 - 1
    assert grpo.kl_k3(T([[0.0]]), T([[-1000.0]])).item() == pytest.approx(19.0 + math.exp(-20), abs=1e-5)


def test_k3_values():
    logp = T([[0.0, 0.0, math.log(2.0), -1.3]])
    ref = T([[math.log(2.0), -math.log(2.0), 0.0, -1.3]])
    # d = ref - logp = log 2, -log 2, -log 2, 0 -> 2 - log2 - 1, 0.5 + log2 - 1, same, 0
    assert grpo.kl_k3(logp, ref).view(-1).tolist() == pytest.approx([0.3068528, 0.1931472, 0.1931472, 0.0], abs=1e-6)


def test_policy_equal_to_reference_gives_kl_zero_and_rho_one():
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 5, generator=g) * 4).requires_grad_()
    same = logp.detach().clone()
    mask = torch.ones(3, 5)
    adv = T([1.0, -2.0, 0.5])
    loss, stats = grpo.grpo_loss(logp, same, same, adv, mask, "token-mean", 15.0, beta=1.0)
    assert stats["kl"] == 0.0 and stats["rho"] == 15.0  # rho exactly 1 on each of the 15 tokens
    assert stats["clipped_low"] == stats["clipped_high"] == 0
    assert loss.item() == pytest.approx(-adv.sum().item() * 5 / 15)
    loss.backward()
    # the policy term alone: -A / 15 per token; k3's gradient (1 - exp(ref - logp)) vanishes at ref = logp
    assert torch.equal(logp.grad, (-adv / 15)[:, None].expand(3, 5))


def test_aggregation_modes():
    per_token = T([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    agg = grpo.aggregate_loss
    # token-mean: (1 + 2 + 3 + 4) / 4 tokens
    assert agg(per_token, mask, "token-mean", grpo.loss_divisor("token-mean", 4, 2, 3)).item() == pytest.approx(2.5)
    # seq-mean: (mean(1, 2, 3) + mean(4)) / 2 sequences
    assert agg(per_token, mask, "seq-mean", grpo.loss_divisor("seq-mean", 4, 2, 3)).item() == pytest.approx(3.0)
    # token-sum: 10 / (2 sequences * 3 max new tokens)
    assert agg(per_token, mask, "token-sum", grpo.loss_divisor("token-sum", 4, 2, 3)).item() == pytest.approx(10 / 6)
    # a NaN or inf in padding stays out (0 * NaN would be NaN)
    for mode in grpo.LOSS_AGG_MODES:
        assert agg(T([[1.0, math.nan, math.inf]]), T([[1.0, 0.0, 0.0]]), mode, 1.0).item() == 1.0
    # a response that is all padding adds 0 to seq-mean (not NaN); an empty batch divides by 1, not 0
    assert agg(T([[1.0, 2.0], [5.0, 5.0]]), T([[1.0, 1.0], [0.0, 0.0]]), "seq-mean", 2.0).item() == 0.75
    assert grpo.loss_divisor("token-mean", 0, 0, 5) == grpo.loss_divisor("seq-mean", 0, 0, 5) == 1.0
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        grpo.loss_divisor("mean", 4, 2, 3)


def test_token_mean_over_micro_batches_equals_whole_batch():
    # micro-batches of different lengths: dividing each by its own token count would be biased;
    # dividing by the whole batch's count makes the sum of micro-batch losses the batch loss.
    per_token = T([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    d = grpo.loss_divisor("token-mean", 5, 2, 4)
    whole = grpo.aggregate_loss(per_token, mask, "token-mean", d)
    parts = grpo.aggregate_loss(per_token[:1], mask[:1], "token-mean", d) + \
        grpo.aggregate_loss(per_token[1:], mask[1:], "token-mean", d)
    assert whole.item() == pytest.approx(9 / 5) and parts.item() == pytest.approx(9 / 5)
    per_micro = (grpo.aggregate_loss(per_token[:1], mask[:1], "token-mean", 4)
                 + grpo.aggregate_loss(per_token[1:], mask[1:], "token-mean", 1)) / 2
    assert per_micro.item() == pytest.approx(3.0)  # the biased per-micro-batch mean differs


def test_grpo_loss_hand_case_with_kl():
    # two responses of 2 and 1 tokens; rho = 1 everywhere; A = +1, -1; ref differs by log 2 on one token
    logp = T([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    ref = T([[-1.0 + math.log(2.0), -2.0], [-0.5, 0.0]])
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = grpo.grpo_loss(logp, logp.detach(), ref, T([1.0, -1.0]), mask, "token-mean", 3.0, beta=0.1)
    # policy part: (-1 - 1 + 1) / 3 ; KL part: 0.1 * (2 - log 2 - 1) / 3
    assert loss.item() == pytest.approx((-1.0 + 0.1 * (1 - math.log(2))) / 3, abs=1e-6)
    assert stats == {"tokens": 3, "clipped_low": 0, "clipped_high": 0, "kl": pytest.approx(1 - math.log(2)),
                     "rho": pytest.approx(3.0)}
    # d loss / d logp = (-A * rho + beta * (1 - exp(ref - logp))) / 3 per token: the KL term pulls the
    # first token (ref above it by log 2) up by beta / 3 besides the policy term; padding gets none
    loss.backward()
    assert logp.grad.tolist() == [[pytest.approx(-1.1 / 3), pytest.approx(-1 / 3)], [pytest.approx(1 / 3), 0.0]]


def test_equal_rewards_give_zero_policy_gradient():
    # 8 x 0.3: computed in float32, mean and std are off by float noise and every advantage would be
    # ~0.029, which the loss and its gradient would carry; the whole chain must give exactly 0
    rewards = T([0.3] * 8)
    adv = grpo.group_advantages(rewards, 8)
    assert adv.tolist() == [0.0] * 8
    logp = (-torch.rand(8, 6, generator=torch.Generator().manual_seed(2))).requires_grad_()
    old = logp.detach() + 0.05  # rho = exp(-0.05) != 1, inside the clip range: the gradient is -rho * A
    loss, stats = grpo.grpo_loss(logp, old, None, adv, torch.ones(8, 6), "token-mean", 48.0)
    loss.backward()
    assert stats["clipped_low"] == stats["clipped_high"] == 0
    assert loss.item() == 0.0 and (logp.grad == 0).all()


@pytest.mark.parametrize("mode", grpo.LOSS_AGG_MODES)
def test_padding_never_changes_the_loss(mode):
    g = torch.Generator().manual_seed(3)
    mask = T([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    logp = -torch.rand(3, 5, generator=g)
    old = logp + 0.3 * torch.randn(3, 5, generator=g)
    ref = logp + 0.3 * torch.randn(3, 5, generator=g)
    adv = T([1.0, -0.5, 0.7])

    def run(logp, old, ref, mask):
        logp = logp.clone().requires_grad_()
        loss, stats = grpo.grpo_loss(logp, old, ref, adv, mask, mode, 7.0, beta=0.5)
        loss.backward()
        return loss.item(), logp.grad, stats

    clean = run(logp, old, ref, mask)
    junk = torch.full((3, 5), float("nan"))
    junk[0, 3], junk[1, 2] = float("inf"), -1e9
    pad = mask == 0
    dirty = run(torch.where(pad, junk, logp), torch.where(pad, -junk, old), torch.where(pad, junk * 3, ref), mask)
    assert dirty[0] == clean[0] and dirty[2] == clean[2]
    assert torch.equal(dirty[1], clean[1]) and (dirty[1][pad] == 0).all()
    # extra all-padding columns (a longer micro-batch) change nothing either
    wide = [torch.cat([x, torch.full((3, 4), 7.0)], dim=1) for x in (logp, old, ref)]
    widened = run(*wide, torch.cat([mask, torch.zeros(3, 4)], dim=1))
    assert widened[0] == pytest.approx(clean[0], abs=1e-7)
    assert torch.allclose(widened[1][:, :5], clean[1], atol=1e-7)


def test_step_puzzles_are_epoch_permutations():
    seen = grpo.step_puzzles(5, 0, 5, seed=0)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    # shuffled, per epoch and per seed (torch.randperm seeded by seed * 1_000_003 + epoch)
    assert seen == [4, 0, 1, 3, 2]
    assert grpo.step_puzzles(5, 5, 5, seed=0) == [0, 4, 2, 3, 1]  # epoch 1: another order
    assert grpo.step_puzzles(5, 0, 5, seed=2) == [4, 2, 0, 3, 1]  # another seed: another order
    # the next seed is not the same run an epoch later (it was, when the generator took seed + epoch)
    assert grpo.step_puzzles(10, 0, 10, seed=1) != grpo.step_puzzles(10, 10, 10, seed=0)
    epochs = [grpo.step_puzzles(20, 20 * e, 20, seed=0) for e in range(3)]
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3 and list(range(20)) not in epochs
    assert grpo.step_puzzles(20, 0, 20, seed=5) != epochs[0]
    # reading 2 + 3 + 5 in pieces gives the same order as reading 10 at once (resume = consumed count)
    pieces = grpo.step_puzzles(5, 0, 2, 0) + grpo.step_puzzles(5, 2, 3, 0) + grpo.step_puzzles(5, 5, 5, 0)
    assert pieces == grpo.step_puzzles(5, 0, 10, 0)
    assert sorted(pieces[5:]) == [0, 1, 2, 3, 4]


def test_bad_flags_exit_with_clear_messages(capsys):
    base = ["--model", "tiny", "--train", "t.jsonl", "--out-dir", "o"]
    for extra, text in [(["--group-size", "1"], "grpo.py: error: --group-size: expected an integer >= 2, got 1"),
                        (["--temperature", "0"], "grpo.py: error: --temperature: expected a number > 0, got 0.0"),
                        (["--max-grad-norm", "-1"], "--max-grad-norm: expected a number > 0 (inf: no limit), got -1.0"),
                        (["--lr", "0"], "grpo.py: error: --lr: expected a number > 0, got 0.0"),
                        (["--warmup-steps", "-3"], "grpo.py: error: --warmup-steps: expected an integer >= 0, got -3"),
                        (["--eval-puzzles", "-2"], "grpo.py: error: --eval-puzzles: expected an integer >= 0, got -2"),
                        (["--beta", "nan"], "grpo.py: error: --beta: expected a number >= 0, got nan"),
                        (["--max-grad-norm", "nan"], "--max-grad-norm: expected a number > 0 (inf: no limit), got nan"),
                        (["--seed", "-1"], "grpo.py: error: --seed: expected an integer in [0, 2^63), got -1"),
                        (["--seed", str(2**63)], f"--seed: expected an integer in [0, 2^63), got {2**63}"),
                        (["--loss-agg", "mean"], "invalid choice")]:
        with pytest.raises(SystemExit) as exit_info:
            grpo.parse_args(base + extra)
        assert text in str(exit_info.value.code) + capsys.readouterr().err
    # every count flag refuses 0 (--mu 0 would make no update and divide by zero passes; --minibatches 0
    # would split a step into no minibatches), and a clip range cannot be negative
    for flag in ("--max-prompt-tokens", "--puzzles-per-step", "--max-new-tokens", "--sample-batch", "--mu",
                 "--minibatches", "--micro-batch", "--steps", "--eval-batch", "--save-every"):
        with pytest.raises(SystemExit) as exit_info:
            grpo.parse_args(base + [flag, "0"])
        assert exit_info.value.code == f"grpo.py: error: {flag}: expected an integer >= 1, got 0"
    for flag in ("--clip-low", "--clip-high"):
        with pytest.raises(SystemExit) as exit_info:
            grpo.parse_args(base + [flag, "-0.1"])
        assert exit_info.value.code == f"grpo.py: error: {flag}: expected a number >= 0 (inf: no limit), got -0.1"
    # inf turns a limit off (no gradient clipping, no upper clip), as torch's clip_grad_norm_ allows
    unlimited = grpo.parse_args(base + ["--max-grad-norm", "inf", "--clip-high", "inf"])
    assert unlimited.max_grad_norm == unlimited.clip_high == math.inf


# ---------------------------------------------------------------------------------------------
# With a tiny model
# ---------------------------------------------------------------------------------------------
import cello  # noqa: E402

GENES = ["GNLY", "NKG7", "CST3", "LST1", "AIF1", "MZB1", "CD79A", "MS4A1", "CD3E", "IL7R", "CCR7", "S100A8",
         "LYZ", "FCGR3A", "HLA-DRA", "CD8A", "PPBP", "PF4"]
LABELS = ["CD56+ NK", "CD14+ Monocyte", "CD19+ B", "CD8+ Cytotoxic T", "Dendritic"]


def make_records(count=8, n=3, seed=0):
    """Small hand-made puzzles (short prompts): n cells with 6 genes each, gold labels, a response."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for k in range(count):
        labels = [LABELS[i] for i in torch.randperm(len(LABELS), generator=g)[:n].tolist()]
        cells = [[GENES[i] for i in torch.randperm(len(GENES), generator=g)[:6].tolist()] for _ in range(n)]
        records.append({"id": f"toy/{k}", "source": "hand", "donor": "D0", "batch": None, "split": "train",
                        "context": "The cell is from a human.", "cells": cells, "candidates": sorted(labels),
                        "answer": labels, "response": f"<think>ok</think>\n<answer>{' | '.join(labels)}</answer>"})
    return records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(records, path of a fresh tiny model folder built on them)."""
    torch.set_num_threads(1)
    records = make_records()
    path = cello.prepare_model("tiny", str(tmp_path_factory.mktemp("grpo-model")), records)
    return records, path


def update_args(path, *extra):
    return grpo.parse_args(["--model", path, "--train", "unused", "--out-dir", "unused", *extra])


def test_one_step_on_a_toy_reward_raises_the_rewarded_response(tiny):
    # reward 1 for responses that start with the first sample's first token, 0 otherwise
    records, path = tiny
    tok = cello.load_tokenizer(path)
    model = cello.load_model(path)
    prompts = [cello.prompt_ids(tok, r) for r in records[:2]]
    G = 8
    out = cello.sample(model, prompts, G, 3, tok.eos_token_id, tok.pad_token_id,
                       generator=torch.Generator().manual_seed(0))
    targets = [out["responses"][0][0], out["responses"][G][0]]
    rewards = T([float(r[0] == targets[k // G]) for k, r in enumerate(out["responses"])])
    assert 0 < rewards[:G].sum() < G and 0 < rewards[G:].sum() < G  # both groups carry a signal
    old, mask = grpo.pad_rows(out["logprobs"])
    batch = {"prompts": prompts, "responses": out["responses"], "old_logp": old, "mask": mask, "ref_logp": None,
             "advantages": grpo.group_advantages(rewards, G)}

    def first_token_logp():
        with torch.no_grad():
            lp, _ = cello.response_logprobs(model, prompts, [[t] for t in targets])
        return lp[:, 0]

    def seq_logp():
        with torch.no_grad():
            lp, m = cello.response_logprobs(model, prompts, out["responses"])
        return (lp * m).sum(1)

    before, seq_before = first_token_logp(), seq_logp()
    args = update_args(path, "--lr", "1e-2", "--beta", "0", "--group-size", str(G), "--micro-batch", "1")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    metrics = grpo.policy_update(model, optimizer, batch, args)
    after, seq_after = first_token_logp(), seq_logp()
    assert (after > before + 0.1).all(), (before, after)
    up = rewards.bool()
    gain = seq_after - seq_before
    assert (gain[up] > 0.5).all() and gain[up].min() > gain[~up].max()  # each rewarded one gains most
    # mu = 1, one minibatch: nothing moved before the gradient, so rho = 1 up to float noise
    assert metrics["rho_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0.0
    assert metrics["grad_norm"] > 0 and abs(metrics["loss"]) < 1e-3  # loss ~0, gradient not


def test_update_is_the_same_with_shared_prompt_or_per_sequence(tiny):
    records, path = tiny
    tok = cello.load_tokenizer(path)
    prompts = [cello.prompt_ids(tok, r) for r in records[2:4]]
    models = [cello.load_model(path), cello.load_model(path)]
    out = cello.sample(models[0], prompts, 4, 6, tok.eos_token_id, tok.pad_token_id,
                       generator=torch.Generator().manual_seed(1))
    old, mask = grpo.pad_rows(out["logprobs"])
    with torch.no_grad():
        ref, _ = cello.response_logprobs(models[1], prompts, out["responses"], shared_prompt=False)
    ref = ref + 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))  # a KL to pull on
    batch = {"prompts": prompts, "responses": out["responses"], "old_logp": old, "mask": mask, "ref_logp": ref,
             "advantages": grpo.group_advantages(T([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.2]), 4)}
    results = []
    for model, flag in zip(models, ([], ["--per-sequence"])):
        args = update_args(path, "--beta", "0.1", "--group-size", "4", "--mu", "2", *flag)
        # SGD, not Adam: Adam turns float noise in near-zero gradients into full +-lr steps
        results.append(grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, args))
    for key in ("loss", "grad_norm", "kl", "clip_frac_low", "clip_frac_high", "rho_mean"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-4, abs=1e-6), key
    start = cello.load_model(path)
    moved = max((p - p0).abs().max().item() for p, p0 in zip(models[0].parameters(), start.parameters()))
    assert moved > 1e-3  # the step did something
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # mu = 2: the second pass sees a moved policy, so rho is no longer 1
    assert results[0]["rho_mean"] != pytest.approx(1.0, abs=1e-6)


def test_per_sequence_rollout_prefills_every_response_and_samples_the_same(tiny, monkeypatch):
    # --per-sequence passes each prompt G times (one prefill per response); the decode batch and the
    # generator's draws are unchanged, so the samples are exactly those of the shared prefill
    records, path = tiny
    tok = cello.load_tokenizer(path)
    model = cello.load_model(path)
    prompts = [cello.prompt_ids(tok, r) for r in records[:3]]
    calls = []
    real_sample = cello.sample
    monkeypatch.setattr(cello, "sample", lambda m, p, n, *a, **k: calls.append((len(p), n)) or real_sample(m, p, n, *a, **k))
    outs = []
    for flag in ([], ["--per-sequence"]):
        args = update_args(path, "--group-size", "4", "--max-new-tokens", "10", "--sample-batch", "2", *flag)
        outs.append(grpo.rollout(model, prompts, 5, 0, args, tok.eos_token_id, tok.pad_token_id, "cpu"))
    assert calls == [(2, 4), (1, 4), (8, 1), (4, 1)]
    assert outs[0]["responses"] == outs[1]["responses"] and outs[0]["finished"] == outs[1]["finished"]
    assert len(outs[0]["responses"]) == 12 and len({tuple(r) for r in outs[0]["responses"]}) > 1
    for a, b in zip(outs[0]["logprobs"], outs[1]["logprobs"]):
        assert a == pytest.approx(b, abs=1e-6)


def one_group_batch(tiny, responses, advantages):
    """The tiny model and an update batch of one puzzle's two responses (old log-probs -1 per token)."""
    records, path = tiny
    model = cello.load_model(path)
    old, mask = grpo.pad_rows([[-1.0] * len(r) for r in responses])
    return model, {"prompts": [cello.prompt_ids(cello.load_tokenizer(path), records[0])], "responses": responses,
                   "old_logp": old, "mask": mask, "ref_logp": None, "advantages": T(advantages)}


def test_per_sequence_scores_the_update_and_the_reference_per_sequence_too(tiny, monkeypatch):
    """--per-sequence is the plain GRPO path throughout: the update's and the reference's log-probs run
    each response with its own copy of the prompt too, not only the rollout."""
    path = tiny[1]
    model, batch = one_group_batch(tiny, [[100, 101], [102]], [1.0, -1.0])
    shared = []
    real = cello.response_logprobs
    monkeypatch.setattr(cello, "response_logprobs", lambda *a, **k: shared.append(k["shared_prompt"]) or real(*a, **k))
    for flag, expected in (([], True), (["--per-sequence"], False)):
        shared.clear()
        args = update_args(path, "--group-size", "2", "--beta", "0", *flag)
        grpo.reference_logprobs(model, batch["prompts"], batch["responses"], args)
        grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, args)
        assert shared == [expected, expected]


def test_non_finite_loss_stops_before_the_weights_change(tiny):
    path = tiny[1]
    model, batch = one_group_batch(tiny, [[5, 6], [7]], [float("nan"), 0.0])
    before = [p.detach().clone() for p in model.parameters()]
    args = update_args(path, "--group-size", "2", "--beta", "0")
    with pytest.raises(SystemExit, match="non-finite loss or gradient.*weights were not updated"):
        grpo.policy_update(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batch, args)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_non_finite_loss_in_a_later_minibatch_says_the_earlier_ones_were_applied(tiny):
    """With --minibatches 2 the first minibatch's optimizer step runs before the second one's NaN is
    seen: the message must not claim the weights are untouched, and the second step is not applied."""
    records, path = tiny
    model = cello.load_model(path)
    tok = cello.load_tokenizer(path)
    responses = [[5, 6], [7], [8, 9], [10]]  # two puzzles of two responses; the second puzzle's advantage is NaN
    old, mask = grpo.pad_rows([[-1.0] * len(r) for r in responses])
    batch = {"prompts": [cello.prompt_ids(tok, records[0]), cello.prompt_ids(tok, records[1])], "responses": responses,
             "old_logp": old, "mask": mask, "ref_logp": None, "advantages": T([1.0, -1.0, float("nan"), 0.0])}
    before = [p.detach().clone() for p in model.parameters()]
    after_first = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.register_step_post_hook(lambda *_: after_first.setdefault("w", [p.detach().clone() for p in model.parameters()]))
    args = update_args(path, "--group-size", "2", "--puzzles-per-step", "2", "--minibatches", "2", "--beta", "0")
    with pytest.raises(SystemExit) as stop:
        grpo.policy_update(model, optimizer, batch, args)
    assert "the weights hold this step's first 1 minibatch update(s), not this one" in stop.value.code
    assert not all(torch.equal(p, q) for p, q in zip(after_first["w"], before))  # the first step moved them
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_first["w"]))  # the second did not


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_alone_stops_the_update(tiny, monkeypatch, bad):
    """Either check stops the step: a non-finite loss whose gradient is finite (an inf added as a
    constant), or a finite loss whose gradient is not (a hook writes inf into it)."""
    path = tiny[1]
    model, batch = one_group_batch(tiny, [[5, 6], [7]], [1.0, -1.0])
    if bad == "loss":
        real = grpo.grpo_loss
        def infinite_loss(*args, **kwargs):
            loss, stats = real(*args, **kwargs)
            return loss + math.inf, stats
        monkeypatch.setattr(grpo, "grpo_loss", infinite_loss)
    else:
        model.lm_head.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.inf))
    before = [p.detach().clone() for p in model.parameters()]
    args = update_args(path, "--group-size", "2", "--beta", "0")
    with pytest.raises(SystemExit) as stop:
        grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, args)
    loss_finite, grad_norm = re.search(r"loss finite on all ranks: (\w+), grad norm (\S+)\)", stop.value.code).groups()
    assert (loss_finite, math.isfinite(float(grad_norm))) == (("False", True) if bad == "loss" else ("True", False))
    assert "the weights were not updated" in stop.value.code
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_max_grad_norm_clips_the_update(tiny):
    # SGD at lr 1 without momentum: the weights move by exactly the clipped gradient, whose global
    # norm is --max-grad-norm when the raw gradient is larger (the returned grad_norm is the raw one)
    records, path = tiny
    tok = cello.load_tokenizer(path)
    model, start = cello.load_model(path), cello.load_model(path)
    prompts = [cello.prompt_ids(tok, r) for r in records[:2]]
    g = torch.Generator().manual_seed(6)
    responses = [torch.randint(10, len(tok), (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    with torch.no_grad():
        old, mask = cello.response_logprobs(model, prompts, responses)
    batch = {"prompts": prompts, "responses": responses, "old_logp": old, "mask": mask, "ref_logp": None,
             "advantages": grpo.group_advantages(T([1.0, 0.0, 0.2, 0.9]), 2)}
    args = update_args(path, "--group-size", "2", "--beta", "0", "--max-grad-norm", "1e-3")
    metrics = grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, args)
    assert metrics["grad_norm"] > 1e-2  # the raw gradient is well above the clip norm
    moved = torch.cat([(p - p0).detach().view(-1) for p, p0 in zip(model.parameters(), start.parameters())])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# The loop end to end: a toy reward, 1 process, 2 processes, resume after a kill
# ---------------------------------------------------------------------------------------------
# A fresh tiny model never writes a valid answer (reward -1 everywhere, so nothing to learn); the
# runs below swap in a toy reward with a spread, the share of spaces in the response text, so that
# every step really updates the weights.
RUNNER = """
import os, sys
sys.path.insert(0, {root!r})
import grpo, reward
real_score = reward.score
def toy_score(text, answer, num_tokens=None):
    s = real_score(text, answer, num_tokens)
    s["reward"] = text.count(" ") / (1 + len(text))
    return s
grpo.reward.score = toy_score
if os.environ.get("ROLLOUT_LOG"):  # what each step scored: lengths, gold answers, rewards, finished rows
    import json
    score_rollout, rollout, finished = grpo.score_rollout, grpo.rollout, []
    def logged_rollout(*args):
        out = rollout(*args)
        finished[:] = out["finished"]
        return out
    def logged_score_rollout(texts, lengths, answers, args):
        scores, advantages = score_rollout(texts, lengths, answers, args)
        row = {{"lengths": lengths, "answers": answers, "rewards": [s["reward"] for s in scores],
                "finished": finished}}
        with open(os.environ["ROLLOUT_LOG"], "a") as f:
            f.write(json.dumps(row) + "\\n")
        return scores, advantages
    grpo.rollout, grpo.score_rollout = logged_rollout, logged_score_rollout
if os.environ.get("REF_LOG"):  # the reference's parameters each rank still holds whole after its log-probs
    import json
    from torch.distributed.tensor import DTensor
    reference_logprobs = grpo.reference_logprobs
    def logged_reference_logprobs(ref_model, *args):
        out = reference_logprobs(ref_model, *args)
        whole = [n for n, p in ref_model.named_parameters() if not isinstance(p, DTensor)]
        with open(os.environ["REF_LOG"] + str(grpo.cello.get_rank()), "a") as f:
            f.write(json.dumps(whole) + "\\n")
        return out
    grpo.reference_logprobs = logged_reference_logprobs
exit_after = int(os.environ.get("EXIT_AFTER_STEP", "0"))
if exit_after:  # simulate a kill right after that step's metrics line, before its checkpoint
    append = grpo.cello.append_jsonl
    def append_then_die(path, rows):
        append(path, rows)
        if rows[-1]["step"] == exit_after:
            os._exit(137)
    grpo.cello.append_jsonl = append_then_die
grpo.main(sys.argv[1:])
grpo.cello.exit_after_torchrun()  # as grpo.py's __main__ does
"""
VOLATILE = ("time_rollout", "time_reference", "time_update", "time_step", "tokens_per_s")


def test_activation_checkpointing_recomputes_and_gives_the_same_update(tiny):
    # grpo.py --activation-checkpointing: train mode, each decoder layer replayed in backward, the
    # shared prompt's cache kept through the replay; same samples and the same update as without it
    records, path = tiny
    tok = cello.load_tokenizer(path)
    prompts = [cello.prompt_ids(tok, r) for r in records[4:6]]
    plain, checkpointed = cello.load_model(path).eval(), cello.load_model(path)
    cello.shard_model(checkpointed, torch.device("cpu"), activation_checkpointing=True).train()
    samples = [cello.sample(m, prompts, 4, 6, tok.eos_token_id, tok.pad_token_id,
                            generator=torch.Generator().manual_seed(4)) for m in (plain, checkpointed)]
    assert samples[0] == samples[1]
    out = samples[0]
    old, mask = grpo.pad_rows(out["logprobs"])
    batch = {"prompts": prompts, "responses": out["responses"], "old_logp": old, "mask": mask, "ref_logp": None,
             "advantages": grpo.group_advantages(T([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.2]), 4)}
    calls, results = [], []
    for model in (plain, checkpointed):
        calls.append(0)
        mlp = model.model.layers[0].mlp  # counted by wrapping forward: module hooks do not fire in a replay
        forward = mlp.forward
        mlp.forward = lambda *a, forward=forward: calls.__setitem__(-1, calls[-1] + 1) or forward(*a)
        args = update_args(path, "--beta", "0", "--group-size", "4")
        results.append(grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, args))
    assert calls == [4, 8]  # per prompt, its forward and its responses' forward; checkpointed: again in backward
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-4)
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.fixture(scope="module")
def toy_run(tiny, tmp_path_factory):
    """(runner script, data folder, base flags) for CLI runs on the tiny model."""
    records, path = tiny
    d = tmp_path_factory.mktemp("grpo-cli")
    cello.write_jsonl_atomic(str(d / "train.jsonl"), records)
    cello.write_jsonl_atomic(str(d / "val.jsonl"), make_records(3, seed=1))
    runner = d / "runner.py"
    runner.write_text(RUNNER.format(root=ROOT))
    flags = ["--model", path, "--train", str(d / "train.jsonl"), "--val", str(d / "val.jsonl"),
             "--puzzles-per-step", "2", "--group-size", "4", "--max-new-tokens", "12", "--micro-batch", "1",
             "--sample-batch", "1",
             "--lr", "1e-3", "--eval-every", "2", "--eval-batch", "2", "--seed", "3"]
    return runner, d, flags


def run_cli(runner, flags, nproc=1, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, str(runner)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(runner)]
    return subprocess.run(cmd + flags, env=env, capture_output=True, text=True, timeout=600)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stable(row):
    return {k: v for k, v in row.items() if k not in VOLATILE}


def test_activation_checkpointing_refuses_a_model_with_dropout(toy_run, tmp_path):
    # train mode would switch its dropout on: the ratio would compare different functions
    runner, d, flags = toy_run
    model_at = flags.index("--model") + 1
    folder = tmp_path / "dropout-model"
    shutil.copytree(flags[model_at], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    with pytest.raises(SystemExit) as stop:
        grpo.main(flags[:model_at] + [str(folder)] + flags[model_at + 1:] +
                  ["--out-dir", str(tmp_path / "out"), "--steps", "1", "--activation-checkpointing"])
    assert str(stop.value).startswith("grpo.py: error: --activation-checkpointing runs the policy in train mode")
    assert "dropout 0.1" in str(stop.value)
    # without the flag that model runs in eval mode (dropout off): the update's log-probs are the
    # sampler's, so rho is 1 at the first update (in train mode each forward would drop other weights)
    grpo.main(flags[:model_at] + [str(folder)] + flags[model_at + 1:] +
              ["--out-dir", str(tmp_path / "eval-mode"), "--steps", "1", "--eval-every", "0", "--beta", "0"])
    (row,) = read_metrics(tmp_path / "eval-mode")
    assert row["rho_mean"] == pytest.approx(1.0, abs=1e-5)


def test_a_prompt_and_response_longer_than_the_model_s_context_are_refused(toy_run, tmp_path):
    runner, d, flags = toy_run
    model = flags[flags.index("--model") + 1]
    with pytest.raises(SystemExit) as stop:
        grpo.main(flags + ["--out-dir", str(tmp_path / "out"), "--steps", "1", "--max-prompt-tokens", "4000",
                           "--max-new-tokens", "97"])
    assert str(stop.value) == ("grpo.py: error: --max-prompt-tokens 4000 + --max-new-tokens 97 = 4097 tokens is more "
                               "than the model's context of 4096 tokens "
                               f"(max_position_embeddings in {os.path.join(model, 'config.json')})")
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")  # refused before the first step


@pytest.mark.slow
def test_cli_runs_logs_and_checkpoints(toy_run, tmp_path):
    # at a temperature other than 1, so that the update's and the reference's log-probs must use it too
    # (else rho != 1 and kl != 0 at step 1)
    runner, d, flags = toy_run
    out = tmp_path / "run"
    r = run_cli(runner, flags + ["--out-dir", str(out), "--steps", "3", "--save-every", "2", "--temperature", "0.7"],
                env={"ROLLOUT_LOG": str(tmp_path / "rollouts.jsonl")})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(out)
    # each step scored its own puzzles, group-major (G = 4 responses per puzzle), and the logged
    # length and zero-advantage share are those of its responses (stop token included in the length)
    train_records, G = cello.read_jsonl(d / "train.jsonl"), 4
    for step, (row, logged) in enumerate(zip(rows[1:], cello.read_jsonl(tmp_path / "rollouts.jsonl"))):
        mine = grpo.step_puzzles(len(train_records), 2 * step, 2, 3)
        assert logged["answers"] == [train_records[i]["answer"] for i in mine]
        assert row["response_length"] == pytest.approx(sum(logged["lengths"]) / len(logged["lengths"]))
        groups = [logged["rewards"][g:g + G] for g in range(0, len(logged["rewards"]), G)]
        assert row["zero_adv_groups"] == sum(len(set(g)) == 1 for g in groups) / len(groups)
        assert row["reward_mean"] == pytest.approx(sum(logged["rewards"]) / len(logged["rewards"]), rel=1e-6)
        assert len(logged["finished"]) == len(logged["rewards"])
        assert row["truncated_frac"] == sum(not f for f in logged["finished"]) / len(logged["finished"])
    assert any(row["truncated_frac"] > 0 for row in rows[1:])  # 12 new tokens cut some responses short
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert "val_batch_accuracy" in rows[0] and "val_cell_accuracy" in rows[2] and "val_count" in rows[3]
    train = rows[1:]
    for key in ("reward_mean", "reward_std", "cell_accuracy", "batch_accuracy", "format_validity", "kl",
                "clip_frac_low", "clip_frac_high", "entropy", "response_length", "zero_adv_groups", "grad_norm",
                "loss",
                "truncated_frac", "time_rollout", "time_reference", "time_update", "tokens_per_s"):
        assert all(math.isfinite(row[key]) for row in train), key
    assert all(row["grad_norm"] > 0 and row["reward_std"] > 0 for row in train)  # the toy reward has a spread
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-9) and train[1]["kl"] > 0  # policy == reference at step 1 only
    assert train[0]["rho_mean"] == pytest.approx(1.0, abs=1e-5)
    assert all(1.0 < row["entropy"] < math.log(1024) + 1e-3 for row in train)
    with open(out / "last" / "config.json") as f:
        assert json.load(f)["model_type"] == "llama"
    model_path = flags[flags.index("--model") + 1]
    assert torch.load(out / "last" / "resume.pt", weights_only=False)["state"] == {
        "step": 3, "consumed": 6, "script": "grpo.py", "model": cello.model_fingerprint(model_path),
        "--train": cello.file_fingerprint(flags[flags.index("--train") + 1]), "--puzzles-per-step": 2,
        "--group-size": 4, "--seed": 3, "--lr": 1e-3, "--weight-decay": 0.0, "--max-prompt-tokens": 2048}
    assert os.path.isfile(out / "final" / "model.safetensors")


@pytest.mark.slow
def test_resume_after_a_kill_continues_at_the_next_step(toy_run, tmp_path):
    runner, d, flags = toy_run
    full, killed = tmp_path / "full", tmp_path / "killed"
    flags = flags + ["--sample-batch", "2"]  # both puzzles of a step in one sampling call
    r = run_cli(runner, flags + ["--out-dir", str(full), "--steps", "4", "--save-every", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    # killed after step 3's metrics line: its checkpoint is from step 2
    r = run_cli(runner, flags + ["--out-dir", str(killed), "--steps", "4", "--save-every", "2"],
                env={"EXIT_AFTER_STEP": "3"})
    assert r.returncode == 137
    assert [row["step"] for row in read_metrics(killed)] == [0, 1, 2, 3]
    r = run_cli(runner, flags + ["--out-dir", str(killed), "--steps", "4", "--save-every", "2", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from step 2" in r.stdout
    resumed = read_metrics(killed)
    assert [row["step"] for row in resumed] == [0, 1, 2, 3, 4]  # step 3 redone once, not duplicated
    # the same data, samples and updates as the uninterrupted run
    for a, b in zip(resumed, read_metrics(full)):
        assert stable(a) == pytest.approx(stable(b), rel=1e-5, abs=1e-7)


def test_logged_lr_is_the_update_s_and_a_fresh_run_refuses_an_old_checkpoint(toy_run, tmp_path):
    runner, d, flags = toy_run
    out = str(tmp_path / "run")
    base = flags + ["--out-dir", out, "--eval-every", "0", "--save-every", "1", "--warmup-steps", "2"]
    grpo.main(base + ["--steps", "2"])  # lr 1e-3 with 2 warm-up steps: half of it, then all of it
    assert [row["lr"] for row in read_metrics(out)] == pytest.approx([5e-4, 1e-3], rel=1e-12)
    with pytest.raises(SystemExit) as stop:  # a later --resume would continue the old run's weights
        grpo.main(base + ["--steps", "2", "--seed", "7"])
    assert str(stop.value).startswith(f"grpo.py: error: --out-dir {out} holds an earlier run's checkpoint (last/)")
    shutil.rmtree(os.path.join(out, "final"))
    os.replace(os.path.join(out, "last"), os.path.join(out, "last.old"))  # a crash between the two renames
    grpo.main(base + ["--steps", "3", "--resume"])
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3] and read_metrics(out)[2]["lr"] == 1e-3
    with pytest.raises(SystemExit) as stop:  # fewer steps than done: final/ must keep step 3's weights
        grpo.main(base + ["--steps", "2", "--resume"])
    assert stop.value.code == (f"grpo.py: error: --resume: {out}/last is at step 3, past this run's 2 steps: nothing "
                               "to train; ask for more with --steps")


def test_weight_decay_and_eval_puzzles_reach_the_run(toy_run, tmp_path):
    """--weight-decay reaches the optimizer (its saved state says so) and --eval-puzzles 2 evaluates 2 of the 3
    val puzzles."""
    runner, d, flags = toy_run
    out = tmp_path / "run"
    grpo.main(flags + ["--out-dir", str(out), "--steps", "1", "--weight-decay", "0.5", "--eval-puzzles", "2"])
    optimizer = torch.load(out / "last" / "optimizer.pt", weights_only=False)
    assert [group["weight_decay"] for group in optimizer["param_groups"]] == [0.5]
    assert [row["val_count"] for row in read_metrics(out) if "val_count" in row] == [2, 2]


def test_resume_without_a_checkpoint_is_a_clear_error(toy_run, tmp_path):
    runner, d, flags = toy_run
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        grpo.main(flags + ["--out-dir", str(tmp_path / "none"), "--resume"])


@pytest.mark.slow
def test_two_process_fsdp2_run_matches_one_process(toy_run, tmp_path):
    """2 ranks (1 puzzle each, FSDP2 over gloo) against 1 process with the same seed. Sampling is seeded
    per puzzle (--sample-batch 1), so the rollouts are the same; the updates differ only by float summation order.
    Tolerance: rollout and eval metrics equal to 1e-6; loss, KL, grad norm within 1e-4 relative.
    The 2-process run uses --activation-checkpointing (shared prompt, replayed layers under FSDP2) and
    is repeated with --per-sequence log-probs instead: same numbers."""
    runner, d, flags = toy_run
    one = tmp_path / "one"
    r = run_cli(runner, flags + ["--out-dir", str(one), "--steps", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows1 = read_metrics(one)
    assert rows1[1]["grad_norm"] > 0
    # the shared-prompt path (default, here checkpointed) and the per-sequence reference path, 2 processes
    for name, extra in (("two", ["--activation-checkpointing"]), ("two-per-sequence", ["--per-sequence"])):
        ref_log = str(tmp_path / f"{name}-ref")
        r = run_cli(runner, flags + ["--out-dir", str(tmp_path / name), "--steps", "3", *extra], nproc=2,
                    env={"REF_LOG": ref_log})
        assert r.returncode == 0, r.stderr[-3000:]
        for rank in (0, 1):  # the frozen reference gives its gathered embedding and head back after each use
            assert open(ref_log + str(rank)).read().splitlines() == ["[]"] * 3
        rows2 = read_metrics(tmp_path / name)
        assert [row["step"] for row in rows2] == [0, 1, 2, 3]
        for a, b in zip(rows1, rows2):
            assert a.keys() == b.keys()
            for key in stable(a):
                tol = dict(rel=1e-4, abs=1e-6) if key in ("loss", "kl", "grad_norm", "clip_frac_low", "clip_frac_high",
                                                             "rho_mean") \
                    else dict(rel=1e-6, abs=1e-6)
                assert b[key] == pytest.approx(a[key], **tol), (name, a["step"], key)


def test_bf16_one_process_step_runs_under_autocast(toy_run, tmp_path, monkeypatch):
    runner, d, flags = toy_run
    real_score = grpo.reward.score
    monkeypatch.setattr(grpo.reward, "score", lambda text, answer, num_tokens=None: {
        **real_score(text, answer, num_tokens), "reward": text.count(" ") / (1 + len(text))})
    # record, in each phase, whether a decoder layer's MLP ran under CPU autocast and in which dtype
    seen = {}

    def watched(phase, real):
        def run(model, *args, **kwargs):
            def hook(module, inputs, output):
                seen.setdefault(phase, set()).add((torch.is_autocast_enabled("cpu"), output.dtype))
            handle = model.model.layers[0].mlp.register_forward_hook(hook)
            try:
                return real(model, *args, **kwargs)
            finally:
                handle.remove()
        return run

    for phase in ("rollout", "reference_logprobs", "policy_update"):
        monkeypatch.setattr(grpo, phase, watched(phase, getattr(grpo, phase)))
    grpo.main(flags + ["--out-dir", str(tmp_path / "bf16"), "--steps", "1", "--eval-every", "0", "--bf16"])
    assert seen == {phase: {(True, torch.bfloat16)} for phase in ("rollout", "reference_logprobs", "policy_update")}
    (row,) = read_metrics(tmp_path / "bf16")
    assert row["grad_norm"] > 0 and math.isfinite(row["loss"])
    # in bf16 the sampler's cached forward and the full forward round differently: rho near 1, not at 1
    # (in float32 the two agree to ~1e-7)
    assert row["rho_mean"] == pytest.approx(1.0, abs=0.05) and abs(row["rho_mean"] - 1.0) > 1e-5
    with open(tmp_path / "bf16" / "final" / "config.json") as f:
        assert json.load(f)["dtype"] == "float32"  # weights stay float32


@pytest.mark.parametrize("mode", grpo.LOSS_AGG_MODES)
def test_micro_batches_and_minibatches_in_the_update(tiny, mode):
    # responses of very different lengths, so that per-micro-batch normalisation would be visibly biased
    records, path = tiny
    tok = cello.load_tokenizer(path)
    prompts = [cello.prompt_ids(tok, r) for r in records[4:6]]
    g = torch.Generator().manual_seed(5)
    lengths = [1, 2, 9, 3, 12, 12, 4, 1]
    responses = [torch.randint(10, len(tok), (n,), generator=g).tolist() for n in lengths]
    base = cello.load_model(path)
    with torch.no_grad():
        logp0, mask = cello.response_logprobs(base, prompts, responses)
    old = logp0 + 0.1 * torch.randn(logp0.shape, generator=g) * mask
    ref = logp0 + 0.1 * torch.randn(logp0.shape, generator=g) * mask
    adv = grpo.group_advantages(T([1.0, 0.0, 0.3, 0.2, -1.0, 0.5, 0.5, 1.0]), 4)
    batch = {"prompts": prompts, "responses": responses, "old_logp": old, "mask": mask, "ref_logp": ref,
             "advantages": adv}
    # the loss as defined on the whole batch, in one piece
    logp = cello.response_logprobs(base, prompts, responses)[0]
    divisor = grpo.loss_divisor(mode, mask.sum(), 8, 16)
    expected, _ = grpo.grpo_loss(logp, old, ref, adv, mask, mode, divisor, beta=0.1)
    models, results = [], []
    for micro in ("1", "2"):
        model = cello.load_model(path)
        args = update_args(path, "--group-size", "4", "--beta", "0.1", "--loss-agg", mode, "--max-new-tokens", "16",
                           "--micro-batch", micro)
        results.append(grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, args))
        models.append(model)
    assert results[0]["loss"] == pytest.approx(expected.item(), abs=1e-6)
    assert results[1]["loss"] == pytest.approx(expected.item(), abs=1e-6)
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-5)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.allclose(p, q, atol=1e-6)
    # --minibatches 2 --mu 2: four optimizer steps, one per minibatch and pass
    model = cello.load_model(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = update_args(path, "--group-size", "4", "--loss-agg", mode, "--minibatches", "2", "--mu", "2")
    grpo.policy_update(model, optimizer, batch, args)
    assert {int(s["step"]) for s in optimizer.state.values()} == {4}


@pytest.mark.parametrize("minibatches", [1, 2, 4])
def test_minibatches_hold_the_same_puzzles_whatever_the_number_of_ranks(minibatches):
    """8 puzzles per step; rank r of K holds positions r * 8/K ... (r + 1) * 8/K - 1 (grpo.main)."""
    for m in range(minibatches):
        expected = set(range(m, 8, minibatches))   # every M-th position of the step, from the m-th
        for world in (1, 2, 4):
            if (8 // world) % minibatches:
                continue  # grpo.main refuses a share that does not split evenly
            share = 8 // world
            positions = {r * share + j for r in range(world) for j in grpo.minibatch_puzzles(share, minibatches, m)}
            assert positions == expected, (world, m)
            # and each rank has an equal part of it
            assert len(grpo.minibatch_puzzles(share, minibatches, m)) == 8 // world // minibatches


def test_pad_rows_masks_padding_only():
    values, mask = grpo.pad_rows([[-1.0, -2.0, -3.0], [-4.0]])
    assert values.tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]]
    assert mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]  # every sampled token (the EOS too) is in the loss


def test_minibatches_do_not_accumulate_each_others_gradients(tiny):
    """--minibatches 2 with the weights held still (SGD, lr 0): each minibatch's gradient norm is that
    minibatch's alone, so the logged mean equals the mean of two one-minibatch updates (a zero_grad
    missing between minibatches would add the first's gradient to the second's)."""
    records, path = tiny
    tok = cello.load_tokenizer(path)
    prompts = [cello.prompt_ids(tok, r) for r in records[:2]]
    g = torch.Generator().manual_seed(7)
    responses = [torch.randint(10, len(tok), (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    model = cello.load_model(path)
    with torch.no_grad():
        old, mask = cello.response_logprobs(model, prompts, responses)
    adv = grpo.group_advantages(T([1.0, 0.0, 0.2, 0.9]), 2)

    def update(rows, puzzles, minibatches):
        batch = {"prompts": [prompts[p] for p in puzzles], "responses": [responses[r] for r in rows],
                 "old_logp": old[rows], "mask": mask[rows], "ref_logp": None, "advantages": adv[rows]}
        args = update_args(path, "--group-size", "2", "--beta", "0", "--minibatches", str(minibatches))
        return grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, args)

    alone = [update([0, 1], [0], 1), update([2, 3], [1], 1)]
    both = update([0, 1, 2, 3], [0, 1], 2)
    assert both["grad_norm"] == pytest.approx(sum(m["grad_norm"] for m in alone) / 2, rel=1e-5)
    # the logged loss is the mean of the two minibatches' losses (each over its own tokens), not the last one's
    assert alone[0]["loss"] != pytest.approx(alone[1]["loss"], rel=1e-3)
    assert both["loss"] == pytest.approx(sum(m["loss"] for m in alone) / 2, rel=1e-5)


def test_rollout_samples_from_a_generator_seeded_by_seed_step_and_position(tiny):
    records, path = tiny
    tok = cello.load_tokenizer(path)
    model = cello.load_model(path)
    prompts = [cello.prompt_ids(tok, records[0])]
    args = update_args(path, "--group-size", "4", "--max-new-tokens", "6", "--sample-batch", "1")
    step5 = grpo.rollout(model, prompts, 5, 0, args, tok.eos_token_id, tok.pad_token_id, "cpu")
    step6 = grpo.rollout(model, prompts, 6, 0, args, tok.eos_token_id, tok.pad_token_id, "cpu")
    assert step5["responses"] != step6["responses"]
    direct = cello.sample(model, prompts, 4, 6, tok.eos_token_id, tok.pad_token_id,
                          generator=torch.Generator().manual_seed(grpo.sample_seed(args.seed, 5, 0)))
    assert step5 == direct
    # the same puzzle twice in a step: the second group draws from its own position's stream
    twice = grpo.rollout(model, prompts * 2, 5, 0, args, tok.eos_token_id, tok.pad_token_id, "cpu")
    assert twice["responses"][:4] == step5["responses"] and twice["responses"][4:] != step5["responses"]
    # a rank whose share starts at position 1 of the step draws what position 1 draws in one process
    second = grpo.rollout(model, prompts, 5, 1, args, tok.eos_token_id, tok.pad_token_id, "cpu")
    assert second["responses"] == twice["responses"][4:]
    assert len({grpo.sample_seed(s, t, p) for s in (0, 1) for t in (5, 6) for p in (0, 1)}) == 8
    assert grpo.sample_seed(1, 5, 2) == (1_000_003 + 5) * 100_003 + 2  # small seeds: the formula itself
    # reduced mod 2^63: 123456789012345678 * 1_000_003 * 100_003 mod 2^64 is 2^63 more than this
    assert grpo.sample_seed(123456789012345678, 0, 0) == 8046345431548476030
    # the largest --seed still gives a seed torch's generators take (unreduced, it overflowed them)
    torch.Generator().manual_seed(grpo.sample_seed(2**63 - 1, 10**6, 10**3))


def test_the_update_scores_responses_under_the_sampling_temperature(tiny):
    """Sampled at T = 0.7, the update's log-probs must be of logits / 0.7 too: then rho is 1 to float
    rounding (under T = 1 it would be off everywhere, a silent bias)."""
    records, path = tiny
    tok = cello.load_tokenizer(path)
    model = cello.load_model(path)
    prompts = [cello.prompt_ids(tok, r) for r in records[:2]]
    args = update_args(path, "--group-size", "4", "--max-new-tokens", "8", "--temperature", "0.7", "--beta", "0")
    out = grpo.rollout(model, prompts, 0, 0, args, tok.eos_token_id, tok.pad_token_id, "cpu")
    old, mask = grpo.pad_rows(out["logprobs"])
    batch = {"prompts": prompts, "responses": out["responses"], "old_logp": old, "mask": mask, "ref_logp": None,
             "advantages": grpo.group_advantages(T([1.0, 0.0, 0.5, 0.2, 0.3, 0.9, 0.1, 0.0]), 4)}
    result = grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, args)
    assert result["rho_mean"] == pytest.approx(1.0, abs=1e-5)
    assert result["clip_frac_low"] == 0.0 and result["clip_frac_high"] == 0.0


def test_score_rollout_pairs_each_group_with_its_puzzle(tiny):
    """Responses are group-major: with G = 2, responses 0-1 answer puzzle 0 and 2-3 puzzle 1."""
    _, path = tiny
    answers = [["A", "B"], ["B", "A"]]
    texts = ["<think>x</think>\n<answer>A | B</answer>",   # puzzle 0, right: 1.0
             "<answer>A | B</answer>",                      # malformed (no think): -1.0
             "<think>x</think>\n<answer>A | B</answer>",   # puzzle 1 (gold B | A), no cell right: 0.0
             "<think>x</think>\n<answer>B | A</answer>"]   # puzzle 1, right: 1.0
    scores, advantages = grpo.score_rollout(texts, [5, 6, 7, 8], answers, update_args(path, "--group-size", "2"))
    assert [s["reward"] for s in scores] == [1.0, -1.0, 0.0, 1.0]
    assert [s["num_tokens"] for s in scores] == [5, 6, 7, 8]
    # unbiased std of a pair (a, b) is |a - b| / sqrt(2): each advantage is +-1 / sqrt(2) (less eps)
    expected = [1 / math.sqrt(2) * sign for sign in (1, -1, -1, 1)]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-5)
    _, advantages = grpo.score_rollout(texts, [5, 6, 7, 8], answers,
                                       update_args(path, "--group-size", "2", "--no-std-scaling"))
    assert advantages.tolist() == [1.0, -1.0, -0.5, 0.5]  # Dr. GRPO: r - mean(group)


def test_evaluate_scores_each_val_puzzle_once_greedily_and_ranks_make_equal_calls(tiny, monkeypatch):
    """Greedy (T = 0) responses to the val puzzles, scored with their lengths. Rank r of K takes puzzles
    r, r + K, ...; a short shard repeats its last puzzle so that every rank makes as many sampling calls
    (FSDP2's collectives must match), and the repeat is not scored. (One process here: the gathered
    scores are the rank's own.)"""
    records, path = tiny
    tok = cello.load_tokenizer(path)
    model = cello.load_model(path)
    val = records[:3]
    ids, stop = [cello.prompt_ids(tok, r) for r in val], cello.stop_token_ids(path, tok)
    greedy = cello.sample(model, ids, 1, 6, stop, tok.pad_token_id, temperature=0.0)["responses"]
    scores = [grpo.reward.score(cello.response_text(tok, response, stop), record["answer"],
                                num_tokens=len(response)) for record, response in zip(val, greedy)]

    def expected(puzzles):
        m = grpo.reward.metrics([scores[i] for i in puzzles])
        return {f"val_{k}": m[k] for k in ("cell_accuracy", "batch_accuracy", "format_validity", "uniqueness",
                                           "mean_reward", "mean_length", "count")}

    calls = []
    real = cello.sample
    monkeypatch.setattr(cello, "sample", lambda m, prompts, n, *a, **k: calls.append((prompts, n, k["temperature"]))
                        or real(m, prompts, n, *a, **k))
    args = update_args(path, "--max-new-tokens", "6", "--eval-batch", "2")
    assert grpo.evaluate(model, tok, stop, val, args, 0, 1) == expected([0, 1, 2])
    assert expected([0, 1, 2])["val_mean_length"] == sum(map(len, greedy)) / 3
    assert calls == [([ids[0], ids[1]], 1, 0.0), ([ids[2]], 1, 0.0)]
    # 2 ranks, one puzzle per call: rank 0 holds puzzles 0 and 2; rank 1 puzzle 1, then its repeat
    args = update_args(path, "--max-new-tokens", "6", "--eval-batch", "1")
    for rank, puzzles, sampled in ((0, [0, 2], [0, 2]), (1, [1], [1, 1])):
        calls.clear()
        assert grpo.evaluate(model, tok, stop, val, args, rank, 2) == expected(puzzles)
        assert calls == [([ids[i]], 1, 0.0) for i in sampled]


def test_policy_update_applies_the_clip_flags_and_reports_the_per_token_kl(tiny):
    """rho and ref are set by hand: rho = 1.5 on the response with A > 0 (3 tokens; inside 1 + clip_high
    = 1.6, outside the default 1.2) and 0.7 on the one with A < 0 (1 token and padding; below 1 - clip_low
    = 0.8); ref = logp + 0.1 on every token, so k3 = exp(0.1) - 0.1 - 1 per token. The metrics are per
    response token: padding and the number of update passes (--mu) must not enter them."""
    records, path = tiny
    tok = cello.load_tokenizer(path)
    model = cello.load_model(path)
    prompts = [cello.prompt_ids(tok, records[6])]
    responses = [[100, 101, 102], [103]]
    with torch.no_grad():
        logp, mask = cello.response_logprobs(model, prompts, responses)
    assert mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    old = logp - torch.tensor([[math.log(1.5)], [math.log(0.7)]])
    batch = {"prompts": prompts, "responses": responses, "old_logp": old, "mask": mask, "ref_logp": logp + 0.1,
             "advantages": T([1.0, -1.0])}
    for mu in ("1", "2"):
        args = update_args(path, "--group-size", "2", "--clip-low", "0.2", "--clip-high", "0.6", "--mu", mu)
        metrics = grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, args)
        assert metrics["clip_frac_high"] == 0.0 and metrics["clip_frac_low"] == 0.25  # 1 of the 4 tokens
        assert metrics["rho_mean"] == pytest.approx((3 * 1.5 + 0.7) / 4, rel=1e-5)
        assert metrics["kl"] == pytest.approx(math.exp(0.1) - 0.1 - 1, rel=1e-4)
    args = update_args(path, "--group-size", "2")  # symmetric 0.2: now 1.5 is clipped too
    metrics = grpo.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, args)
    assert metrics["clip_frac_high"] == 0.75 and metrics["clip_frac_low"] == 0.25


def test_eos_is_a_trained_token(tiny):
    # same first token; the rewarded response stops (EOS), the other goes on: stopping is learnt
    records, path = tiny
    tok = cello.load_tokenizer(path)
    model = cello.load_model(path)
    prompts = [cello.prompt_ids(tok, records[6])]
    x, y, eos = 100, 101, tok.eos_token_id
    responses = [[x, eos], [x, y]]

    def logp_eos():
        with torch.no_grad():
            return cello.response_logprobs(model, prompts, [[x, eos]])[0][0, 1].item()

    with torch.no_grad():
        old, mask = cello.response_logprobs(model, prompts, responses)
    assert mask.tolist() == [[1.0, 1.0], [1.0, 1.0]]  # EOS is a response token, not padding
    batch = {"prompts": prompts, "responses": responses, "old_logp": old, "mask": mask, "ref_logp": None,
             "advantages": grpo.group_advantages(T([1.0, 0.0]), 2)}
    before = logp_eos()
    args = update_args(path, "--group-size", "2", "--beta", "0")
    grpo.policy_update(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batch, args)
    assert logp_eos() > before + 0.1


def test_resume_with_another_starting_model_is_refused_a_moved_one_is_not(toy_run, tmp_path):
    """The reference model is rebuilt from --model on resume: another model would change it silently.
    The model is known by its content, so a run whose folders moved still resumes. So are the train
    puzzles; another step size or seed is refused too."""
    runner, d, flags = toy_run
    model_at = flags.index("--model") + 1

    def with_model(path):
        return flags[:model_at] + [path] + flags[model_at + 1:]

    out = str(tmp_path / "run")
    grpo.main(flags + ["--out-dir", out, "--steps", "1", "--eval-every", "0"])
    other = cello.build_model("tiny", str(tmp_path / "other"), cello.read_jsonl(d / "train.jsonl"), seed=1)
    with pytest.raises(SystemExit) as stop:
        grpo.main(with_model(other) + ["--out-dir", out, "--steps", "2", "--eval-every", "0", "--resume"])
    assert stop.value.code == (f"cello: error: --resume: {out}/last was saved with model "
                               f"{cello.model_fingerprint(flags[model_at])}, this run has {cello.model_fingerprint(other)}: "
                               "resume with the run's own flags, or start afresh in another --out-dir")
    # without a reference (--beta 0) too: the tokenizer and the prompts' ids come from --model
    grpo.main(flags + ["--beta", "0", "--out-dir", out + "-beta0", "--steps", "1", "--eval-every", "0"])
    with pytest.raises(SystemExit) as stop:
        grpo.main(with_model(other) + ["--beta", "0", "--out-dir", out + "-beta0", "--steps", "2", "--eval-every", "0",
                                       "--resume"])
    assert stop.value.code.startswith(f"cello: error: --resume: {out}-beta0/last was saved with model ")
    # the data position and the sampling seeds belong to the run's puzzles, step size and seed
    train_at = flags.index("--train") + 1
    fewer = tmp_path / "fewer.jsonl"
    cello.write_jsonl_atomic(str(fewer), cello.read_jsonl(flags[train_at])[:-1])
    for changed, key in ((["--group-size", "2"], "--group-size 4, this run has 2"),
                         (["--lr", "2e-3"], "--lr 0.001, this run has 0.002"),  # the optimizer state keeps its own
                         (["--max-prompt-tokens", "3000"], "--max-prompt-tokens 2048, this run has 3000"),  # which are kept
                         (["--train", str(fewer)], "--train " + cello.file_fingerprint(flags[train_at]))):
        with pytest.raises(SystemExit) as stop:
            grpo.main(flags + changed + ["--out-dir", out, "--steps", "2", "--eval-every", "0", "--resume"])
        assert f"{out}/last was saved with {key}" in stop.value.code
    with pytest.raises(SystemExit) as stop:  # a preset name: the run would look for the folder it built
        grpo.main(with_model("tiny") + ["--out-dir", out, "--steps", "2", "--eval-every", "0", "--resume"])
    assert stop.value.code == (f"grpo.py: error: --resume --model tiny: {out} holds no tiny-init folder: this run "
                               "was started from another --model")
    moved = shutil.copytree(flags[model_at], tmp_path / "moved-model")
    shutil.copytree(out, tmp_path / "moved-run")
    moved_train = shutil.copy(flags[train_at], tmp_path / "moved-train.jsonl")  # the same puzzles elsewhere
    grpo.main(with_model(str(moved)) + ["--out-dir", str(tmp_path / "moved-run"), "--steps", "2", "--eval-every", "0",
                                        "--resume", "--train", str(moved_train)])
    assert [row["step"] for row in read_metrics(tmp_path / "moved-run")] == [1, 2]


def test_beta_zero_builds_no_reference_model(toy_run, tmp_path, monkeypatch):
    runner, d, flags = toy_run
    loaded = []
    real_load = cello.load_model
    monkeypatch.setattr(cello, "load_model", lambda *a, **k: loaded.append(a[0]) or real_load(*a, **k))
    grpo.main(flags + ["--out-dir", str(tmp_path / "b0"), "--steps", "1", "--eval-every", "0", "--beta", "0"])
    assert len(loaded) == 1  # the policy only
    (row,) = read_metrics(tmp_path / "b0")
    assert row["kl"] is None  # no reference: not measured (0.0 would claim the policy had not moved)
    loaded.clear()
    grpo.main(flags + ["--out-dir", str(tmp_path / "b1"), "--steps", "1", "--eval-every", "0"])
    assert len(loaded) == 2  # policy and reference


def test_a_step_that_does_not_split_over_ranks_or_minibatches_is_refused_before_any_work(toy_run, tmp_path,
                                                                                          monkeypatch):
    runner, d, flags = toy_run
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        grpo.main(flags + ["--out-dir", str(out), "--puzzles-per-step", "4", "--minibatches", "3"])
    assert stop.value.code == "grpo.py: error: each rank's 4 puzzles per step must split evenly into --minibatches 3"
    monkeypatch.setattr(cello, "setup_distributed", lambda: (0, 3, torch.device("cpu")))  # as under torchrun, 3 ranks
    with pytest.raises(SystemExit) as stop:
        grpo.main(flags + ["--out-dir", str(out), "--puzzles-per-step", "4"])
    assert stop.value.code == "grpo.py: error: --puzzles-per-step 4 must be a multiple of the number of processes (3)"
    with pytest.raises(SystemExit) as stop:  # 6 puzzles split into 3 minibatches, but each rank's 2 do not
        grpo.main(flags + ["--out-dir", str(out), "--puzzles-per-step", "6", "--minibatches", "3"])
    assert stop.value.code == "grpo.py: error: each rank's 2 puzzles per step must split evenly into --minibatches 3"
    assert not out.exists()


def test_max_prompt_tokens_keeps_a_prompt_of_exactly_that_length(toy_run, tmp_path):
    runner, d, flags = toy_run
    tok = cello.load_tokenizer(flags[flags.index("--model") + 1])
    train = make_records(3) + [{**r, "id": f"long/{k}"} for k, r in enumerate(make_records(2, n=4, seed=2))]
    cello.write_jsonl_atomic(str(tmp_path / "train.jsonl"), train)
    flags = flags + ["--train", str(tmp_path / "train.jsonl")]
    lengths = [len(cello.prompt_ids(tok, r)) for r in train]
    shortest = min(lengths)
    assert lengths.count(shortest) == 3  # the 3-cell puzzles; the 4-cell ones are longer
    out = tmp_path / "run"
    grpo.main(flags + ["--out-dir", str(out), "--steps", "1", "--eval-every", "0", "--beta", "0",
                       "--max-prompt-tokens", str(shortest)])
    assert cello.read_json(out / "args.json")["train_puzzles"] == 3
    with pytest.raises(SystemExit) as stop:
        grpo.main(flags + ["--out-dir", str(tmp_path / "none"), "--steps", "1",
                           "--max-prompt-tokens", str(shortest - 1)])
    assert stop.value.code == ("grpo.py: error: every --train puzzle's prompt is longer than --max-prompt-tokens "
                               f"{shortest - 1} (shortest: {shortest} tokens)")


def test_each_rank_samples_its_own_block_of_each_step_s_puzzles(toy_run, tmp_path, monkeypatch):
    """Rank r of K samples positions r * P/K ... (r + 1) * P/K - 1 of each step's puzzles (with those
    positions' sampling seeds), and the data position moves on by all P puzzles a step. Here rank 1 of
    2 with P = 4, through a stand-in setup_distributed (the 2-process test has one puzzle per rank)."""
    runner, d, flags = toy_run
    tok = cello.load_tokenizer(flags[flags.index("--model") + 1])
    train = cello.read_jsonl(d / "train.jsonl")
    monkeypatch.setattr(cello, "setup_distributed", lambda: (1, 2, torch.device("cpu")))
    seen = []
    real = grpo.rollout
    monkeypatch.setattr(grpo, "rollout", lambda model, prompts, step, first, *a: seen.append((prompts, step, first))
                        or real(model, prompts, step, first, *a))
    grpo.main(flags + ["--out-dir", str(tmp_path / "rank1"), "--steps", "2", "--eval-every", "0", "--beta", "0",
                       "--puzzles-per-step", "4"])
    shares = [grpo.step_puzzles(len(train), 4 * step, 4, 3)[2:] for step in (0, 1)]  # positions 2 and 3
    assert seen == [([cello.prompt_ids(tok, train[i]) for i in share], step, 2) for step, share in enumerate(shares)]


def test_a_metrics_row_is_computed_from_its_step_s_rollout(toy_run, tmp_path, monkeypatch):
    """Every key of a step's line, against the rollout it logged: the rewards' mean and unbiased std,
    groups of equal rewards, lengths, truncation, the Monte-Carlo entropy, the step's time split."""
    runner, d, flags = toy_run
    train = cello.read_jsonl(d / "train.jsonl")
    flat = train[grpo.step_puzzles(len(train), 0, 2, 3)[0]]["answer"]  # step 1's first puzzle: 4 equal rewards
    real_score = grpo.reward.score
    monkeypatch.setattr(grpo.reward, "score", lambda text, answer, num_tokens=None: {
        **real_score(text, answer, num_tokens),
        "reward": 0.25 if answer == flat else text.count(" ") / (1 + len(text))})
    seen = {}
    rollout, score_rollout = grpo.rollout, grpo.score_rollout
    monkeypatch.setattr(grpo, "rollout", lambda *a: seen.setdefault("out", rollout(*a)))
    monkeypatch.setattr(grpo, "score_rollout", lambda *a: seen.setdefault("scored", score_rollout(*a)))
    grpo.main(flags + ["--out-dir", str(tmp_path / "run"), "--steps", "1", "--eval-every", "0"])
    (row,) = read_metrics(tmp_path / "run")
    assert set(row) == {"step", "reward_mean", "reward_std", "cell_accuracy", "batch_accuracy", "format_validity",
                        "loss", "grad_norm", "clip_frac_low", "clip_frac_high", "rho_mean", "kl", "entropy",
                        "response_length", "truncated_frac", "zero_adv_groups", "lr", "time_rollout", "time_reference",
                        "time_update", "time_step", "tokens_per_s"}
    out, scores = seen["out"], seen["scored"][0]
    rewards, lengths = [s["reward"] for s in scores], [len(r) for r in out["responses"]]
    assert rewards[:4] == [0.25] * 4 and len(set(rewards[4:])) > 1
    assert row["step"] == 1 and row["lr"] == 1e-3
    assert row["reward_mean"] == pytest.approx(statistics.mean(rewards), rel=1e-6)
    assert row["reward_std"] == pytest.approx(statistics.stdev(rewards), rel=1e-5)  # unbiased (n - 1)
    m = grpo.reward.metrics(scores)
    assert [row[k] for k in ("cell_accuracy", "batch_accuracy", "format_validity")] == \
        [m[k] for k in ("cell_accuracy", "batch_accuracy", "format_validity")]
    assert row["zero_adv_groups"] == 0.5  # of the two groups of 4, the first
    assert row["response_length"] == sum(lengths) / 8
    assert row["truncated_frac"] == sum(not f for f in out["finished"]) / 8
    assert row["entropy"] == pytest.approx(-sum(map(sum, out["logprobs"])) / sum(lengths), rel=1e-5)
    assert row["time_reference"] > 1e-4
    assert row["time_step"] == pytest.approx(row["time_rollout"] + row["time_reference"] + row["time_update"], abs=1e-5)
    assert row["tokens_per_s"] == pytest.approx(sum(lengths) / row["time_step"], rel=1e-9)


def test_a_preset_model_is_built_into_the_run_and_reused_on_resume(toy_run, tmp_path):
    runner, d, flags = toy_run
    model_at = flags.index("--model") + 1
    preset = flags[:model_at] + ["tiny"] + flags[model_at + 1:]
    out = tmp_path / "run"
    grpo.main(preset + ["--out-dir", str(out), "--steps", "1", "--eval-every", "0", "--beta", "0"])
    fingerprint = cello.model_fingerprint(str(out / "tiny-init"))
    grpo.main(preset + ["--out-dir", str(out), "--steps", "2", "--eval-every", "0", "--beta", "0", "--resume"])
    assert cello.model_fingerprint(str(out / "tiny-init")) == fingerprint
    assert [row["step"] for row in read_metrics(out)] == [1, 2]


@pytest.mark.slow
def test_bench_grpo_runs_the_demo_and_issue_configs(toy_run, tmp_path):
    # the benchmark reads the demo's P, G and --max-new-tokens from cello.demo_stages; when those
    # stages changed, --configs demo crashed unnoticed until a GPU session ran it
    _, d, _ = toy_run
    done = run_cli(os.path.join(ROOT, "bench_grpo.py"), [
        "--model", "tiny", "--data", str(d / "train.jsonl"), "--work-dir", str(tmp_path), "--configs", "demo,issue",
        "--repeats", "1", "--issue-prompt-len", "40", "--issue-new-tokens", "4"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[demo] P=4 G=8" in done.stdout and "240 new tokens per response" in done.stdout
    assert "[issue] P=2 G=8" in done.stdout and done.stdout.count("ratio shared / per-seq step time") == 2
