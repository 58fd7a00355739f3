"""grpo.py: Group Relative Policy Optimization (GRPO) on CellPuzzles, written out in full.

GRPO trains a language model with a rule-based reward and no critic. One step:
  1. rollout    P puzzles; the current policy samples G responses to each (temperature 1.0).
  2. reward     reward.score of each response (SPEC.md: -1 if malformed, else (c/N + [c == N]) / 2).
  3. advantage  within each puzzle's group of G: A_i = (r_i - mean(r)) / (std(r) + 1e-6). The group
                is its own baseline: a response is pushed up exactly when it beats its siblings.
  4. reference  log-probs of the responses under the frozen starting model, for the KL penalty.
  5. update     mu passes over the rollout in minibatches, each one AdamW step on
                loss = clipped surrogate + beta * k3 KL, averaged over all response tokens
                (the default --loss-agg token-mean).

Run (1 process, or K processes with FSDP2; each rank samples P / K of the puzzles of a step):
    python grpo.py --model runs/sft/final --train train.jsonl --val val.jsonl --out-dir runs/grpo
    torchrun --nproc_per_node 2 grpo.py --model runs/sft/final --train train.jsonl --val val.jsonl --out-dir runs/grpo
    python grpo.py ... --resume        # continue from --out-dir/last at the next step (same flags)
Outputs in --out-dir: metrics.jsonl (one line per step, val_* keys on evaluation steps, a step-0 line
with the starting policy's val metrics), last/ (checkpoint every --save-every steps: Hugging Face
folder plus resume.pt and optimizer.pt), final/ (the trained policy), args.json, and <preset>-init/
when --model names a preset.

Metrics (all ranks together): reward_mean/std, cell/batch accuracy and format_validity of the
samples; loss; grad_norm (before clipping); kl (mean k3 per token; null with --beta 0, where there
is no reference to measure it against); clip_frac_low and clip_frac_high (shares of tokens whose
clipped branch was taken below 1 - clip_low, with A < 0, and above 1 + clip_high, with A > 0);
rho_mean; entropy; response_length; truncated_frac; zero_adv_groups (groups whose G rewards are all
equal: they give no policy gradient); time_rollout (sampling and scoring), time_reference,
time_update, time_step (seconds); lr (the rate this step's update used).
Why the loss is about 0 while the model learns: with mu = 1 the ratio is 1, so the policy loss is
-sum_i A_i n_i / (all tokens) (n_i = length of response i), and the advantages of a group sum to 0:
the value is near 0 (exactly 0 for equal lengths), plus beta * KL. Its gradient,
-sum_i A_i * grad log p(response i) / (all tokens), is not 0: watch grad_norm. When zero_adv_groups
is 1.0 the policy gradient really is 0 (only the KL term acts): every group got equal rewards (all
malformed, or all right).

The defaults are the CPU demo's recipe (`python cello.py demo`): the "small" preset after SFT on the
demo's puzzles (N 4-6 cells, ~330-400-token prompts, expert-style responses of ~125-195 tokens), P = 4
puzzles x G = 8 responses per step, a 240-token budget, lr 1e-4, 50 steps. On the 2-core machine:
~2-2.5 s per step from the demo's SFT model (rollout 1.0-1.4, reference 0.2-0.3, update 0.65-0.75;
BENCHMARKS.md), about 2 minutes in all with its evaluations (up to 3 s a step in the slowest hours
seen); README has what it does to the test puzzles. On a machine busy with other jobs, set
OMP_NUM_THREADS=1 (threads spin-waiting for a busy core slow a rollout); floats then sum in another
order, so the samples, and the results, differ from 2 threads'.
The paper's 7B run (Qwen2.5-7B-Instruct after SFT; 8 GPUs; one pass over the 6,912 released train
puzzles is 108 steps):
    torchrun --nproc_per_node 8 grpo.py --model runs/sft-7b/final --train train.jsonl --val val.jsonl \\
        --out-dir runs/grpo-7b --puzzles-per-step 64 --group-size 5 --max-prompt-tokens 3072 \\
        --max-new-tokens 3000 --lr 1e-6 --beta 0.001 --bf16 --activation-checkpointing \\
        --micro-batch 1 --sample-batch 8 --eval-batch 8 --steps 108 --eval-every 20 --save-every 10

Choices this file makes (each is tested in tests/test_grpo.py):
- Group std is the unbiased (Bessel, ddof 1) std, as TRL and verl compute it. A group of one has no
  spread and no baseline: its advantage is defined as 0 (it teaches nothing). --no-std-scaling drops
  the division (Dr. GRPO): A_i = r_i - mean(r).
- The importance ratio uses the sampler's log-probs as the old policy (logits / T, the distribution
  that was sampled). With mu = 1 and one minibatch the policy has not moved yet, so rho is 1 up to
  the float difference between the sampler's cached forward and the full forward; for mu > 1 or
  several minibatches it is the true ratio against the sampling policy.
- Truncated responses (no EOS within --max-new-tokens) are kept in the loss with their reward, as
  the paper's plain recipe does (DAPO masks them instead). Most lack a closing </answer> and score -1
  as malformed, which teaches the model to finish in budget; one cut off just after </answer>, before
  its EOS, holds the whole answer and is scored like any other. EOS is a trained token: a finished
  response includes it and its log-prob is in the loss. Padding never enters the loss (torch.where
  on the mask, so even NaN in padded positions cannot leak).
- "entropy" in the metrics is the Monte-Carlo estimate mean(-log p) of the sampled tokens under the
  sampling distribution, not the full-vocabulary entropy (that would need the [B, T, V] logits).
- tokens_per_s is response tokens sampled in the step (all ranks) / wall time of the whole step.
- --bf16: under FSDP2, bf16 compute with float32 master weights (cello.shard_model's policy); with
  one process, torch.autocast to bf16 around every forward (weights and optimizer stay float32).
- --activation-checkpointing runs the policy in train mode (Hugging Face checkpoints only there; the
  model must have no dropout, so it is the same function as in eval mode) and recomputes each decoder
  layer in backward, the shared prompt's replay-safe cache included. A 7B model at the paper's
  lengths needs it (BENCHMARKS.md: bench_core.py --parts scale on an H100).
- Sampling randomness comes from generators seeded by (seed, step, puzzle position in the step), one
  per sampling call of --sample-batch puzzles: a resumed run repeats exactly what the uninterrupted
  run would have done, and with --sample-batch 1 (or any divisor of each rank's share) K processes
  sample exactly what 1 process samples in float32 (with --bf16 they differ: one process autocasts,
  FSDP2 casts the weights).
"""
import argparse
import math
import os
import sys
import time

