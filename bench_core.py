"""Benchmarks for cello.py's sampler and log-probs (not a test: it prints figures for BENCHMARKS.md).

1. Speed: cello.sample against model.generate on the same batch and the same random Llama of the
   `small` preset's shape (hidden 128, 4 layers, vocab 4096), greedy on P prompts, then the shared-prompt case
   (2 prompts x 8 samples at temperature 1: cello prefills each prompt once, generate prefills 16 rows).
   Each timing is the best of --repeats interleaved runs (the machine is shared), and the prefill is
   timed on its own so the decode share is visible.
2. Shared-prompt log-probs: cello.response_logprobs with each prompt run once for its G responses
   (shared_prompt=True) against the per-sequence reference, forward only (GRPO's reference model)
   and forward + backward (the policy), on a random ~3.7M-parameter Llama (hidden 256, 4 layers, vocab
   4096: the `small` preset's earlier shape), ~1,200-token prompts.
3. SFT step: forward + backward of sft.py's response loss for the `small` preset's shape (random
   weights) on a demo-shaped batch (8 sequences, ~450 tokens, the first 187 shared as the demo's
   system message is, the last ~160 the response), in float32 and under bf16 autocast (sft.py --bf16 in
   one process: float32 weights, bf16 matmuls); in float32 with the log-prob head cello had before
   2026-12-03 (the target's logit minus logsumexp); and in float32 per-sequence, each row whole, as
   sft.py computed its loss before it ran the shared prefix once.
4. Memory: peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs) of cello's chunked
   log-probs against the naive log_softmax(model(...).logits) for a model with a 152k vocabulary,
   without and with backward.
5. Scale (for a GPU; not in the default parts): the policy loss of one GRPO group at the paper's
   lengths, forward + backward of cello.response_logprobs, for Qwen2.5-0.5B- and 7B-shaped models
   with random bfloat16 weights (as FSDP2's bf16 policy computes): shared prompt against
   per-sequence, each with and without activation checkpointing (grpo.py --activation-checkpointing).
   Peak GPU memory above the weights and their gradients, and seconds (best of --repeats).

Run (CPU, one process, about 5 minutes on 2 cores):
    python bench_core.py
    python bench_core.py --parts speed --prompts 8 --prompt-len 1000 --new-tokens 128
    python bench_core.py --parts sft --threads 2 --repeats 20
    python bench_core.py --parts scale --device cuda    (one GPU with 80 GB for the 7B shape)
"""
import argparse
import ctypes
import gc
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import cello
import sft

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=cello.HelpFormatter)
parser.add_argument("--parts", default="speed,logprobs,sft,memory",
                    help="comma-separated: speed, logprobs, sft, memory, scale")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps figures steadier on a shared machine)")
parser.add_argument("--seed", type=int, default=0, help="seed for weights and prompts")
speed = parser.add_argument_group("speed: sampler against model.generate")
speed.add_argument("--prompts", type=int, default=8, help="prompts in the greedy batch")
speed.add_argument("--prompt-len", type=int, default=1000, help="mean prompt length in tokens (lengths vary +-5%%)")
speed.add_argument("--new-tokens", type=int, default=128, help="new tokens per row (no EOS, every row runs to the end)")
speed.add_argument("--shared-prompts", type=int, default=2, help="prompts in the shared-prompt case")
speed.add_argument("--samples", type=int, default=8, help="samples per prompt (G) in the shared-prompt case")
speed.add_argument("--repeats", type=int, default=2, help="interleaved runs per method; the best is reported")
logp = parser.add_argument_group("logprobs: shared-prompt against per-sequence response_logprobs")
logp.add_argument("--lp-prompts", type=int, default=2, help="prompts")
logp.add_argument("--lp-samples", type=int, default=8, help="responses per prompt (G)")
logp.add_argument("--lp-prompt-len", type=int, default=1200, help="mean prompt length in tokens (+-5%%)")
logp.add_argument("--lp-response-len", type=int, default=64, help="tokens per response")
step = parser.add_argument_group("sft: one SFT forward + backward, float32 against bf16 autocast")
step.add_argument("--sft-batch", type=int, default=8, help="sequences per step (the demo: 8)")
step.add_argument("--sft-len", type=int, default=450, help="mean sequence length in tokens (+-10%%)")
step.add_argument("--sft-response-len", type=int, default=160, help="response tokens (with loss) per sequence")
step.add_argument("--sft-prefix-len", type=int, default=187,
                  help="leading tokens all sequences share (the demo's system message and context: 187)")
