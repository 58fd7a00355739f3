"""CUDA checks of cello.py's sampler, log-probs and FSDP2 on one GPU (CI has no GPU: not a test).

Prints what it measured for BENCHMARKS.md, each check with PASS or FAIL, and exits non-zero if any
check fails. On the given model (a trained checkpoint, so greedy text is not random noise):
  1. float32: greedy cello.sample equals model.generate token for token; sampled log-probs equal
     recomputed ones; shared-prompt log-probs and gradients equal per-sequence ones.
  2. bf16 autocast (grpo.py's one-process --bf16): how far bf16 log-probs are from float32 ones, and
     how many greedy tokens agree. bf16 rounding may flip near-ties, so a greedy row may depart from
     float32's, but only where float32's logits of the two tokens are within 0.5 of each other.
  3. FSDP2 on this GPU: a one-rank NCCL process group, cello.shard_model (bf16 mixed precision), then
     greedy sampling through gathered weights (departing from unsharded bf16 only at near-ties, as in 2),
     the shared-prompt loss's log-probs and gradients near float32's (gradients as one vector: relative
     L2), and equal to the unsharded model's with its parameters cast to bf16 (the same arithmetic).

Run (one GPU, one process; a minute or so):
    python check_gpu.py --model runs/demo/sft/final --puzzles runs/demo/puzzles/test.jsonl
"""
import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

import cello

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=cello.HelpFormatter)
parser.add_argument("--model", required=True, help="a local Hugging Face model folder (e.g. runs/demo/sft/final)")
parser.add_argument("--puzzles", required=True, help="puzzles JSONL whose prompts are used")
parser.add_argument("--prompts", type=int, default=8, help="prompts per check")
parser.add_argument("--group-size", type=int, default=4, help="samples per prompt in the shared-prompt checks")
parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per response")
parser.add_argument("--device", default="cuda", help="cuda; cpu runs the same checks (gloo instead of NCCL) to try "
                    "this script where there is no GPU")
args = parser.parse_args()
cello.check_ranges("check_gpu.py", args, {"--prompts": "an integer >= 1", "--group-size": "an integer >= 1",
                                          "--new-tokens": "an integer >= 1"})
cello.check_device(args.device, "check_gpu.py")
device = torch.device(args.device)
if device.type == "cuda" and device.index is None:
    device = torch.device("cuda", torch.cuda.current_device())  # NCCL's device_id needs an index
print("command: python " + " ".join(sys.argv))
print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
tokenizer = cello.load_tokenizer(args.model)
model = cello.load_model(args.model, device).eval()
prompts = [cello.prompt_ids(tokenizer, r) for r in cello.read_jsonl(args.puzzles)[:args.prompts]]
G, T = args.group_size, args.new_tokens
failures = []


def check(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if not ok:
        failures.append(name)


def generate_greedy(m, prompts_):
    ids, mask, _ = cello.left_pad(prompts_, tokenizer.pad_token_id, device)
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, do_sample=False, top_k=None,
                     top_p=None, temperature=None, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    # cut each row at its EOS (included), as cello.sample does
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        rows.append(row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return rows


def logprobs_and_grads(m, prompts_, responses, shared):
    logprobs, mask = cello.response_logprobs(m, prompts_, responses, 1.0, shared_prompt=shared)
    (logprobs * mask).sum().backward()
    grads = {}
    for name, p in m.named_parameters():
        grads[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().clone()
    m.zero_grad(set_to_none=True)
    return logprobs.detach().float(), mask, grads


def flip_gaps(rows_a, rows_b):
    """For each pair of greedy rows that differ, |float32 logit gap| between their two tokens where they
    first differ (the same prefix before it). Rounding flips only near-ties: a broken path makes big gaps."""
    gaps = []
    for prompt, a, b in zip(prompts, rows_a, rows_b):
        first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + a[:first]], device=device)).logits[0, -1].float()
        gaps.append(abs(logits[a[first]] - logits[b[first]]).item())
    return gaps


def max_rel_grad_diff(a, b):
    """max over parameters of |a - b|_max / |b|_max."""
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in b)


def rel_l2_grad_diff(a, b):
    """||a - b|| / ||b|| over all parameters' gradients as one vector (bf16 rounding of gradients that
    are sums of cancelling per-token terms makes single elements far off; the whole stays close)."""
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    return (diff / sum((b[k] ** 2).sum() for k in b) ** 0.5).item()


# 1. float32
with torch.no_grad():
    greedy = cello.sample(model, prompts, 1, T, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=0.0)
    reference = generate_greedy(model, prompts)
check("fp32 greedy == model.generate", greedy["responses"] == reference,
      f"{len(prompts)} prompts, {sum(map(len, reference))} tokens")
with torch.no_grad():
    sampled = cello.sample(model, prompts[:2], G, T, tokenizer.eos_token_id, tokenizer.pad_token_id,
                           temperature=1.0, generator=torch.Generator(device).manual_seed(0))