import torch
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import cello
import reward

ADV_EPS = 1e-6  # the paper's eps in (r - mean) / (std + eps)
LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps exp() finite in the ratio and in k3 (verl's bound)
LOSS_AGG_MODES = ("token-mean", "seq-mean", "token-sum")


# ---------------------------------------------------------------------------------------------
# The math: pure functions on tensors
# ---------------------------------------------------------------------------------------------
# Shapes: R responses (group-major: puzzle p's G responses are rows p*G .. p*G+G-1), L = longest
# response in the batch. mask [R, L] is 1.0 on response tokens (EOS included) and 0.0 on padding.

def group_advantages(rewards, group_size, scale_by_std=True, eps=ADV_EPS):
    """Group-normalised advantage of each response.

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)     (scale_by_std, the paper's GRPO)
        A_i =  r_i - mean(r_group)                             (Dr. GRPO: no std division)

    std is the unbiased std (divides by G - 1). A group of one has no spread: A = 0 by definition.
    A group whose rewards are all equal gets A = 0 exactly (no learning signal from it).
    rewards: [R] float tensor, R a multiple of group_size. Returns [R].
    """
    r = rewards.view(-1, group_size).to(torch.float64)  # [P, G]; float64 so that equal rewards give exactly 0
    centred = r - r.mean(dim=1, keepdim=True)  # [P, G]
    if scale_by_std and group_size > 1:  # a group of one is centred to 0 already (its std would be NaN)
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.view(-1).to(rewards.dtype)


def zero_advantage_share(rewards, group_size):
    """Share of groups whose rewards are all equal, so all their advantages are 0 (no policy gradient).

    Read from group_advantages (float64): the float32 std of eight rewards of 0.3 is ~1e-8, not 0.
    rewards: [R] float tensor, R a multiple of group_size. Returns a float in [0, 1].
    """
    return (group_advantages(rewards, group_size).view(-1, group_size) == 0).all(dim=1).float().mean().item()


def clipped_surrogate(logp, old_logp, advantages, clip_low=0.2, clip_high=0.2):
    """PPO's clipped surrogate per token, to be minimised.

        rho  = exp(clamp(logp - old_logp, -20, 20))
        loss = -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)

    A token whose clipped branch is the minimum (rho left the trust region in the direction A
    favours) has zero gradient. logp, old_logp: [R, L]; advantages: [R] (one per response, broadcast
    over its tokens). Returns (loss [R, L], rho [R, L], clipped [R, L] bool: the clipped branch was taken).
    """
    rho = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [R, L]
    adv = advantages.unsqueeze(1)  # [R, 1]
    unclipped_obj = rho * adv  # [R, L]
    clipped_obj = torch.clamp(rho, 1.0 - clip_low, 1.0 + clip_high) * adv  # [R, L]
    return -torch.minimum(unclipped_obj, clipped_obj), rho, clipped_obj < unclipped_obj


def kl_k3(logp, ref_logp):
    """The "k3" estimator of KL(policy || reference) per sampled token (Schulman 2020):

        d = clamp(ref_logp - logp, -20, 20);   k3 = exp(d) - d - 1   (>= 0, low variance)

    Its mean is an unbiased estimate of the KL when the tokens were sampled from the policy itself
    (true for a step's first update: with mu = 1 and one minibatch, the rollout's policy is the one
    being updated; later minibatches update a policy that has moved). logp, ref_logp: [R, L].
    Returns [R, L]. Equal log-probs give exactly 0.
    """
    d = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [R, L]
    return torch.exp(d) - d - 1.0


def loss_divisor(mode, num_tokens, num_sequences, max_new_tokens):
    """The constant the summed per-token loss is divided by, for each aggregation mode.

        token-mean: number of valid response tokens in the whole batch (all micro-batches, all ranks)
        seq-mean:   number of sequences in the whole batch (each sequence is first averaged over its tokens)
        token-sum:  num_sequences * max_new_tokens, a constant (Dr. GRPO): long and short responses
                    weigh each of their tokens the same, and the scale does not depend on lengths.
    num_tokens and num_sequences must already be summed over micro-batches and ranks.
    """
    if mode == "token-mean":
        return max(float(num_tokens), 1.0)
    if mode == "seq-mean":
        return max(float(num_sequences), 1.0)
    if mode == "token-sum":
        return float(num_sequences * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGG_MODES}")


def aggregate_loss(per_token, mask, mode, divisor):
    """Reduce a per-token loss [R, L] to a scalar; padding (mask 0) never contributes.

        token-mean, token-sum:  sum_{r,t} mask * loss / divisor
        seq-mean:               sum_r (sum_t mask * loss / sum_t mask) / divisor
    divisor comes from loss_divisor, computed over the whole batch, so that summing this over the
    micro-batches (and ranks) of a batch gives the batch's loss exactly.
    """
    valid = mask > 0
    masked = torch.where(valid, per_token, torch.zeros_like(per_token))  # where, not *: NaN in padding stays out
    if mode == "seq-mean":
        per_seq = masked.sum(dim=1) / valid.sum(dim=1).clamp(min=1)  # [R]
        return per_seq.sum() / divisor
    if mode in ("token-mean", "token-sum"):
        return masked.sum() / divisor
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGG_MODES}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, mode, divisor, clip_low=0.2, clip_high=0.2, beta=0.0):
    """The GRPO loss of a micro-batch: aggregate(clipped_surrogate + beta * k3(logp, ref_logp)).

    logp (with gradients), old_logp, ref_logp, mask: [R, L]; advantages: [R]; ref_logp may be None
    when beta is 0. Returns (loss scalar, stats) where stats holds sums over the valid tokens,
    detached, for the metrics: tokens, clipped_low / clipped_high (tokens whose clipped branch was
    taken with rho below 1 - clip_low / above 1 + clip_high), kl, rho.
    """
    valid = mask > 0
    # Whatever sits in padded positions (0, junk, NaN) is replaced before any arithmetic, so neither
    # the loss nor any gradient can see it (0 * NaN would be NaN in backward).
    zero = torch.zeros_like(logp)
    logp = torch.where(valid, logp, zero)
    old_logp = torch.where(valid, old_logp, zero)
    ref_logp = torch.where(valid, ref_logp, zero) if ref_logp is not None else None
    per_token, rho, was_clipped = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, mask, mode, divisor)
    stats = {"tokens": valid.sum().item(),
             "clipped_low": (was_clipped & valid & (rho < 1)).sum().item(),
             "clipped_high": (was_clipped & valid & (rho > 1)).sum().item(),
             "kl": torch.where(valid, kl, zero).sum().item(),
             "rho": torch.where(valid, rho, zero).sum().item()}
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="GRPO on CellPuzzles (see the module docstring).",
                                     formatter_class=cello.HelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--train", required=True, help="puzzles JSONL to train on (records with cells, candidates, answer)")
    g.add_argument("--val", default=None, help="puzzles JSONL for greedy evaluation (optional)")
    g.add_argument("--max-prompt-tokens", type=int, default=2048,
                   help="skip training puzzles whose chat prompt is longer than this many tokens (paper: 3072)")
    g.add_argument("--eval-puzzles", type=int, default=0, help="evaluate on the first this many val puzzles (0: all)")
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="starting policy: a Hugging Face folder (the SFT checkpoint) or a preset name (tiny, small)")
    g.add_argument("--bf16", action="store_true",
                   help="bfloat16 compute, float32 weights and optimizer (GPU runs; see the docstring)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in backward (saves memory, GPU runs)")
    g = parser.add_argument_group("rollout")
    g.add_argument("--puzzles-per-step", type=int, default=4, help="P: puzzles per step, over all ranks (paper: 64)")
    g.add_argument("--group-size", type=int, default=8, help="G: responses sampled per puzzle (paper: 5)")
    g.add_argument("--max-new-tokens", type=int, default=240, help="response budget in tokens (paper: 3000)")
    g.add_argument("--sample-batch", type=int, default=8,
                   help="puzzles per sampling call (their G responses decode together); fewer calls are faster")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; log-probs in the loss use logits / temperature too")
    g = parser.add_argument_group("loss")
    g.add_argument("--clip-low", type=float, default=0.2, help="eps_low: rho is clipped below at 1 - clip_low")
    g.add_argument("--clip-high", type=float, default=0.2,
                   help="eps_high: rho is clipped above at 1 + clip_high (DAPO's clip-higher uses 0.28)")
    g.add_argument("--beta", type=float, default=0.001,
                   help="weight of the k3 KL to the frozen reference; 0 builds no reference model at all")
    g.add_argument("--loss-agg", choices=LOSS_AGG_MODES, default="token-mean",
                   help="token-mean: over all response tokens of the batch; seq-mean: per response then mean "
                        "(original GRPO); token-sum: sum / (responses * max-new-tokens) (Dr. GRPO)")
    g.add_argument("--no-std-scaling", action="store_true",
                   help="advantage r - mean(r) without dividing by the group std (Dr. GRPO)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant after warm-up (paper: 1e-6)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up, in GRPO steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this")
    g.add_argument("--mu", type=int, default=1, help="update passes over each rollout (paper: 1)")
    g.add_argument("--minibatches", type=int, default=1,
                   help="optimizer steps per pass: the rollout's puzzles are split into this many "
                        "minibatches (minibatch m: every M-th puzzle of the step from the m-th)")
    g.add_argument("--micro-batch", type=int, default=1,
                   help="puzzles (each with its G responses) per forward/backward; gradients accumulate. 1 "
                        "needs the least memory (with more, backward holds one group's weight gradients "
                        "until the next group's reach them)")
    g.add_argument("--per-sequence", action="store_true",
                   help="plain GRPO, the reference path: each response is sampled and scored with its own copy "
                        "of the prompt (prefill per response, per-sequence log-probs) instead of running each "
                        "shared prompt once")
    g = parser.add_argument_group("run")
    g.add_argument("--out-dir", required=True, help="folder for checkpoints and metrics.jsonl")
    g.add_argument("--steps", type=int, default=50, help="GRPO steps to run (in total, counting resumed ones)")
    g.add_argument("--eval-every", type=int, default=25,
                   help="greedy evaluation on --val every this many steps, at step 0 and at the end (0: never)")
    g.add_argument("--eval-batch", type=int, default=16, help="val puzzles per greedy sampling call")
    g.add_argument("--save-every", type=int, default=25, help="checkpoint every this many steps (and at the end)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order and of sampling")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    args = parser.parse_args(argv)
    at_least_1 = ("--max-prompt-tokens", "--puzzles-per-step", "--max-new-tokens", "--sample-batch", "--mu",
                  "--minibatches", "--micro-batch", "--steps", "--eval-batch", "--save-every")
    cello.check_ranges("grpo.py", args, {
        **{flag: "an integer >= 1" for flag in at_least_1},
        "--group-size": "an integer >= 2",  # a group of one has advantage 0: nothing would be learnt
        "--seed": "an integer in [0, 2^63)",
        "--temperature": "a number > 0", "--clip-low": "a number >= 0 (inf: no limit)",
        "--clip-high": "a number >= 0 (inf: no limit)",
        "--beta": "a number >= 0", "--eval-every": "an integer >= 0", "--eval-puzzles": "an integer >= 0",
        # a zero or negative rate or clip norm would stop learning or ascend the loss
        "--lr": "a number > 0", "--max-grad-norm": "a number > 0 (inf: no limit)", "--warmup-steps": "an integer >= 0",
        "--weight-decay": "a number >= 0"})
    return args