memory = parser.add_argument_group("memory: chunked against naive log-probs")
memory.add_argument("--memory-vocab", type=int, default=152064, help="vocabulary size (Qwen2.5: 152064)")
memory.add_argument("--memory-batch", type=int, default=2, help="sequences")
memory.add_argument("--memory-len", type=int, default=1024, help="tokens per sequence")
scale = parser.add_argument_group("scale: one GRPO group's loss at the paper's lengths")
scale.add_argument("--device", default="cpu", help="cpu or cuda (scale part only)")
scale.add_argument("--scale-shapes", default="0.5b,7b", help="comma-separated Qwen2.5 shapes: 0.5b, 7b")
scale.add_argument("--scale-group", type=int, default=5, help="responses to the prompt (paper: G = 5)")
scale.add_argument("--scale-prompt-len", type=int, default=2800, help="prompt tokens (paper: ~2,800)")
scale.add_argument("--scale-response-len", type=int, default=900, help="tokens per response (paper: ~900)")
args = parser.parse_args()
cello.check_ranges("bench_core.py", args, {
    **{flag: "an integer >= 1" for flag in (
        "--threads", "--prompts", "--prompt-len", "--new-tokens", "--shared-prompts", "--samples", "--repeats",
        "--lp-prompts", "--lp-samples", "--lp-prompt-len", "--lp-response-len", "--sft-batch", "--sft-len",
        "--sft-response-len", "--memory-vocab", "--memory-batch", "--memory-len", "--scale-group", "--scale-prompt-len",
        "--scale-response-len")},
    "--seed": "an integer in [0, 2^63)", "--sft-prefix-len": "an integer >= 0"})
cello.check_device(args.device, "bench_core.py")
parts = set(args.parts.split(","))
if not parts <= {"speed", "logprobs", "sft", "memory", "scale"}:
    parser.error(f"--parts: expected some of speed, logprobs, sft, memory, scale, got {args.parts!r}")
torch.set_num_threads(args.threads)
print("command: python " + " ".join(sys.argv))


# The shape of the earlier `small` preset (3.7M parameters), kept for the log-prob and memory parts so that
# their figures in BENCHMARKS.md stay comparable; the speed part uses today's `small` preset (issue 3 asks for it).
HIDDEN_256 = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)


def llama(seed, **shape):
    """A random-initialised Llama of the given shape (LlamaConfig fields) that never stops at an EOS."""
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # no EOS: every row generates exactly --new-tokens
    model.generation_config.pad_token_id = 0
    return model


