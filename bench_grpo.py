"""Seconds per GRPO step: each prompt run once per group against the plain per-sequence step.

Not a test: it prints figures for BENCHMARKS.md. Both paths run in this one process on the same
model, prompts and seed, through grpo.py's own step functions (grpo.rollout, grpo.reference_logprobs,
grpo.policy_update); the per-sequence path is grpo.py's --per-sequence (every response sampled with
its own prefill of the prompt, reference and policy log-probs with a prompt copy per response).
Responses are forced to exactly --max-new-tokens tokens (no EOS can stop a row), so both paths do
the same sampling work and sample the same tokens; rewards are seeded random numbers (the update's
cost does not depend on them, and a random model would score -1 everywhere). Before every step the
policy gets back its starting weights and a fresh AdamW, so every timed step does the same work.

Configurations:
  demo   the CPU demo: the "small" preset built by cello.prepare_model on real puzzles (--data: the
         demo's train.jsonl), with the demo's P (puzzles per step), G and --max-new-tokens.
  issue  issue 6's case on the same model: 2 puzzles x 8 responses x 64 new tokens, random prompts
         of ~1,200 tokens (+-5%); --issue-* flags change P, G and the lengths.
  sweep  the issue config with one factor changed: G 4 or 16, prompt 600 or response 200 tokens.
--device cuda runs it on a GPU (timers wait for the GPU's queued work), --bf16 under grpo.py's
one-process bf16 autocast, and --model any local Hugging Face folder instead of the small preset.
Timings: one warm-up step per path, then --repeats rounds; each round runs both paths one after the
other (load from other users hits both alike). Figures are medians over the rounds.

Run (CPU, 1 thread; demo + issue about 4 minutes on the shared 2-core machine), on the demo's puzzles
(runs/demo/puzzles/train.jsonl after `python cello.py demo`, or built alone with the demo's flags):
    python puzzles.py build data/pbmc68k_reduced.h5ad --out-dir runs/puzzles --cell-type-key bulk_labels \\
        --donor-key none --context "The cell is from a human donor, originating from the peripheral blood. \\
The patient is healthy with no diagnosed disease." --n-min 4 --n-max 6 --genes 25 --puzzles-per-group 1500 --train-gene-dropout 0.3
    python bench_grpo.py --data runs/puzzles/train.jsonl --work-dir runs/bench-grpo
    python bench_grpo.py --data runs/puzzles/train.jsonl --work-dir runs/bench-grpo --configs sweep --repeats 1
On a GPU (BENCHMARKS.md, "On a GPU"):
    python bench_grpo.py --device cuda --bf16 --data runs/puzzles/train.jsonl --work-dir runs/bench-grpo
"""
import argparse
import copy
import statistics
import sys
import time

import torch

import cello
import grpo

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=cello.HelpFormatter)
parser.add_argument("--data", required=True, help="puzzles JSONL (the demo's train.jsonl): tokenizer and demo prompts")
parser.add_argument("--work-dir", required=True, help="folder for the small-preset model folder")
parser.add_argument("--model", default="small", help="preset name, or a local Hugging Face model folder (the demo's "
                    "prompts need its tokenizer to be the small preset's)")
parser.add_argument("--configs", default="demo,issue", help="comma-separated: demo, issue, sweep")
parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (after one warm-up)")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps figures steady on a shared machine)")
parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU: times then wait for its queued work)")
parser.add_argument("--bf16", action="store_true",
                    help="grpo.py's one-process --bf16: autocast to bfloat16, float32 weights")
parser.add_argument("--seed", type=int, default=0, help="seed of the prompts, samples and rewards")
parser.add_argument("--issue-puzzles", type=int, default=2, help="issue config: puzzles per step (P)")
parser.add_argument("--issue-group-size", type=int, default=8, help="issue config: responses per puzzle (G)")
parser.add_argument("--issue-prompt-len", type=int, default=1200, help="issue config: mean prompt length in tokens")
parser.add_argument("--issue-new-tokens", type=int, default=64, help="issue config: tokens per response")
args = parser.parse_args()
cello.check_ranges("bench_grpo.py", args, {
    **{flag: "an integer >= 1" for flag in ("--repeats", "--threads", "--issue-puzzles", "--issue-prompt-len",
                                            "--issue-new-tokens")},
    "--issue-group-size": "an integer >= 2", "--seed": "an integer in [0, 2^63)"})
cello.check_device(args.device, "bench_grpo.py")
configs = args.configs.split(",")
if not set(configs) <= {"demo", "issue", "sweep"}:
    parser.error(f"--configs: expected some of demo, issue, sweep (got {args.configs!r})")
torch.set_num_threads(args.threads)
print("command: python " + " ".join(sys.argv))
NO_EOS = -1  # no token has this id: every response runs to --max-new-tokens

records = cello.read_jsonl(args.data)
model_path = cello.prepare_model(args.model, args.work_dir, records)
tokenizer = cello.load_tokenizer(model_path)
device = torch.device(args.device)
if device.type == "cpu":
    cello.keep_freed_memory()  # as grpo.py does on CPU (cello.setup_distributed)