# ---------------------------------------------------------------------------------------------
# Helpers of the loop
# ---------------------------------------------------------------------------------------------

def step_puzzles(num_puzzles, consumed, count, seed):
    """Indices of the next `count` puzzles after `consumed` have been used.

    Each epoch is its own random permutation, so the data position is the single number `consumed`
    and resuming needs nothing else. Its seed mixes run seed and epoch as sample_seed does: a plain
    seed + epoch would give seed s + 1 the epochs of seed s shifted by one.
    """
    out = []
    while len(out) < count:
        epoch, pos = divmod(consumed, num_puzzles)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
        perm = torch.randperm(num_puzzles, generator=generator).tolist()
        take = min(count - len(out), num_puzzles - pos)
        out += perm[pos:pos + take]
        consumed += take
    return out


def sample_seed(seed, step, position):
    """One integer per (run seed, step, puzzle position in the step): sampling does not depend on ranks.
    Taken mod 2^63, which torch's generators accept (a large --seed would overflow them otherwise)."""
    return ((seed * 1_000_003 + step) * 100_003 + position) % 2**63


def pad_rows(rows):
    """Lists of floats -> (values [R, L] float32, mask [R, L] float32), zero-padded on the right."""
    values, real = cello.right_pad(rows, dtype=torch.float32)
    return values, real.float()