def describe(model):
    c = model.config
    return (f"Llama hidden {c.hidden_size}, {c.num_hidden_layers} layers, vocab {c.vocab_size}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


def best_time(fn, repeats):
    """(seconds of the fastest run, result of the last run)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def interleaved(fns, repeats):
    """Run every method once per round, so that load from other users hits them alike; best per method."""
    times, results = {name: float("inf") for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, results[name] = best_time(fn, 1)
            times[name] = min(times[name], seconds)
    return times, results


if "speed" in parts:
    model = llama(args.seed, **cello.PRESETS["small"])
    vocab = model.config.vocab_size
    print(f"\n== speed: the small preset's shape ({describe(model)}), {args.threads} thread(s)")
    g = torch.Generator().manual_seed(args.seed)

    def prompts_of(n):
        lengths = torch.randint(int(args.prompt_len * 0.95), int(args.prompt_len * 1.05) + 1, (n,), generator=g)
        return [torch.randint(2, vocab, (int(k),), generator=g).tolist() for k in lengths]

    def prefill(prompts):
        ids, mask, positions = cello.left_pad(prompts, 0, "cpu")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)

    def generate(prompts, samples, do_sample):
        ids, mask, _ = cello.left_pad(prompts, 0, "cpu")
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                             do_sample=do_sample, num_return_sequences=samples, top_k=None, top_p=None,
                             temperature=1.0 if do_sample else None)
        return out[:, ids.shape[1]:].tolist()

    cases = [("greedy", prompts_of(args.prompts), 1, 0.0),
             ("shared", prompts_of(args.shared_prompts), args.samples, 1.0)]
    for name, prompts, samples, temperature in cases:
        rows = len(prompts) * samples
        expanded = [p for p in prompts for _ in range(samples)]  # what generate prefills
        fns = {
            "cello.sample": lambda: cello.sample(model, prompts, samples, args.new_tokens, stop_ids=-1, pad_id=0,
                                                 temperature=temperature, generator=torch.Generator().manual_seed(0)),
            "model.generate": lambda: generate(prompts, samples, temperature > 0),
            "cello.sample, 1 new token (its prefill)": lambda: cello.sample(model, prompts, samples, 1, stop_ids=-1,
                                                                            pad_id=0, temperature=temperature),
            "left-padded batch prefill (generate's)": lambda: prefill(expanded),
        }
        if samples > 1:
            fns["cello.sample, prompt repeated G times"] = lambda: cello.sample(
                model, expanded, 1, args.new_tokens, stop_ids=-1, pad_id=0, temperature=temperature,
                generator=torch.Generator().manual_seed(0))
        times, results = interleaved(fns, args.repeats)
        new_tokens = sum(len(r) for r in results["cello.sample"]["responses"])
        assert new_tokens == rows * args.new_tokens == sum(len(r) for r in results["model.generate"])
        if temperature == 0:
            assert results["cello.sample"]["responses"] == results["model.generate"], "greedy differs from generate"
        print(f"\n{name}: {len(prompts)} prompts x {samples} samples, prompt lengths "
              f"{min(map(len, prompts))}-{max(map(len, prompts))}, {args.new_tokens} new tokens per row, "
              f"temperature {temperature}")
        for method, seconds in times.items():
            rate = f"{new_tokens / seconds:8.1f} new tokens/s" if "prefill" not in method else ""
            print(f"  {method:42s} {seconds:7.2f} s  {rate}")
        print(f"  speed-up of cello.sample over model.generate: {times['model.generate'] / times['cello.sample']:.2f}x")
        decode_cello = times["cello.sample"] - times["cello.sample, 1 new token (its prefill)"]
        decode_generate = times["model.generate"] - times["left-padded batch prefill (generate's)"]
        print(f"  decode only (total - prefill): cello {decode_cello:.2f} s, generate {decode_generate:.2f} s "
              f"({decode_generate / max(decode_cello, 1e-9):.2f}x)")

if "logprobs" in parts:
    model = llama(args.seed, **HIDDEN_256)
    g = torch.Generator().manual_seed(args.seed + 1)
    lengths = torch.randint(int(args.lp_prompt_len * 0.95), int(args.lp_prompt_len * 1.05) + 1, (args.lp_prompts,),
                            generator=g)
    vocab = model.config.vocab_size
    prompts = [torch.randint(2, vocab, (int(k),), generator=g).tolist() for k in lengths]
    responses = [torch.randint(2, vocab, (args.lp_response_len,), generator=g).tolist()
                 for _ in range(args.lp_prompts * args.lp_samples)]
    print(f"\n== logprobs: {args.lp_prompts} prompts ({min(lengths)}-{max(lengths)} tokens) x {args.lp_samples} "
          f"responses x {args.lp_response_len} tokens, {describe(model)}")

    def forward(shared):
        with torch.no_grad():
            return cello.response_logprobs(model, prompts, responses, 1.0, shared_prompt=shared)[0]

    def forward_backward(shared):
        logprobs, mask = cello.response_logprobs(model, prompts, responses, 1.0, shared_prompt=shared)
        (logprobs * mask).sum().backward()
        model.zero_grad()
        return logprobs.detach()

    times, results = interleaved({"forward, shared": lambda: forward(True),
                                  "forward, per-sequence": lambda: forward(False),
                                  "forward + backward, shared": lambda: forward_backward(True),
                                  "forward + backward, per-sequence": lambda: forward_backward(False)}, args.repeats)
    print(f"  max |shared - per-sequence| = {(results['forward, shared'] - results['forward, per-sequence']).abs().max():.2e}")
    for method, seconds in times.items():
        print(f"  {method:40s} {seconds:7.2f} s")
    for what in ("forward", "forward + backward"):
        print(f"  {what}: shared / per-sequence = {times[what + ', shared'] / times[what + ', per-sequence']:.3f}")


if "sft" in parts:
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**cello.PRESETS["small"], tie_word_embeddings=True))
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(int(args.sft_len * 0.9), int(args.sft_len * 1.1) + 1, (args.sft_batch,), generator=g)
    vocab = cello.PRESETS["small"]["vocab_size"]
    prefix = torch.randint(2, vocab, (args.sft_prefix_len,), generator=g).tolist()
    examples = [(prefix + torch.randint(2, vocab, (int(k) - args.sft_prefix_len,), generator=g).tolist(),
                 [0] * (int(k) - args.sft_response_len) + [1] * args.sft_response_len) for k in lengths]
    num_tokens = sum(sum(mask) for _, mask in examples)
    print(f"\n== sft: the small preset's shape ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
          f"{args.sft_batch} x {min(lengths)}-{max(lengths)} tokens, the first {args.sft_prefix_len} shared, "
          f"{args.sft_response_len} with loss, "
          f"{args.threads} thread(s), AVX512-BF16: {getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: '?')()}")

    def logsumexp_head(lm_head, hidden, targets, temperature):
        """cello._chunk_logprobs before 2026-12-03: the target's logit minus logsumexp (same values)."""
        logits = lm_head(hidden).float() / temperature
        return logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)

    def per_sequence_nll(model, rows):
        """sft.summed_response_nll before the shared prefix: every row whole, right-padded, with an
        all-ones attention mask (sdpa's is_causal path); the head on response positions only."""
        ids, _ = cello.right_pad([r for r, _ in rows])
        wanted = cello.right_pad([m for _, m in rows])[0][:, 1:].bool()
        hidden = cello._final_hidden(model, input_ids=ids, attention_mask=torch.ones_like(ids))
        return -cello._logprobs_of(model, hidden[:, :-1][wanted], ids[:, 1:][wanted], 1.0, None).sum()

    def sft_step(bf16, head=cello._chunk_logprobs, loss=sft.summed_response_nll):
        cello._chunk_logprobs, kept = head, cello._chunk_logprobs
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                nll = loss(model, examples)
            nll.backward()
        finally:
            cello._chunk_logprobs = kept
        model.zero_grad()
        return nll.item() / num_tokens

    times, results = interleaved({"float32": lambda: sft_step(False), "bf16 autocast": lambda: sft_step(True),
                                  "float32, logsumexp head": lambda: sft_step(False, logsumexp_head),
                                  "float32, per-sequence": lambda: sft_step(False, loss=per_sequence_nll)},
                                 args.repeats)
    tokens = int(lengths.sum())
    for method, seconds in times.items():
        print(f"  {method:25s} {seconds:6.3f} s per step, {tokens / seconds:8.0f} tokens/s, loss {results[method]:.4f}")
    print(f"  float32 / bf16 autocast = {times['float32'] / times['bf16 autocast']:.2f}x")
    print(f"  float32, log_softmax head / logsumexp head = {times['float32'] / times['float32, logsumexp head']:.2f}x")
    print(f"  float32, shared prefix / per-sequence = {times['float32'] / times['float32, per-sequence']:.2f}x")


