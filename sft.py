"""Supervised fine-tuning (SFT) on accepted reasoning traces: the first stage of Cell-o1.

Input: a JSONL of puzzle records with a "response" field (distill.py writes them). Each example is
the chat prompt + response + EOS; the loss is the token-mean cross-entropy over response tokens only
(EOS included, the prompt masked), normalised by the response tokens of the whole global batch
(all micro-batches, all ranks), so that a micro-batch of short responses does not weigh as much as
one of long responses (GRPO-NOTES.md: per-micro-batch normalisation is biased). The prefix that all
sequences of a micro-batch share (the system message) runs once, and the rest of each sequence on
its keys and values (summed_response_nll): the same loss and gradients, fewer tokens.

Batches: each epoch the examples are shuffled (seeded), cut into buckets of --bucket-batches global
batches, each bucket is sorted by length and cut into global batches of --batch-size sequences, and
the batch order is shuffled: sequences of a batch have similar lengths, so little padding. A global
batch is split over ranks (rank r takes every world-th sequence) and, on each rank, into micro-batches
of --micro-batch-size sequences whose gradients are accumulated: the optimizer step, loss and
gradients are the same for 1 process and K processes with the same --batch-size.

Outputs in --out-dir: metrics.jsonl (one row per step: step, epoch, loss, lr, grad_norm, tokens,
tokens_per_s, and val_loss every --eval-every steps), last/ (the latest checkpoint: a Hugging Face
folder plus resume.pt and optimizer.pt, written every --save-every steps), final/ (the trained model
as a Hugging Face folder, which eval.py's model responder and grpo.py load), and <preset>-init/ (the
fresh model and tokenizer a preset name builds, before any training). --resume continues from last/ at the next
step, with the same optimizer, schedule, data position and RNG as an uninterrupted run.

Bad input stops with one line and a non-zero exit: missing file, a line that is not JSON, a record
without a "response". Examples longer than --max-length tokens are skipped (truncation would cut the
answer and the EOS the model must learn) and their count is printed; no example left is an error.

Run (the defaults are the CPU demo's recipe: the `small` preset from scratch, batch 8, lr 3e-3
constant after a 5-step warmup; the demo has 4,413 expert traces of ~520 tokens, 524 steps an epoch,
and stops at 1,500 steps with --max-steps 1500 and a val loss every 300 steps with --eval-every 300,
about 8 minutes on 2 cores; then a second run continues from its model at a third of the rate for 300
steps, about 1.5-2 minutes):
    python sft.py --data sft.jsonl --model small --out-dir runs/sft
    python sft.py --data sft.jsonl --model runs/sft/final --out-dir runs/sft-cool --max-steps 300 --lr 1e-3
    torchrun --nproc_per_node 2 sft.py --data sft.jsonl --model small --out-dir runs/sft
Continue an interrupted run (same flags):
    python sft.py --data sft.jsonl --model small --out-dir runs/sft --resume
The paper's 7B settings (Qwen2.5-7B-Instruct, lr 5e-5, 1 epoch, max length 4,096; full fine-tuning
rather than the paper's DoRA adapter; batch sizes, warmup and save intervals are ours), on 8 GPUs:
    torchrun --nproc_per_node 8 sft.py --data reasoning.jsonl --model /models/Qwen2.5-7B-Instruct \\
        --out-dir runs/sft-7b --lr 5e-5 --epochs 1 --max-length 4096 --batch-size 64 \\
        --micro-batch-size 1 --warmup-steps 5 --min-lr-ratio 0.1 --weight-decay 0.0 --bf16 \\
        --activation-checkpointing --eval-every 10 --save-every 20
"""
import argparse
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import cello


# ---------------------------------------------------------------------------------------------
# Data: read, tokenize, batch
# ---------------------------------------------------------------------------------------------