def rollout(model, prompts, step, first_position, args, stop_ids, pad_id, device):
    """Sample G responses to each prompt with the current policy (no gradients).

    Prompts go to the sampler --sample-batch at a time; each call has its own generator seeded by
    (seed, step, position of its first puzzle in the step). So the samples never depend on what ran
    before (a resumed run repeats the uninterrupted one), nor on the number of ranks when
    --sample-batch divides each rank's share. Returns dict(responses, logprobs, finished),
    group-major (puzzle p's responses are rows p*G .. p*G+G-1).
    --per-sequence: each prompt is passed G times with one sample each, so every response gets its
    own prefill (the plain GRPO rollout, the baseline of bench_grpo.py). The decode batch, its rows'
    order and the generator's draws are the same as with the shared prefill, so the samples are too.
    """
    out = {"responses": [], "logprobs": [], "finished": []}
    G = args.group_size
    with torch.no_grad(), cello.bf16_autocast(model, args.bf16):
        for a in range(0, len(prompts), args.sample_batch):
            gen = torch.Generator(device=device).manual_seed(sample_seed(args.seed, step, first_position + a))
            chunk = prompts[a:a + args.sample_batch]
            if args.per_sequence:
                chunk, num_samples = [p for p in chunk for _ in range(G)], 1
            else:
                num_samples = G
            s = cello.sample(model, chunk, num_samples, args.max_new_tokens,
                             stop_ids, pad_id, temperature=args.temperature, generator=gen)
            for key in out:
                out[key] += s[key]
    return out