policy = cello.load_model(model_path, device).eval()
ref_model = copy.deepcopy(policy).requires_grad_(False)
start_weights = copy.deepcopy(policy.state_dict())
print(f"model: {args.model}, {policy.config.model_type}, "
      f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, "
      f"{policy.config._attn_implementation} attention, on {device}"
      f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
      f"{'bf16 autocast' if args.bf16 else 'float32'}, {torch.get_num_threads()} CPU thread(s)")


def step_args(P, G, new_tokens, per_sequence):
    flags = ["--model", model_path, "--train", args.data, "--out-dir", args.work_dir, "--seed", str(args.seed)]
    flags += ["--puzzles-per-step", str(P), "--group-size", str(G), "--max-new-tokens", str(new_tokens)]
    return grpo.parse_args(flags + (["--per-sequence"] if per_sequence else []) + (["--bf16"] if args.bf16 else []))


def now():
    """perf_counter after the GPU's queued work is done (phases end on a host sync anyway; this makes sure)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def grpo_step(prompts, step_args_, step):
    """One GRPO step of grpo.py's functions; returns seconds of (sampling, reference, update)."""
    policy.load_state_dict(start_weights)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=step_args_.lr, weight_decay=step_args_.weight_decay)
    t0 = now()
    out = grpo.rollout(policy, prompts, step, 0, step_args_, NO_EOS, tokenizer.pad_token_id, device)
    t1 = now()
    ref_logp = grpo.reference_logprobs(ref_model, prompts, out["responses"], step_args_)
    t2 = now()
    old_logp, mask = grpo.pad_rows(out["logprobs"])
    rewards = torch.rand(len(out["responses"]), generator=torch.Generator().manual_seed(args.seed + step))
    batch = {"prompts": prompts, "responses": out["responses"], "old_logp": old_logp, "mask": mask,
             "ref_logp": ref_logp, "advantages": grpo.group_advantages(rewards, step_args_.group_size)}
    grpo.policy_update(policy, optimizer, batch, step_args_)
    t3 = now()
    assert all(len(r) == step_args_.max_new_tokens for r in out["responses"])
    return t1 - t0, t2 - t1, t3 - t2


def bench(name, prompts, G, new_tokens, repeats):
    """Time both paths, print one line each and the ratio; returns the shared / per-sequence step ratio."""
    P = len(prompts)
    paths = {"shared": step_args(P, G, new_tokens, False), "per-seq": step_args(P, G, new_tokens, True)}
    times = {path: [] for path in paths}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for path, a in paths.items():
            t = grpo_step(prompts, a, round_)
            if round_:
                times[path].append(t)
    lengths = [len(p) for p in prompts]
    print(f"\n[{name}] P={P} G={G} prompts {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / P:.0f}), "
          f"{new_tokens} new tokens per response; median of {repeats} rounds after 1 warm-up")
    print(f"{'path':8} {'sampling':>9} {'reference':>9} {'update':>8} {'step':>8} {'best step':>9} "
          f"{'resp tok/s':>10} {'model tok/step':>14}")
    steps = {}
    for path, rows in times.items():
        phase = [statistics.median(t[i] for t in rows) for i in range(3)]
        total = [sum(t) for t in rows]
        steps[path] = statistics.median(total)
        # tokens the model runs per step: sampling (prefill + decode), reference forward, policy forward
        prompt_tokens = sum(lengths) * (G if path == "per-seq" else 1)
        model_tokens = 3 * (prompt_tokens + P * G * new_tokens)
        print(f"{path:8} {phase[0]:9.2f} {phase[1]:9.2f} {phase[2]:8.2f} {steps[path]:8.2f} {min(total):9.2f} "
              f"{P * G * new_tokens / steps[path]:10.0f} {model_tokens:14d}")
    ratio = steps["shared"] / steps["per-seq"]
    print(f"ratio shared / per-seq step time: {ratio:.3f} (target <= 0.25)")
    return ratio


def random_prompts(P, mean_len, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = (mean_len * (0.95 + 0.1 * torch.rand(P, generator=g))).long().tolist()
    return [torch.randint(10, policy.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


if "demo" in configs:  # P, G and --max-new-tokens exactly as `python cello.py demo` runs grpo.py
    stages = cello.demo_stages("demo", "data", sft_steps=1, cooldown_steps=1, grpo_steps=1)
    stages = {name: command for name, command, _ in stages}
    demo = grpo.parse_args(stages["GRPO from the SFT model"][1:])
    g = torch.Generator().manual_seed(args.seed)
    picked = torch.randperm(len(records), generator=g)[:demo.puzzles_per_step].tolist()
    bench("demo", [cello.prompt_ids(tokenizer, records[i]) for i in picked], demo.group_size,
          demo.max_new_tokens, args.repeats)
if "issue" in configs:
    bench("issue", random_prompts(args.issue_puzzles, args.issue_prompt_len, args.seed), args.issue_group_size,
          args.issue_new_tokens, args.repeats)
if "sweep" in configs:  # one factor at a time around the issue config (G 8, prompt 1200, response 64)
    for G, prompt_len, new_tokens in ((4, 1200, 64), (16, 1200, 64), (8, 600, 64), (8, 1200, 200)):
        bench(f"sweep G={G} prompt={prompt_len} response={new_tokens}",
              random_prompts(2, prompt_len, args.seed), G, new_tokens, args.repeats)