responses = sampled["responses"]
shared_lp, mask, shared_grads = logprobs_and_grads(model, prompts[:2], responses, True)
per_seq_lp, _, per_seq_grads = logprobs_and_grads(model, prompts[:2], responses, False)
sample_diff = max(abs(a - b) for row, lp in zip(sampled["logprobs"], shared_lp.tolist()) for a, b in zip(row, lp))
check("fp32 sampled log-probs == recomputed", sample_diff < 1e-4, f"max |diff| {sample_diff:.2e} (tolerance 1e-4)")
lp_diff = ((shared_lp - per_seq_lp) * mask).abs().max().item()
check("fp32 shared-prompt == per-sequence log-probs", lp_diff < 1e-4, f"max |diff| {lp_diff:.2e} (tolerance 1e-4)")
grad_diff = max_rel_grad_diff(shared_grads, per_seq_grads)
check("fp32 shared-prompt == per-sequence gradients", grad_diff < 1e-3,
      f"max relative diff {grad_diff:.2e} (tolerance 1e-3)")

# 2. bf16 autocast
with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
    greedy_bf16 = cello.sample(model, prompts, 1, T, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=0.0)
with torch.autocast(device.type, dtype=torch.bfloat16):
    bf16_lp, _, bf16_grads = logprobs_and_grads(model, prompts[:2], responses, True)
bf16_diff = ((bf16_lp - shared_lp) * mask).abs().max().item()
same = sum(a == b for x, y in zip(greedy_bf16["responses"], greedy["responses"]) for a, b in zip(x, y))
check("bf16 autocast log-probs near float32", bf16_diff < 0.5,
      f"max |diff| {bf16_diff:.3f}, mean {((bf16_lp - shared_lp) * mask).abs().sum().item() / mask.sum().item():.4f}; "
      f"greedy tokens equal to float32's: {same}/{sum(map(len, greedy['responses']))}; "
      f"gradients: relative L2 diff {rel_l2_grad_diff(bf16_grads, shared_grads):.4f}, "
      f"max relative diff {max_rel_grad_diff(bf16_grads, shared_grads):.3f}")
gaps = flip_gaps(greedy_bf16["responses"], greedy["responses"])
check("bf16 autocast greedy departs from float32 only at near-ties", all(g < 0.5 for g in gaps),
      f"{len(gaps)} of {len(prompts)} rows differ; largest float32 logit gap at a first difference "
      f"{max(gaps, default=0):.3f} (tolerance 0.5, as for the log-probs)")

# 3. FSDP2 on one GPU (one-rank NCCL group), bf16 mixed precision
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29517")
if device.type == "cuda":
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
else:
    dist.init_process_group("gloo", rank=0, world_size=1)
sharded = cello.shard_model(copy.deepcopy(model), device, bf16=True)
check("FSDP2 wraps the model", type(sharded).__name__.startswith("FSDP"), type(sharded).__name__)
with torch.no_grad():
    greedy_fsdp = cello.sample(sharded, prompts, 1, T, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=0.0)
same_fsdp = sum(a == b for x, y in zip(greedy_fsdp["responses"], greedy_bf16["responses"]) for a, b in zip(x, y))
gaps = flip_gaps(greedy_fsdp["responses"], greedy_bf16["responses"])
check("FSDP2 bf16 greedy departs from unsharded bf16 only at near-ties",
      len(greedy_fsdp["responses"]) == len(prompts) and all(g < 0.5 for g in gaps),
      f"tokens equal: {same_fsdp}/{sum(map(len, greedy_bf16['responses']))}; {len(gaps)} rows differ, largest "
      f"float32 logit gap at a first difference {max(gaps, default=0):.3f} (tolerance 0.5)")
fsdp_lp, _, fsdp_grads = logprobs_and_grads(sharded, prompts[:2], responses, True)
fsdp_diff = ((fsdp_lp - shared_lp) * mask).abs().max().item()
fsdp_grad = rel_l2_grad_diff(fsdp_grads, shared_grads)
check("FSDP2 bf16 log-probs and gradients near float32", fsdp_diff < 0.5 and fsdp_grad < 0.3,
      f"log-prob max |diff| {fsdp_diff:.3f}, gradients: relative L2 diff {fsdp_grad:.4f} (tolerance 0.3), "
      f"max relative diff {max_rel_grad_diff(fsdp_grads, shared_grads):.3f} "
      f"(float32 master weights: {next(sharded.parameters()).dtype})")
# The same arithmetic without FSDP2: bf16 parameters (FSDP2 casts parameters, not buffers such as the
# rotary frequencies), so what is left is FSDP2's own doing (a wrong shard, a missed reduction)
bf16_params = copy.deepcopy(model)
for p in bf16_params.parameters():
    p.data = p.data.to(torch.bfloat16)
plain_lp, _, plain_grads = logprobs_and_grads(bf16_params, prompts[:2], responses, True)
same_lp = ((fsdp_lp - plain_lp) * mask).abs().max().item()
same_grad = rel_l2_grad_diff(fsdp_grads, plain_grads)
check("FSDP2 bf16 == the unsharded model with bf16 parameters", same_lp < 1e-2 and same_grad < 1e-2,
      f"log-prob max |diff| {same_lp:.2e}, gradients: relative L2 diff {same_grad:.2e} (tolerance 1e-2)")
dist.destroy_process_group()
if device.type == "cuda":
    print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
if failures:
    sys.exit(f"check_gpu.py: {len(failures)} check(s) failed: {', '.join(failures)}")
print("all checks passed")