def resident_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_mib(fn):
    """Peak resident memory above the current level while fn runs, in MiB (Linux only). glibc's mmap
    threshold is fixed at 64 KiB first: larger blocks then go back to the system when freed, so a run's
    high-water mark counts its own allocations, not heap that an earlier run freed and left resident."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # -3: M_MMAP_THRESHOLD (fixed, no longer adaptive)
    gc.collect()
    before = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the high-water mark) to the current resident size
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return (resident_kib("VmHWM") - before) / 1024, seconds


if "memory" in parts:
    model = llama(args.seed, **{**HIDDEN_256, "vocab_size": args.memory_vocab, "num_hidden_layers": 2})
    ids = torch.randint(2, args.memory_vocab, (args.memory_batch, args.memory_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    gib = args.memory_batch * args.memory_len * args.memory_vocab * 4 / 2 ** 30
    print(f"\n== memory: {describe(model)}, batch {args.memory_batch} x "
          f"{args.memory_len} tokens (one [B, T, V] float32 tensor = {gib:.2f} GiB), {args.threads} thread(s)")

    def naive():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]

    def chunked():
        return cello.token_logprobs(model, ids, mask)

    with torch.no_grad():
        check = (naive() - chunked()).abs().max().item()
    print(f"  max |chunked - naive| = {check:.2e}")
    rows = {}
    for grad in (False, True):
        for name, fn in (("naive", naive), ("chunked", chunked)):
            def run():
                with torch.set_grad_enabled(grad):
                    out = fn()
                    if grad:
                        out.sum().backward()
            for p in model.parameters():  # gradient buffers exist before measuring, for both methods
                p.grad = torch.zeros_like(p)
            rows[(name, grad)] = peak_mib(run)
        label = "forward + backward" if grad else "forward (no grad)"
        (n_mib, n_s), (c_mib, c_s) = rows[("naive", grad)], rows[("chunked", grad)]
        ratio = f"{c_mib / n_mib:.3f}" if n_mib > 0 else "- (sizes too small to measure)"
        print(f"  {label:20s} naive {n_mib:8.0f} MiB {n_s:6.2f} s | chunked {c_mib:8.0f} MiB {c_s:6.2f} s | "
              f"ratio {ratio}")


# Qwen2.5's published configs (random weights here: memory and time do not depend on their values)
QWEN_SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}

if "scale" in parts:
    device = torch.device(args.device)
    shapes = args.scale_shapes.split(",")
    if not set(shapes) <= set(QWEN_SHAPES):
        parser.error(f"--scale-shapes: expected some of {', '.join(QWEN_SHAPES)}, got {args.scale_shapes!r}")
    g = torch.Generator().manual_seed(args.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def group_loss_peak(model, prompt, responses, shared):
        """(peak MiB above the current allocation, seconds) of one forward + backward; GPU memory on
        cuda, resident memory on cpu."""
        def run():
            logprobs, mask = cello.response_logprobs(model, [prompt], responses, shared_prompt=shared)
            (-(logprobs * mask).sum() / mask.sum()).backward()
            sync()
        if device.type == "cpu":
            return peak_mib(run)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, seconds

    for shape in shapes:
        config = Qwen2Config(**QWEN_SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6)
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16).train()  # no dropout in Qwen2.5
        for p in model.parameters():  # gradient buffers exist before measuring, for every case alike
            p.grad = torch.zeros_like(p)
        prompt = torch.randint(10, config.vocab_size, (args.scale_prompt_len,), generator=g).tolist()
        responses = [torch.randint(10, config.vocab_size, (args.scale_response_len,), generator=g).tolist()
                     for _ in range(args.scale_group)]
        params = sum(p.numel() for p in model.parameters())
        weights_gib = params * 2 / 2 ** 30
        print(f"\n== scale: Qwen2.5-{shape} shape, {params / 1e9:.2f}B parameters in bfloat16 "
              f"({weights_gib:.1f} GiB weights + {weights_gib:.1f} GiB gradients), on {device}"
              f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; one group: "
              f"{args.scale_prompt_len}-token prompt x {args.scale_group} responses x {args.scale_response_len} tokens")
        for checkpointing in (False, True):
            if checkpointing:
                cello.shard_model(model, device, activation_checkpointing=True)  # no process group: just this
            for shared in (True, False):
                path = "shared prompt" if shared else "per-sequence"
                label = f"{path:13s}, {'with' if checkpointing else 'no':4s} activation checkpointing"
                try:  # memory of the last run (the same every run), the fastest run's seconds
                    runs = [group_loss_peak(model, prompt, responses, shared) for _ in range(args.repeats)]
                    print(f"  {label}: peak {runs[-1][0] / 1024:6.1f} GiB above weights + grads, "
                          f"{min(seconds for _, seconds in runs):6.2f} s")
                except torch.OutOfMemoryError:
                    print(f"  {label}: out of memory")
                model.zero_grad(set_to_none=False)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del model
        gc.collect()