def score_rollout(texts, lengths, answers, args):
    """Rewards and advantages of one rollout. texts and lengths (tokens, stop token included) are
    group-major [R = P * G]: response k answers puzzle k // G, whose gold labels are answers[k // G].
    Returns (reward.score dicts [R], advantages [R] float32: the rewards normalised within each group)."""
    G = args.group_size
    scores = [reward.score(text, answers[k // G], num_tokens=n) for k, (text, n) in enumerate(zip(texts, lengths))]
    rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
    return scores, group_advantages(rewards, G, scale_by_std=not args.no_std_scaling)


def reference_logprobs(ref_model, prompts, responses, args):
    """Log-probs [R, L] (float32, on the CPU) of the responses under the frozen reference, no gradients."""
    with torch.no_grad(), cello.bf16_autocast(ref_model, args.bf16):
        ref_logp, _ = cello.response_logprobs(ref_model, prompts, responses, temperature=args.temperature,
                                              shared_prompt=not args.per_sequence)
    if isinstance(ref_model, FSDPModule):  # its root stays gathered after forward (the head runs after it), and
        ref_model.reshard()                # no backward frees it: else every rank holds the whole embedding and head
    return ref_logp.float().cpu()


def minibatch_puzzles(num_local, minibatches, m):
    """A rank's local indices of minibatch m's puzzles: every minibatches-th puzzle from the m-th.

    A rank's share of the step is a contiguous block of positions whose size is a multiple of
    minibatches, so minibatch m holds the step's puzzles at positions m, m + M, m + 2M, ... whatever the
    number of ranks: K processes make the same optimizer steps as 1. (The step's puzzles are a random
    draw, so every M-th one is as random a minibatch as a contiguous slice.)
    """
    return list(range(m, num_local, minibatches))


def policy_update(model, optimizer, batch, args, world_size=1):
    """mu passes over the rollout; each pass splits its puzzles into --minibatches optimizer steps,
    each minibatch into micro-batches of --micro-batch puzzles whose gradients accumulate.

    batch: prompts (list of P_local token lists), responses (R = P_local * G token lists), old_logp,
    mask [R, L], ref_logp [R, L] or None, advantages [R]. The loss divisor is computed over the whole
    minibatch on all ranks before any forward, so every micro-batch on every rank divides by the same
    number and the summed gradient is exactly the gradient of the minibatch's loss.
    A non-finite loss or gradient norm stops the run before that minibatch's optimizer.step (earlier
    minibatches of the step, with --minibatches or --mu > 1, have been applied; the message says so).
    Returns metrics summed/averaged over all ranks: loss, grad_norm, clip_frac_low, clip_frac_high, kl,
    rho_mean.
    """
    G = args.group_size
    num_local = len(batch["prompts"])
    totals = {"tokens": 0.0, "clipped_low": 0.0, "clipped_high": 0.0, "kl": 0.0, "rho": 0.0}
    losses, grad_norms = [], []
    params = [p for p in model.parameters() if p.requires_grad]
    for update_pass in range(args.mu):
        for m in range(args.minibatches):
            puzzles = minibatch_puzzles(num_local, args.minibatches, m)  # this minibatch's puzzles (local)
            minibatch_rows = [p * G + g for p in puzzles for g in range(G)]  # their responses
            tokens, seqs = cello.all_reduce([batch["mask"][minibatch_rows].sum().item(), len(minibatch_rows)])
            divisor = loss_divisor(args.loss_agg, tokens, seqs, args.max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            mb_loss, finite = 0.0, True
            for a in range(0, len(puzzles), args.micro_batch):
                part = puzzles[a:a + args.micro_batch]
                rows = [p * G + g for p in part for g in range(G)]
                with cello.bf16_autocast(model, args.bf16):
                    logp, _ = cello.response_logprobs(model, [batch["prompts"][p] for p in part],
                                                      [batch["responses"][r] for r in rows],
                                                      temperature=args.temperature,
                                                      shared_prompt=not args.per_sequence)
                L = logp.shape[1]  # the longest response of this micro-batch
                ref = batch["ref_logp"][rows, :L].to(logp.device) if batch["ref_logp"] is not None else None
                old, mask = batch["old_logp"][rows, :L].to(logp.device), batch["mask"][rows, :L].to(logp.device)
                loss, stats = grpo_loss(logp, old, ref, batch["advantages"][rows].to(logp.device), mask,
                                        args.loss_agg, divisor, args.clip_low, args.clip_high, args.beta)
                finite = finite and bool(torch.isfinite(loss))
                # FSDP2 averages gradients over ranks; the divisor already counts every rank's tokens,
                # so scaling by world_size turns that average back into the sum the loss defines.
                (loss * world_size).backward()
                mb_loss += loss.item()
                for k in totals:
                    totals[k] += stats[k]
            grad_norm = cello.clip_grad_norm(params, args.max_grad_norm)
            bad_ranks = cello.all_reduce(0.0 if finite else 1.0)
            if bad_ranks or not math.isfinite(grad_norm):
                applied = update_pass * args.minibatches + m  # optimizer steps this GRPO step has already taken
                state = (f"the weights hold this step's first {applied} minibatch update(s), not this one"
                         if applied else "the weights were not updated")
                sys.exit(f"grpo.py: error: non-finite loss or gradient (loss finite on all ranks: {not bad_ranks}, "
                         f"grad norm {grad_norm}); {state}. Lower --lr, or check the model and data; a "
                         "checkpoint saved before this step (--out-dir/last, if any) is intact.")
            optimizer.step()
            losses.append(cello.all_reduce(mb_loss))
            grad_norms.append(grad_norm)
    tokens, clipped_low, clipped_high, kl, rho = cello.all_reduce(list(totals.values()))
    tokens = max(tokens, 1.0)
    return {"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms),
            "clip_frac_low": clipped_low / tokens, "clip_frac_high": clipped_high / tokens, "rho_mean": rho / tokens,
            "kl": kl / tokens if args.beta > 0 else None}  # no reference: not measured


def evaluate(model, tokenizer, stop_ids, records, args, rank, world_size):
    """Greedy decoding on the val puzzles, sharded over ranks; reward.metrics of all responses.

    Every rank makes the same number of sampling calls (FSDP2 needs matching collectives): short
    shards repeat their last puzzle and the repeats are dropped.
    """
    mine = records[rank::world_size]
    per_rank = math.ceil(len(records) / world_size)
    padded = mine + [mine[-1] if mine else records[0]] * (per_rank - len(mine))
    scores = []
    with torch.no_grad(), cello.bf16_autocast(model, args.bf16):
        for a in range(0, per_rank, args.eval_batch):
            chunk = padded[a:a + args.eval_batch]
            out = cello.sample(model, [cello.prompt_ids(tokenizer, r) for r in chunk], 1, args.max_new_tokens,
                               stop_ids, tokenizer.pad_token_id, temperature=0.0)
            for j, (record, response) in enumerate(zip(chunk, out["responses"])):
                if a + j < len(mine):
                    text = cello.response_text(tokenizer, response, stop_ids)
                    scores.append(reward.score(text, record["answer"], num_tokens=len(response)))
    m = reward.metrics(cello.all_gather_list(scores))
    return {f"val_{k}": m[k] for k in ("cell_accuracy", "batch_accuracy", "format_validity", "uniqueness",
                                       "mean_reward", "mean_length", "count")}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = cello.setup_distributed()
    if args.puzzles_per_step % world_size:
        sys.exit(f"grpo.py: error: --puzzles-per-step {args.puzzles_per_step} must be a multiple of the "
                 f"number of processes ({world_size})")
    local_puzzles = args.puzzles_per_step // world_size
    if local_puzzles % args.minibatches:
        sys.exit(f"grpo.py: error: each rank's {local_puzzles} puzzles per step must split evenly into "
                 f"--minibatches {args.minibatches}")
    torch.manual_seed(args.seed)
    resume_dir = cello.checkpoint_to_resume(args.out_dir, args.resume, "grpo.py")  # None for a fresh run
    train = cello.read_puzzles(args.train, "--train", "grpo.py")
    val = cello.read_puzzles(args.val, "--val", "grpo.py")[:args.eval_puzzles or None] if args.val else []
    cello.check_model_name(args.model, "grpo.py")
    cello.make_out_dir(args.out_dir, "grpo.py")  # after the data is read: a bad data file leaves no folder

    # Policy (trained), reference (frozen copy of the starting policy, only when beta > 0). On resume
    # the policy's weights come from last/, but the reference stays the starting model.
    last_dir, final_dir = os.path.join(args.out_dir, "last"), os.path.join(args.out_dir, "final")
    if args.resume and args.model in cello.PRESETS:  # a preset was built by the first run: reuse it
        model_path = os.path.join(args.out_dir, f"{args.model}-init")
        if not cello.is_model_folder(model_path):
            sys.exit(f"grpo.py: error: --resume --model {args.model}: {args.out_dir} holds no {args.model}-init "
                     "folder: this run was started from another --model")
    else:
        model_path = cello.prepare_model(args.model, args.out_dir, train)
    # a resumed run must start from the same model (by content: the folders may have moved): the
    # reference is rebuilt from it, not saved, and the tokenizer comes from it even at beta 0. The
    # data position and the sampling seeds mean something only for the same puzzles, step size and seed.
    run_identity = {"script": "grpo.py", "--train": cello.file_fingerprint(args.train),
                    "--max-prompt-tokens": args.max_prompt_tokens,  # it decides which puzzles are kept
                    "--puzzles-per-step": args.puzzles_per_step, "--group-size": args.group_size, "--seed": args.seed,
                    "--lr": args.lr, "--weight-decay": args.weight_decay,  # both kept by the optimizer state
                    "model": cello.model_fingerprint(model_path)}
    tokenizer = cello.load_tokenizer(model_path)
    stop_ids = cello.stop_token_ids(model_path, tokenizer)
    model = cello.load_model(model_path, device)
    cello.check_fits_context(model.config, model_path, "grpo.py", args.max_new_tokens, args.max_prompt_tokens)
    # No dropout anywhere: the ratio must compare the same function, so eval mode (gradients still
    # flow). Activation checkpointing acts in train mode only (Hugging Face's rule), which is the same
    # function when the model has no dropout (Llama's and Qwen's attention_dropout is 0).
    model.train(args.activation_checkpointing)
    if args.activation_checkpointing:
        dropout = max([getattr(model.config, "attention_dropout", 0.0)] +
                      [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)])
        if dropout > 0:
            sys.exit(f"grpo.py: error: --activation-checkpointing runs the policy in train mode, where "
                     f"{model_path}'s dropout {dropout} would change it; set its config's attention_dropout "
                     f"to 0 or leave the flag out")
    cello.shard_model(model, device, bf16=args.bf16, activation_checkpointing=args.activation_checkpointing)
    ref_model = None
    if args.beta > 0:
        ref_model = cello.load_model(model_path, device)
        ref_model.eval().requires_grad_(False)
        cello.shard_model(ref_model, device, bf16=args.bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then constant
        optimizer, lambda s: cello.lr_factor(s, args.warmup_steps, args.steps))

    # Training puzzles with their prompts, long ones dropped (their responses could not be trained whole).
    prompts = [cello.prompt_ids(tokenizer, r) for r in train]
    keep = [i for i, p in enumerate(prompts) if len(p) <= args.max_prompt_tokens]
    if not keep:
        sys.exit(f"grpo.py: error: every --train puzzle's prompt is longer than --max-prompt-tokens "
                 f"{args.max_prompt_tokens} (shortest: {min(map(len, prompts))} tokens)")
    train, prompts = [train[i] for i in keep], [prompts[i] for i in keep]

    step, consumed = 0, 0
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if args.resume:
        state = cello.load_resume(resume_dir, model, optimizer, scheduler, expect=run_identity)
        step, consumed = state["step"], state["consumed"]
        if step > args.steps:  # else final/ would be rewritten with the later step's weights
            sys.exit(f"grpo.py: error: --resume: {resume_dir} is at step {step}, past this run's {args.steps} steps: "
                     "nothing to train; ask for more with --steps")
    cello.keep_metrics_until(metrics_path, step)
    if rank == 0:
        cello.write_json_atomic(os.path.join(args.out_dir, "args.json"),
                                {**vars(args), "world_size": world_size, "train_puzzles": len(train)})
    cello.print0(f"grpo: {len(train)} train puzzles (prompts <= {args.max_prompt_tokens} tokens), {len(val)} val, "
                 f"{world_size} process(es), P={args.puzzles_per_step} G={args.group_size}, from step {step}")

    if val and args.eval_every and step == 0:
        row = {"step": 0, **evaluate(model, tokenizer, stop_ids, val, args, rank, world_size)}
        if rank == 0:
            cello.append_jsonl(metrics_path, [row])
    G = args.group_size
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, disable=rank != 0, desc="grpo")
    for step in bar:
        t0 = time.time()
        # 1. rollout: this rank's share of the step's puzzles, G samples each
        indices = step_puzzles(len(train), consumed, args.puzzles_per_step, args.seed)
        first = rank * local_puzzles
        mine = indices[first:first + local_puzzles]
        batch_prompts = [prompts[i] for i in mine]
        out = rollout(model, batch_prompts, step, first, args, stop_ids, tokenizer.pad_token_id, device)
        consumed += args.puzzles_per_step
        # 2. reward, and 3. advantages per group of G
        texts = [cello.response_text(tokenizer, response, stop_ids) for response in out["responses"]]
        scores, advantages = score_rollout(texts, [len(r) for r in out["responses"]],
                                           [train[i]["answer"] for i in mine], args)
        old_logp, mask = pad_rows(out["logprobs"])
        t1 = time.time()
        # 4. reference log-probs (frozen model, no gradients)
        ref_logp = None
        if ref_model is not None:
            ref_logp = reference_logprobs(ref_model, batch_prompts, out["responses"], args)
        t2 = time.time()
        # 5. update
        batch = {"prompts": batch_prompts, "responses": out["responses"], "old_logp": old_logp, "mask": mask,
                 "ref_logp": ref_logp, "advantages": advantages}
        lr = optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler moves it after)
        update_metrics = policy_update(model, optimizer, batch, args, world_size)
        scheduler.step()
        t3 = time.time()

        # metrics over all ranks
        all_scores = cello.all_gather_list(scores)
        m = reward.metrics(all_scores)
        all_rewards = torch.tensor([s["reward"] for s in all_scores])
        zero_groups = zero_advantage_share(all_rewards, G)
        tokens, neg_logp_sum, truncated = cello.all_reduce([mask.sum().item(), -(old_logp * mask).sum().item(),
                                                            float(sum(not f for f in out["finished"]))])
        row = {"step": step + 1, "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
               "cell_accuracy": m["cell_accuracy"], "batch_accuracy": m["batch_accuracy"],
               "format_validity": m["format_validity"], **update_metrics,
               "entropy": neg_logp_sum / max(tokens, 1.0),  # Monte-Carlo: mean -log p of the sampled tokens
               "response_length": tokens / len(all_scores), "truncated_frac": truncated / len(all_scores),
               "zero_adv_groups": zero_groups, "lr": lr,
               "time_rollout": t1 - t0, "time_reference": t2 - t1, "time_update": t3 - t2,
               "time_step": t3 - t0, "tokens_per_s": tokens / (t3 - t0)}
        last = step + 1 == args.steps
        if val and args.eval_every and ((step + 1) % args.eval_every == 0 or last):
            row.update(evaluate(model, tokenizer, stop_ids, val, args, rank, world_size))
        if rank == 0:  # the line first: a resume drops lines newer than its checkpoint, never misses one
            cello.append_jsonl(metrics_path, [row])
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['cell_accuracy']:.3f}",
                            kl="-" if row["kl"] is None else f"{row['kl']:.4f}", gnorm=f"{row['grad_norm']:.3f}",
                            zero_groups=f"{zero_groups:.2f}", s=f"{row['time_step']:.1f}")
        if (step + 1) % args.save_every == 0 or last:
            cello.save_checkpoint(last_dir, model, tokenizer, optimizer, scheduler,
                                  state={"step": step + 1, "consumed": consumed, **run_identity})
    cello.save_checkpoint(final_dir, model, tokenizer)
    cello.print0(f"grpo.py: final policy in {final_dir}")
    cello.cleanup_distributed()


if __name__ == "__main__":
    cello.run_script(main, "grpo.py", "the same command with --resume continues from the last checkpoint "
                                      "(--out-dir/last, saved every --save-every steps)")