def tokenize(tokenizer, records, max_length):
    """(ids, loss_mask) of each record no longer than max_length tokens, and the number skipped."""
    examples = [cello.example_ids(tokenizer, r, r["response"]) for r in records]
    kept = [(ids, mask) for ids, mask in examples if len(ids) <= max_length]
    return kept, len(examples) - len(kept)


def epoch_batches(lengths, batch_size, bucket_batches, seed, epoch):
    """Global batches (lists of example indices) of one epoch, length-bucketed and seeded.

    Shuffle all indices with a generator seeded by (seed, epoch), cut them into buckets of
    batch_size * bucket_batches, sort each bucket by length (longest first), cut it into batches of
    batch_size, then shuffle the order of the batches. The last batch may be smaller.
    The same (seed, epoch) gives the same batches on every rank and after a resume.
    """
    rng = random.Random(f"sft-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def rank_micro_batches(batch, rank, world_size, micro_batch_size):
    """This rank's micro-batches of a global batch: every world_size-th index, in chunks.

    Every rank gets the same number of micro-batches, ceil(ceil(len(batch) / world_size) /
    micro_batch_size), some possibly empty, because under FSDP2 each forward and backward is a
    collective that all ranks must join.
    """
    share = batch[rank::world_size]
    count = math.ceil(math.ceil(len(batch) / world_size) / micro_batch_size)
    return [share[i * micro_batch_size:(i + 1) * micro_batch_size] for i in range(count)]


def micro_batch_rows(examples, indices, pad_id):
    """The (ids, loss_mask) lists of the given examples.

    An empty micro-batch (a rank with nothing left in this global batch) becomes two pad tokens with
    no loss, so that the rank still joins FSDP2's collectives while adding nothing to the gradient.
    """
    return [examples[i] for i in indices] or [([pad_id, pad_id], [0, 0])]


def shared_prefix_length(rows):
    """How many leading tokens all rows share before any row's first loss token.

    rows: (ids, loss_mask) lists. Every chat-formatted example begins with the same system message
    (and, when the puzzles share it, the same context sentence); summed_response_nll runs that part
    once per micro-batch. At most the shortest row's length - 1, so every row keeps a token of its own.
    """
    shortest = min(len(ids) for ids, _ in rows)
    limit = min([shortest - 1] + [mask.index(1) for _, mask in rows if 1 in mask])
    first = rows[0][0]
    n = 0
    while n < limit and all(ids[n] == first[n] for ids, _ in rows):
        n += 1
    if n == 0:
        raise ValueError("sft.py: the examples of a micro-batch share no first token; a chat template that "
                         "renders the system message first gives them one")
    return n


# ---------------------------------------------------------------------------------------------
# Loss, one optimizer step, validation
# ---------------------------------------------------------------------------------------------

def summed_response_nll(model, rows, share_prefix=True):
    """Sum over response tokens of -log p(token | prefix): a scalar tensor.

    rows: (ids, loss_mask) lists; token t of a row is a target where loss_mask[t] is 1. The rows'
    shared prefix (shared_prefix_length) runs once and the rest of every row runs on its keys and
    values (cello.response_logprobs, the shared-prompt path GRPO uses, with the loss mask as target
    mask): the same log-probs and gradients as each row on its own (tests/test_sft.py). In the demo
    the prefix is 187 of a row's ~520 tokens when its puzzles have the same N (the system message
    names N): 0.74x the tokens of its steps. share_prefix=False runs every row whole, in one forward:
    for micro-batches of one sequence (the 7B recipe), which have nothing to share, and where under
    FSDP2 a second forward would gather every layer's weights twice. The output projection runs on
    response tokens only, in chunks, so [B, T, vocab] float32 logits never exist.
    """
    if share_prefix:
        n = shared_prefix_length(rows)
        cuts, prompts = [n] * len(rows), [rows[0][0][:n]]
    else:  # each row's own prompt, as P = B groups of one response
        cuts = [shared_prefix_length([row]) for row in rows]
        prompts = [ids[:k] for (ids, _), k in zip(rows, cuts)]
    logprobs, _ = cello.response_logprobs(model, prompts, [ids[k:] for (ids, _), k in zip(rows, cuts)],
                                          shared_prompt=share_prefix,
                                          target_masks=[mask[k:] for (_, mask), k in zip(rows, cuts)])
    return -logprobs.sum()


def train_step(model, optimizer, scheduler, examples, micro_batches, num_tokens, pad_id, device,
               world_size, max_grad_norm, share_prefix=True):
    """One optimizer step over this rank's micro-batches; returns (loss, grad_norm) of the global batch.

    loss = sum of response-token NLLs over the global batch / num_tokens (its response tokens over
    all micro-batches and ranks). Each rank backpropagates its sum / num_tokens * world_size because
    FSDP2 averages gradients over ranks; the average of the ranks' gradients is then the gradient of
    the global loss. A non-finite loss or gradient norm stops the run before optimizer.step touches
    the weights (so no NaN reaches a checkpoint). share_prefix: see summed_response_nll.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    for indices in micro_batches:
        nll = summed_response_nll(model, micro_batch_rows(examples, indices, pad_id), share_prefix)
        (nll * (world_size / num_tokens)).backward()
        loss_sum += nll.detach()
    if world_size > 1:
        dist.all_reduce(loss_sum)
    grad_norm = cello.clip_grad_norm(model.parameters(), max_grad_norm)
    if not (torch.isfinite(loss_sum) and math.isfinite(grad_norm)):  # both global: every rank stops alike
        sys.exit(f"sft.py: error: non-finite loss or gradient (loss {loss_sum.item() / num_tokens}, grad norm "
                 f"{grad_norm}); the weights were not updated. Lower --lr, or check the model and data; a "
                 "checkpoint saved before this step (--out-dir/last, if any) is intact.")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / num_tokens, grad_norm


@torch.no_grad()
def validation_loss(model, examples, rank, world_size, micro_batch_size, pad_id, device):
    """Token-mean NLL over the response tokens of all validation examples (every rank gets the value)."""
    model.eval()
    totals = torch.zeros(2, device=device)  # [summed NLL, response tokens]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))  # similar lengths together
    for indices in rank_micro_batches(order, rank, world_size, micro_batch_size):
        rows = micro_batch_rows(examples, indices, pad_id)
        totals[0] += summed_response_nll(model, rows, share_prefix=micro_batch_size > 1)
        totals[1] += sum(sum(mask) for _, mask in rows)
    if world_size > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=cello.HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="SFT JSONL: puzzle records with a \"response\" field")
    data.add_argument("--val-data", help="validation SFT JSONL (default: hold out --val-fraction of --data)")
    data.add_argument("--val-fraction", type=float, default=0.05,
                      help="share of --data held out for the validation loss when --val-data is not given")
    data.add_argument("--max-length", type=int, default=2048,
                      help="longest example in tokens (prompt + response + EOS); longer ones are skipped")
    model = parser.add_argument_group("model and output")
    model.add_argument("--model", default="small",
                       help="a preset name (tiny, small: a fresh model with a tokenizer trained on --data's "
                            "train part) or a Hugging Face model folder")
    model.add_argument("--out-dir", required=True, help="folder for metrics.jsonl, last/ and final/")
    model.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last (same flags)")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--batch-size", type=int, default=8, help="global batch in sequences per optimizer step")
    batching.add_argument("--micro-batch-size", type=int, default=8,
                          help="sequences per forward/backward on each rank (gradients are accumulated; "
                               "above 1 the prefix they share, the system message, runs once)")
    batching.add_argument("--bucket-batches", type=int, default=8,
                          help="global batches per length bucket (1: sort within each batch only)")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of AdamW")
    optim.add_argument("--min-lr-ratio", type=float, default=1.0,
                       help="final learning rate / peak, reached by a cosine after warmup (1.0: constant; the "
                            "small model learns to copy only while the lr is high)")
    optim.add_argument("--warmup-steps", type=int, default=5, help="optimizer steps of linear warmup")
    optim.add_argument("--epochs", type=int, default=3, help="passes over the training examples")
    optim.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: --epochs decides)")
    optim.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of matrices")
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this")
    optim.add_argument("--seed", type=int, default=0, help="seed of the model init, data split and order")
    loop = parser.add_argument_group("evaluation and checkpoints")
    loop.add_argument("--eval-every", type=int, default=100, help="optimizer steps between validation losses")
    loop.add_argument("--save-every", type=int, default=100, help="optimizer steps between checkpoints in OUT_DIR/last")
    system = parser.add_argument_group("system")
    system.add_argument("--bf16", action="store_true",
                        help="bf16 compute, float32 master weights (FSDP2 mixed precision under torchrun, "
                        "autocast in 1 process; on a CPU with bfloat16 instructions 1.4x the steps per second)")
    system.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each decoder layer's activations in backward instead of storing them")
    args = parser.parse_args(argv)
    cello.check_ranges("sft.py", args, {
        "--val-fraction": "a number in [0, 1)", "--max-length": "an integer >= 1", "--batch-size": "an integer >= 1",
        "--micro-batch-size": "an integer >= 1", "--bucket-batches": "an integer >= 1", "--lr": "a number > 0",
        "--min-lr-ratio": "a number in [0, 1]",  # below 0 the cosine would end in a negative rate: ascent
        "--warmup-steps": "an integer >= 0", "--epochs": "an integer >= 1", "--max-steps": "an integer >= 0",
        "--weight-decay": "a number >= 0", "--max-grad-norm": "a number > 0 (inf: no limit)",
        "--eval-every": "an integer >= 1", "--save-every": "an integer >= 1", "--seed": "an integer in [0, 2^63)"})
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = cello.setup_distributed()
    torch.manual_seed(args.seed)
    resume_dir = cello.checkpoint_to_resume(args.out_dir, args.resume, "sft.py")  # None for a fresh run

    # Data: the validation split is drawn with its own seeded generator, the same on every rank.
    train_records = cello.read_puzzles(args.data, "--data", "sft.py", need_response=True)
    if args.val_data:
        val_records = cello.read_puzzles(args.val_data, "--val-data", "sft.py", need_response=True)
    else:
        order = list(range(len(train_records)))
        random.Random(f"sft-val-{args.seed}").shuffle(order)
        n_val = min(round(len(order) * args.val_fraction), len(order) - 1)  # at least one training record
        val_records = [train_records[i] for i in sorted(order[:n_val])]
        train_records = [train_records[i] for i in sorted(order[n_val:])]
    cello.check_model_name(args.model, "sft.py")
    cello.make_out_dir(args.out_dir, "sft.py")  # after the data and model are checked: bad input leaves no folder

    # Model: a preset is built once by rank 0 (tokenizer trained on the training text, weights
    # seeded) and loaded by every rank from the same folder, so all ranks start from the same weights.
    last_dir, final_dir = os.path.join(args.out_dir, "last"), os.path.join(args.out_dir, "final")
    model_path = resume_dir or cello.prepare_model(args.model, args.out_dir, train_records, seed=args.seed)
    tokenizer = cello.load_tokenizer(model_path)
    model = cello.load_model(model_path, device=device)
    pad_id = tokenizer.pad_token_id

    train, skipped = tokenize(tokenizer, train_records, args.max_length)
    val, val_skipped = tokenize(tokenizer, val_records, args.max_length)
    if skipped or val_skipped:
        cello.print0(f"sft.py: skipped {skipped} training and {val_skipped} validation examples longer "
                     f"than --max-length {args.max_length} tokens")
    if not train:
        sys.exit(f"sft.py: error: no training example fits --max-length {args.max_length}")
    if val_records and not val:  # a validation set asked for, then silently gone, would hide overfitting
        sys.exit(f"sft.py: error: no validation example fits --max-length {args.max_length}")
    lengths = [len(ids) for ids, _ in train]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    cello.print0(f"sft.py: {len(train)} training / {len(val)} validation examples, {world_size} process(es), "
                 f"{steps_per_epoch} steps per epoch, {total_steps} steps")

    model = cello.shard_model(model, device, bf16=args.bf16, activation_checkpointing=args.activation_checkpointing)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms and biases do not
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cello.lr_factor(step, args.warmup_steps, total_steps, args.min_lr_ratio))

    # the data position is a function of the step: it means the same batches only for the same examples,
    # split, batch size and seed (--max-steps may change: a run can be continued past its end). The
    # optimizer state keeps its learning rate and weight decay, so those must not change either.
    run_identity = {"script": "sft.py", "--data": cello.file_fingerprint(args.data), "--batch-size": args.batch_size,
                    "--seed": args.seed, "--max-length": args.max_length, "--bucket-batches": args.bucket_batches,
                    "--val-data": cello.file_fingerprint(args.val_data) if args.val_data else None,
                    "--val-fraction": None if args.val_data else args.val_fraction,
                    "--lr": args.lr, "--weight-decay": args.weight_decay,
                    # resume loads the weights from last/, so the starting model is only known by this entry
                    "--model": args.model if args.model in cello.PRESETS else cello.model_fingerprint(args.model)}
    step = 0
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if args.resume:
        step = cello.load_resume(resume_dir, model, optimizer, scheduler, expect=run_identity)["step"]
        if step > total_steps:  # else final/ would be rewritten with the later step's weights
            sys.exit(f"sft.py: error: --resume: {resume_dir} is at step {step}, past this run's {total_steps} steps: "
                     "nothing to train; ask for more with --max-steps")
        cello.print0(f"sft.py: resuming at step {step + 1} from {resume_dir}")
    cello.keep_metrics_until(metrics_path, step)

    progress = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0)
    batches, batches_epoch = None, None
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if batches_epoch != epoch:  # the data position is a function of the step: nothing else to save
            batches, batches_epoch = epoch_batches(lengths, args.batch_size, args.bucket_batches, args.seed, epoch), epoch
        batch = batches[position]
        num_tokens = sum(sum(train[i][1]) for i in batch)  # response tokens of the global batch
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
        started = time.perf_counter()
        with cello.bf16_autocast(model, args.bf16):
            loss, grad_norm = train_step(model, optimizer, scheduler, train,
                                         rank_micro_batches(batch, rank, world_size, args.micro_batch_size),
                                         num_tokens, pad_id, device, world_size, args.max_grad_norm,
                                         share_prefix=args.micro_batch_size > 1)
        step += 1
        tokens = sum(lengths[i] for i in batch)
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr,
               "grad_norm": grad_norm, "tokens": tokens,
               "tokens_per_s": tokens / (time.perf_counter() - started)}
        if val and (step % args.eval_every == 0 or step == total_steps):
            with cello.bf16_autocast(model, args.bf16):
                row["val_loss"] = validation_loss(model, val, rank, world_size, args.micro_batch_size, pad_id, device)
        if rank == 0:
            cello.append_jsonl(metrics_path, [row])
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", **({"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}))
        if step % args.save_every == 0 or step == total_steps:  # the last too: --resume --max-steps N continues
            cello.save_checkpoint(last_dir, model, tokenizer, optimizer, scheduler,
                                  state={"step": step, **run_identity})  # the step fixes the data position
    progress.close()
    cello.save_checkpoint(final_dir, model, tokenizer)
    cello.print0(f"sft.py: final model in {final_dir}")
    cello.cleanup_distributed()


if __name__ == "__main__":
    cello.run_script(main, "sft.py", "the same command with --resume continues from the last checkpoint "
                                     "(--out-dir/last, saved every --save-every steps)")
