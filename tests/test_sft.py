"""sft.py: the model learns, prompt tokens carry no loss, global-batch normalisation, batching,
the schedule, exact resume, 2-process FSDP2 = 1 process, and one-line errors on bad input."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cello
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKERS = {"CD56+ NK": ["GNLY", "NKG7", "GZMB"], "CD14+ Monocyte": ["CD14", "LYZ", "S100A8"],
           "CD19+ B": ["CD79A", "MS4A1", "CD19"], "CD4+ T": ["IL7R", "CD4", "LDHB"],
           "CD34+": ["CD34", "PRSS57", "SOX4"]}


def make_records(count, seed=0):
    """Small SFT records: 3 cells of marker genes plus noise genes, an expert-like response."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        labels = rng.sample(sorted(MARKERS), 3)
        cells = [rng.sample(MARKERS[label], 3) + [f"G{rng.randrange(40)}" for _ in range(rng.randrange(2, 9))]
                 for label in labels]
        think = " ".join(f"Cell {k + 1} expresses {c[0]} and {c[1]}: {label}."
                         for k, (c, label) in enumerate(zip(cells, labels)))
        records.append({"id": f"syn/{i}", "source": "syn", "donor": "D0", "batch": None, "split": "train",
                        "context": "The cell is from a female.", "cells": cells,
                        "candidates": sorted(labels), "answer": labels,
                        "response": f"<think>{think}</think>\n<answer>{' | '.join(labels)}</answer>"})
    return records


def write(path, records):
    cello.write_jsonl_atomic(str(path), records)
    return str(path)


def metrics(out_dir):
    return cello.read_jsonl(os.path.join(out_dir, "metrics.jsonl"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model folder with its tokenizer trained on the synthetic records."""
    return cello.prepare_model("tiny", str(tmp_path_factory.mktemp("tiny")), make_records(16), seed=0)


# ---- the model learns ----

def test_training_loss_drops_and_final_model_loads(tmp_path):
    data = write(tmp_path / "sft.jsonl", make_records(6))
    out = str(tmp_path / "run")
    sft.main(["--data", data, "--model", "tiny", "--out-dir", out, "--batch-size", "3", "--micro-batch-size", "2",
              "--max-steps", "40", "--lr", "1e-2", "--warmup-steps", "3", "--val-fraction", "0",
              "--eval-every", "100", "--save-every", "100"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert set(rows[0]) >= {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    # each row logs the rate its step used: step s (1-based) is optimizer step s - 1 of the schedule
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * cello.lr_factor(s - 1, 3, 40) for s in range(1, 41)],
                                                    rel=1e-12)
    assert [r["lr"] for r in rows[:4]] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2], rel=1e-12)
    assert "val_loss" not in rows[-1]  # --val-fraction 0: nothing to validate on
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert first > 5.0  # about log(vocab) at the start
    assert last < 0.35 * first, (first, last)
    # the final folder is an ordinary HF folder that loads and gives the trained (low) loss
    model, tokenizer = cello.load_model(os.path.join(out, "final")), cello.load_tokenizer(os.path.join(out, "final"))
    examples, _ = sft.tokenize(tokenizer, make_records(6), 10_000)
    with torch.no_grad():
        loss = sft.summed_response_nll(model, examples).item() / sum(sum(mask) for _, mask in examples)
    assert loss < 0.35 * first


def test_fine_tunes_an_existing_model_folder_into_a_new_out_dir(tiny, tmp_path):
    """--model FOLDER (as for Qwen2.5-7B): out-dir is created, the folder's tokenizer is kept."""
    data = write(tmp_path / "sft.jsonl", make_records(4))
    out = tmp_path / "new" / "run"
    sft.main(["--data", data, "--model", tiny, "--out-dir", str(out), "--max-steps", "2", "--val-fraction", "0",
              "--batch-size", "2"])
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert not (out / "tiny-init").exists()
    with open(os.path.join(tiny, "tokenizer.json")) as a, open(out / "final" / "tokenizer.json") as b:
        assert json.load(a)["model"]["vocab"] == json.load(b)["model"]["vocab"]


# ---- the loss: response tokens only, normalised by the global batch ----

def test_examples_mask_exactly_the_response_and_eos(tiny):
    tokenizer = cello.load_tokenizer(tiny)
    records = make_records(3)
    examples, skipped = sft.tokenize(tokenizer, records, 10_000)
    assert skipped == 0
    for (ids, mask), record in zip(examples, records):
        prompt = cello.prompt_ids(tokenizer, record)
        assert ids[:len(prompt)] == prompt and ids[-1] == tokenizer.eos_token_id
        assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == record["response"] + "<|im_end|>"


def test_shared_prefix_length_stops_at_the_first_difference_or_loss_token():
    assert sft.shared_prefix_length([([5, 6, 7, 8, 9], [0, 0, 0, 1, 1]),
                                     ([5, 6, 7, 2, 9, 9], [0, 0, 0, 0, 1, 1])]) == 3  # 8 != 2
    assert sft.shared_prefix_length([([5, 6, 7, 8], [0, 0, 1, 1]),
                                     ([5, 6, 7, 9], [0, 0, 0, 1])]) == 2  # token 2 is a target in row 0
    assert sft.shared_prefix_length([([5, 6, 7, 8], [0, 0, 1, 1])]) == 2  # one row: its prompt
    assert sft.shared_prefix_length([([5, 6], [0, 0]), ([5, 6, 7], [0, 0, 0])]) == 1  # each row keeps a token
    assert sft.shared_prefix_length(sft.micro_batch_rows([], [], pad_id=0)) == 1  # an empty rank's dummy row
    with pytest.raises(ValueError, match="share no first token"):
        sft.shared_prefix_length([([5, 6, 7], [0, 0, 1]), ([4, 6, 7], [0, 0, 1])])


def test_altering_prompt_tokens_does_not_change_the_loss(tiny):
    """With attention switched off (o_proj = 0) each position sees only its own token, so the
    response's losses do not depend on earlier prompt tokens; then changing every prompt token but
    the first (which the rows share) and the last must leave the loss unchanged, while it does change
    a loss that counts prompt tokens."""
    tokenizer, model = cello.load_tokenizer(tiny), cello.load_model(tiny)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    examples, _ = sft.tokenize(tokenizer, make_records(2), 10_000)
    altered = []
    for ids, mask in examples:
        prompt_len = mask.index(1)
        noise = torch.randint(3, len(tokenizer), (prompt_len - 2,)).tolist()
        altered.append(([ids[0]] + noise + ids[prompt_len - 1:], mask))
    assert altered != examples
    everything = lambda rows: [(ids, [0] + [1] * (len(ids) - 1)) for ids, _ in rows]  # prompt tokens count too
    with torch.no_grad():
        loss = sft.summed_response_nll(model, examples)
        loss_altered = sft.summed_response_nll(model, altered)
        loss_everything = sft.summed_response_nll(model, everything(examples))
        loss_everything_altered = sft.summed_response_nll(model, everything(altered))
    torch.testing.assert_close(loss_altered, loss, rtol=1e-6, atol=1e-5)
    assert abs(loss_everything_altered - loss_everything) > 1.0


def naive_nll_and_grads(model, examples, pad_id):
    """Each row's response NLL summed, from the full [B, T, V] logits of padded rows, and its gradients."""
    ids, real = cello.right_pad([ids for ids, _ in examples], fill=pad_id)
    mask, _ = cello.right_pad([m for _, m in examples], dtype=torch.float32)
    logits = model(input_ids=ids, attention_mask=real.long()).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    total = (nll * mask[:, 1:]).sum()
    model.zero_grad(set_to_none=True)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total.detach(), grads, nll.detach(), mask


@pytest.mark.parametrize("same_n", [True, False])
def test_summed_loss_and_gradients_equal_naive_cross_entropy(tiny, same_n):
    """The shared prefix (the system message, whose N differs across puzzles of different sizes) runs
    once; loss and gradients equal each row run on its own through the plain model."""
    tokenizer, model = cello.load_tokenizer(tiny), cello.load_model(tiny)
    records = make_records(3)
    for i, record in enumerate(records):  # responses of different lengths
        record["response"] = record["response"].replace("<think>", "<think>" + "Cell by cell. " * i)
    if not same_n:  # a 2-cell puzzle: "a batch of 2 cells" in its system message
        records[1].update(cells=records[1]["cells"][:2], answer=records[1]["answer"][:2],
                          candidates=sorted(records[1]["answer"][:2]))
    examples, _ = sft.tokenize(tokenizer, records, 10_000)
    n = sft.shared_prefix_length(examples)
    system = len(tokenizer.encode(cello.render_system(records[0]), add_special_tokens=False))
    assert (n > system) if same_n else (2 < n < system)  # the context and "Cell 1:" too, or part of the system
    total, naive_grads, nll, mask = naive_nll_and_grads(model, examples, tokenizer.pad_token_id)
    with torch.no_grad():  # each row whole, as for micro-batches of one sequence
        torch.testing.assert_close(sft.summed_response_nll(model, examples, share_prefix=False), total,
                                   rtol=1e-5, atol=1e-4)
    loss = sft.summed_response_nll(model, examples)
    torch.testing.assert_close(loss.detach(), total, rtol=1e-5, atol=1e-4)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, naive_grads[name], rtol=1e-4, atol=1e-5 * naive_grads[name].abs().max())
    # the validation loss is the token mean over all examples (micro-batches of 2 and 1 here), not a
    # mean of per-example or per-batch means
    token_mean = ((nll * mask[:, 1:]).sum() / mask[:, 1:].sum()).item()
    assert len({sum(m) for _, m in examples}) > 1  # lengths differ, so the kind of mean matters
    assert sft.validation_loss(model, examples, 0, 1, 2, tokenizer.pad_token_id, "cpu") == pytest.approx(token_mean,
                                                                                                         rel=1e-5)


def one_step(tiny, micro_batch_size):
    """(loss, grad_norm, weights) after one SGD step on a 4-example global batch."""
    tokenizer = cello.load_tokenizer(tiny)
    model = cello.load_model(tiny)
    records = make_records(4, seed=3)
    for i, record in enumerate(records):  # responses of different lengths: the normalisation then matters
        record["response"] = record["response"].replace("<think>", "<think>" + "Cell by cell. " * i)
    examples, _ = sft.tokenize(tokenizer, records, 10_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = [0, 1, 2, 3]
    num_tokens = sum(sum(examples[i][1]) for i in batch)
    loss, grad_norm = sft.train_step(model, optimizer, scheduler, examples,
                                     sft.rank_micro_batches(batch, 0, 1, micro_batch_size), num_tokens,
                                     tokenizer.pad_token_id, "cpu", 1, max_grad_norm=1e9,
                                     share_prefix=micro_batch_size > 1)  # as sft.main decides
    return loss, grad_norm, {k: v.clone() for k, v in model.state_dict().items()}, examples


def test_loss_is_normalised_by_the_global_batch_not_per_micro_batch(tiny):
    loss_1, norm_1, weights_1, examples = one_step(tiny, micro_batch_size=1)
    loss_4, norm_4, weights_4, _ = one_step(tiny, micro_batch_size=4)
    assert len({sum(mask) for _, mask in examples}) > 1  # response lengths differ, so the choice matters
    assert loss_1 == pytest.approx(loss_4, rel=1e-6)
    assert norm_1 == pytest.approx(norm_4, rel=1e-5)
    for name in weights_1:
        torch.testing.assert_close(weights_1[name], weights_4[name], rtol=1e-5, atol=1e-6)


# ---- batching and schedule ----

def test_epoch_batches_are_seeded_length_sorted_partitions():
    lengths = [(i * 37) % 91 + 5 for i in range(23)]
    batches = sft.epoch_batches(lengths, batch_size=4, bucket_batches=2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert sorted(len(b) for b in batches) == [3] + [4] * 5
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert batches == sft.epoch_batches(lengths, 4, 2, seed=0, epoch=0)
    assert batches != sft.epoch_batches(lengths, 4, 2, seed=0, epoch=1)
    assert batches != sft.epoch_batches(lengths, 4, 2, seed=1, epoch=0)
    # one bucket of 24 >= 23: the batches are consecutive slices of all examples sorted by length
    # (the lengths are distinct), in shuffled order
    one_bucket = sft.epoch_batches(lengths, batch_size=4, bucket_batches=6, seed=0, epoch=0)
    by_length = sorted(range(23), key=lambda i: -lengths[i])
    assert sorted(one_bucket) == sorted(by_length[i:i + 4] for i in range(0, 23, 4))
    firsts = [lengths[b[0]] for b in one_bucket]
    assert firsts != sorted(firsts, reverse=True)


def test_rank_micro_batches_split_a_global_batch_evenly():
    batch = [7, 3, 9, 1, 4]
    assert sft.rank_micro_batches(batch, 0, 1, 2) == [[7, 3], [9, 1], [4]]
    assert sft.rank_micro_batches(batch, 0, 2, 2) == [[7, 9], [4]]
    assert sft.rank_micro_batches(batch, 1, 2, 2) == [[3, 1], []]  # same count on every rank
    assert sft.rank_micro_batches([5], 1, 2, 4) == [[]]


def test_lr_factor_warmup_then_cosine():
    assert [cello.lr_factor(s, 2, 11, 0.1) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cello.lr_factor(6, 2, 11, 0.1) == pytest.approx(0.55)  # halfway through the cosine
    assert cello.lr_factor(10, 2, 11, 0.1) == pytest.approx(0.1)  # the last step
    assert cello.lr_factor(12, 2, 11, 0.1) == pytest.approx(0.1)  # past the end (a run continued): stays there
    assert cello.lr_factor(0, 0, 5, 0.0) == 1.0
    assert [cello.lr_factor(s, 2, 3, 0.1) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]  # one step after warm-up: the peak
    assert [cello.lr_factor(s, 2, 11) for s in (0, 1, 5, 10)] == [0.5, 1.0, 1.0, 1.0]  # GRPO's: constant after warm-up


def test_logged_lr_follows_warmup_then_cosine(tmp_path):
    data = write(tmp_path / "sft.jsonl", make_records(4))
    out = tmp_path / "run"
    sft.main(["--data", data, "--model", "tiny", "--out-dir", str(out), "--batch-size", "2", "--max-steps", "6",
              "--lr", "2e-3", "--warmup-steps", "2", "--min-lr-ratio", "0.1", "--val-fraction", "0"])
    lrs = [r["lr"] for r in metrics(out)]
    # steps 1-2 warm up (1/2, 1); steps 3-6 are cosine progress 0, 1/3, 2/3, 1 from 1 to 0.1:
    # 0.1 + 0.45 * (1 + cos(pi * p)) = 1, 0.775, 0.325, 0.1
    assert lrs == pytest.approx([1e-3, 2e-3, 2e-3, 1.55e-3, 0.65e-3, 0.2e-3], rel=1e-9)
    assert lrs == pytest.approx([2e-3 * cello.lr_factor(s, 2, 6, 0.1) for s in range(6)], rel=1e-12)


def test_a_run_continued_past_its_end_follows_the_new_schedule_from_its_first_step(tmp_path):
    """The optimizer state holds the old schedule's last rate; the first resumed step must not use it."""
    data = write(tmp_path / "sft.jsonl", make_records(4))
    flags = ["--data", data, "--model", "tiny", "--out-dir", str(tmp_path / "run"), "--batch-size", "2",
             "--lr", "2e-3", "--warmup-steps", "2", "--min-lr-ratio", "0.1", "--val-fraction", "0"]
    sft.main(flags + ["--max-steps", "4"])
    sft.main(flags + ["--max-steps", "8", "--resume"])
    lrs = [r["lr"] for r in metrics(tmp_path / "run")]
    assert lrs[:4] == pytest.approx([2e-3 * cello.lr_factor(s, 2, 4, 0.1) for s in range(4)], rel=1e-12)
    assert lrs[4:] == pytest.approx([2e-3 * cello.lr_factor(s, 2, 8, 0.1) for s in range(4, 8)], rel=1e-12)


def test_train_step_clips_the_gradient_norm(tiny):
    # SGD at lr 1 without momentum: the weights move by exactly the clipped gradient, whose global norm
    # is max_grad_norm when the raw gradient is larger; train_step returns the raw norm
    tokenizer = cello.load_tokenizer(tiny)
    model, start = cello.load_model(tiny), cello.load_model(tiny)
    examples, _ = sft.tokenize(tokenizer, make_records(2, seed=4), 10_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    num_tokens = sum(sum(mask) for _, mask in examples)
    loss, grad_norm = sft.train_step(model, optimizer, scheduler, examples, [[0, 1]], num_tokens,
                                     tokenizer.pad_token_id, "cpu", 1, max_grad_norm=1e-3)
    assert grad_norm > 1e-2 and loss > 5.0  # about log(vocab): a fresh model, a large gradient
    moved = torch.cat([(p - p0).detach().view(-1) for p, p0 in zip(model.parameters(), start.parameters())])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_tokenize_keeps_an_example_of_exactly_max_length(tiny):
    tokenizer = cello.load_tokenizer(tiny)
    records = make_records(3, seed=2)
    lengths = [len(cello.example_ids(tokenizer, r, r["response"])[0]) for r in records]
    kept, skipped = sft.tokenize(tokenizer, records, sorted(lengths)[1])  # the middle length is the limit
    assert sorted(len(ids) for ids, _ in kept) == sorted(lengths)[:2] and skipped == 1


def test_a_step_uses_the_learning_rate_of_its_own_step(tiny):
    """optimizer.step before scheduler.step: step 0 runs at the schedule's rate for step 0 (here 0, so
    the weights must not move), not at step 1's."""
    tokenizer = cello.load_tokenizer(tiny)
    model = cello.load_model(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples, _ = sft.tokenize(tokenizer, make_records(2, seed=4), 10_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step == 0 else 1.0)
    sft.train_step(model, optimizer, scheduler, examples, [[0, 1]], sum(sum(m) for _, m in examples),
                   tokenizer.pad_token_id, "cpu", 1, max_grad_norm=1e9)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert optimizer.param_groups[0]["lr"] == 1.0  # and the scheduler has moved on to step 1


# ---- resume ----

def test_resume_continues_at_the_next_step_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    data = write(tmp_path / "sft.jsonl", make_records(12))
    val = write(tmp_path / "val.jsonl", make_records(3, seed=9))
    flags = ["--data", data, "--val-data", val, "--model", "tiny", "--batch-size", "3", "--micro-batch-size", "2",
             "--epochs", "2", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "2", "--save-every", "3"]
    real_step = sft.train_step
    seen = []

    def recording_step(*args, **kwargs):
        if kwargs.pop("crash_on", None):
            raise RuntimeError("simulated crash")
        seen.append(sorted(i for micro in args[4] for i in micro))  # the global batch of this step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", recording_step)
    sft.main(flags + ["--out-dir", str(tmp_path / "a")])  # 8 steps: 4 per epoch
    batches_a = list(seen)
    assert len(batches_a) == 8

    seen.clear()
    monkeypatch.setattr(sft, "train_step", lambda *a, **k: recording_step(*a, crash_on=len(seen) == 4, **k))
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in step 5, after the checkpoint of step 3
        sft.main(flags + ["--out-dir", str(tmp_path / "b")])
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2, 3, 4]

    seen.clear()
    monkeypatch.setattr(sft, "train_step", recording_step)
    sft.main(flags + ["--out-dir", str(tmp_path / "b"), "--resume"])
    assert seen == batches_a[3:]  # continues at step 4 with the same next batch, across the epoch end

    rows_a, rows_b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    # --eval-every 2 over 8 steps (the last, 8, is one of them): val_loss on steps 2, 4, 6, 8 of both runs
    assert [r["step"] for r in rows_a if "val_loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in rows_b if "val_loss" in r] == [2, 4, 6, 8]
    for a, b in zip(rows_a, rows_b):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        if "val_loss" in a:  # the same steps in both (asserted above); approx(None) is an error since pytest 9.2
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    final_a = load_file(os.path.join(tmp_path, "a", "final", "model.safetensors"))
    final_b = load_file(os.path.join(tmp_path, "b", "final", "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], rtol=1e-5, atol=1e-6)

    # the last step is checkpointed too (8 is not a multiple of --save-every 3), so a finished run can be
    # continued past its end; its batches belong to its data, batch size and seed, so others are refused
    assert torch.load(tmp_path / "a" / "last" / "resume.pt", weights_only=False)["state"]["step"] == 8
    other = write(tmp_path / "other.jsonl", make_records(12, seed=5))
    without_val = flags[:2] + flags[4:]  # the validation set from --val-fraction instead: other training examples
    for run_flags, key in ((flags + ["--batch-size", "4"], "--batch-size 3, this run has 4"),
                           (flags + ["--data", other], f"--data {cello.file_fingerprint(data)}"),
                           (flags + ["--lr", "1e-3"], "--lr 0.003, this run has 0.001"),  # the optimizer keeps its own
                           (without_val, f"--val-data {cello.file_fingerprint(val)}, this run has None")):
        with pytest.raises(SystemExit) as stop:
            sft.main(run_flags + ["--out-dir", str(tmp_path / "a"), "--resume"])
        assert f"was saved with {key}" in stop.value.code
    seen.clear()
    moved = shutil.copy(data, tmp_path / "moved.jsonl")  # the same data elsewhere is the same run
    sft.main(flags + ["--data", str(moved), "--out-dir", str(tmp_path / "a"), "--resume", "--max-steps", "9"])
    assert len(seen) == 1 and [r["step"] for r in metrics(tmp_path / "a")] == list(range(1, 10))  # one step more


# ---- torchrun: 2 processes with FSDP2 give the 1-process loss curve ----

@pytest.mark.slow
@pytest.mark.parametrize("micro_batch_size", ["2", "1"])  # the shared prefix run once; each sequence whole
def test_two_process_fsdp2_matches_one_process(tmp_path, micro_batch_size):
    """Same global batch (5 sequences: 3 + 2 per rank, so one rank runs an empty micro-batch), same
    losses, gradient norms and validation losses to 1e-5 relative (float32 summation order differs)."""
    data = write(tmp_path / "sft.jsonl", make_records(12))
    flags = ["--data", data, "--model", "tiny", "--batch-size", "5", "--micro-batch-size", micro_batch_size,
             "--max-steps", "5", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "2", "--save-every", "100",
             "--val-fraction", "0.2"]
    sft.main(flags + ["--out-dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    # --standalone: torchrun picks a free port itself, so parallel jobs never collide
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "sft.py"), *flags,
                             "--out-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "rank0" in line)[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    # --eval-every 2 and the last step (5): val_loss on steps 2, 4 and 5 of both runs
    assert [r["step"] for r in one if "val_loss" in r] == [2, 4, 5]
    assert [r["step"] for r in two if "val_loss" in r] == [2, 4, 5]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        if "val_loss" in a:  # the same steps in both (asserted above); approx(None) is an error since pytest 9.2
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    final_one = load_file(os.path.join(tmp_path, "one", "final", "model.safetensors"))
    final_two = load_file(os.path.join(tmp_path, "two", "final", "model.safetensors"))
    for name in final_one:
        torch.testing.assert_close(final_two[name], final_one[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_stop_together_on_a_damaged_checkpoint(tmp_path):
    """Rank 0 reads the optimizer state; cut short, it stops rank 1 too with rank 0's one line, instead
    of leaving it to fail in the broadcast with gloo's "Connection closed by peer" traceback."""
    data = write(tmp_path / "sft.jsonl", make_records(8))
    flags = ["--data", data, "--model", "tiny", "--batch-size", "2", "--save-every", "1", "--val-fraction", "0",
             "--out-dir", str(tmp_path / "run")]
    sft.main(flags + ["--max-steps", "1"])
    cello.release_out_dirs()  # this process's run is over: the torchrun below takes the folder
    state = tmp_path / "run" / "last" / "optimizer.pt"
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "sft.py"), *flags, "--max-steps", "2", "--resume"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = f"cello: error: cannot read {tmp_path / 'run' / 'last' / 'optimizer.pt'} ("
    # rank 0's line always; rank 1's too unless torchrun, seeing rank 0 fail, terminates it first
    assert 1 <= sum(line.startswith(message) for line in result.stderr.splitlines()) <= 2, result.stderr[-3000:]
    assert "Connection closed" not in result.stderr and "[rank1]: Traceback" not in result.stderr


# ---- bad input: one clear line, non-zero exit ----

@pytest.mark.parametrize("content, message", [
    (None, "--data {path}: no such file"),
    ("folder", "--data {path}: is a folder (expected a JSONL file of puzzle records)"),
    ('{"id": "a"', "{path} line 1: not valid JSON"),
    ('{"id": "a", "context": "x"}\n', "{path} line 1: record has no \"response\" text"),
    ('{"id": "a", "context": "x", "response": " "}\n', "{path} line 1: record has no \"response\" text"),
    ("\n", "--data {path}: no records"),
])
def test_bad_data_file_exits_with_one_line(tmp_path, content, message):
    path = tmp_path / "sft.jsonl"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--data", str(path), "--model", "tiny", "--out-dir", str(tmp_path / "out")])
    text = str(exit_info.value.code)
    assert text.startswith("sft.py: error: ") and "\n" not in text
    assert message.format(path=path) in text


def test_examples_longer_than_max_length_are_skipped_or_refused(tmp_path, capsys):
    data = write(tmp_path / "sft.jsonl", make_records(4))
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--data", data, "--model", "tiny", "--out-dir", str(tmp_path / "out"), "--max-length", "20",
                  "--val-fraction", "0"])
    assert str(exit_info.value.code) == "sft.py: error: no training example fits --max-length 20"
    assert "skipped 4 training and 0 validation examples longer than --max-length 20 tokens" in capsys.readouterr().out
    # a validation file whose examples are all too long would leave the run without a validation loss
    records = make_records(4)
    long = [dict(r, response=r["response"].replace("<think>", "<think>" + "Cell by cell. " * 60)) for r in records]
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--data", data, "--val-data", write(tmp_path / "val.jsonl", long), "--model", "tiny",
                  "--out-dir", str(tmp_path / "out2"), "--max-length", "400"])
    assert str(exit_info.value.code) == "sft.py: error: no validation example fits --max-length 400"


def test_a_late_bad_input_leaves_no_out_dir_behind(tmp_path):
    """--max-length is checked after the tiny preset was built inside --out-dir: the failed run
    removes the folders it created, but never a folder that existed before or holds work."""
    data = write(tmp_path / "sft.jsonl", make_records(4))

    def run(out_dir):
        flags = ["--data", data, "--model", "tiny", "--out-dir", str(out_dir), "--max-length", "20", "--val-fraction", "0"]
        with pytest.raises(SystemExit) as exit_info:
            cello.run_script(lambda: sft.main(flags), "sft.py", "-")
        assert str(exit_info.value.code) == "sft.py: error: no training example fits --max-length 20"

    run(tmp_path / "new" / "deeper" / "out")  # three folders created, then the preset built in the last
    assert os.listdir(tmp_path) == ["sft.jsonl"]
    (tmp_path / "mine").mkdir()
    run(tmp_path / "mine")  # the user's own folder stays
    assert sorted(os.listdir(tmp_path / "mine")) == [".lock", "tiny-init"]
    # a folder this run created that holds anything but a preset is kept, and so are its parents
    cello.make_out_dir(str(tmp_path / "a" / "b"), "sft.py")
    (tmp_path / "a" / "b" / "metrics.jsonl").write_text("{}\n")
    cello.remove_unused_out_dirs()
    assert sorted(os.listdir(tmp_path / "a" / "b")) == [".lock", "metrics.jsonl"]


def test_a_non_finite_loss_stops_before_the_weights_change(tiny):
    tokenizer, model = cello.load_tokenizer(tiny), cello.load_model(tiny)
    examples, _ = sft.tokenize(tokenizer, make_records(2), 10_000)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # every logit row holds a NaN: the loss is NaN
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    num_tokens = sum(sum(mask) for _, mask in examples)
    with pytest.raises(SystemExit) as exit_info:
        sft.train_step(model, optimizer, scheduler, examples, [[0, 1]], num_tokens, tokenizer.pad_token_id, "cpu", 1,
                       max_grad_norm=1.0)
    assert str(exit_info.value.code).startswith("sft.py: error: non-finite loss or gradient (loss nan")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("flags, message", [
    (["--micro-batch-size", "0"], "--micro-batch-size: expected an integer >= 1, got 0"),
    (["--warmup-steps", "-1"], "--warmup-steps: expected an integer >= 0, got -1"),
    (["--lr", "0"], "--lr: expected a number > 0, got 0.0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm: expected a number > 0 (inf: no limit), got -1.0"),
    (["--val-fraction", "1"], "--val-fraction: expected a number in [0, 1), got 1.0"),
    (["--min-lr-ratio", "-1"], "--min-lr-ratio: expected a number in [0, 1], got -1.0"),
    (["--seed", "-1"], "--seed: expected an integer in [0, 2^63), got -1"),
    (["--seed", str(2**63)], f"--seed: expected an integer in [0, 2^63), got {2**63}"),
    (["--model", "bogus"], "--model 'bogus': neither a preset (tiny, small) nor a Hugging Face model folder "
                           "(no config.json)"),
])
def test_bad_flag_is_a_one_line_error(tmp_path, flags, message):
    data = write(tmp_path / "sft.jsonl", make_records(2))
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--data", data, "--out-dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == f"sft.py: error: {message}"
    assert not os.path.exists(tmp_path / "out")


def test_resume_without_checkpoint_via_the_cli(tmp_path):
    data = write(tmp_path / "sft.jsonl", make_records(2))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--data", data, "--out-dir",
                             str(tmp_path / "out"), "--resume"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"sft.py: error: --resume: no checkpoint {tmp_path / 'out' / 'last'} to resume from")


def test_the_validation_split_leaves_at_least_one_training_record(tmp_path, capsys):
    data = write(tmp_path / "sft.jsonl", make_records(3))
    sft.main(["--data", data, "--model", "tiny", "--out-dir", str(tmp_path / "out"), "--val-fraction", "0.9",
              "--max-steps", "1"])
    assert "sft.py: 1 training / 2 validation examples" in capsys.readouterr().out


# ---- found by mutation testing: empty micro-batches, the gradient check, the val split, metrics, epochs, identity ----

def sgd_step(tiny, micro_batches):
    tokenizer, model = cello.load_tokenizer(tiny), cello.load_model(tiny)
    examples, _ = sft.tokenize(tokenizer, make_records(2, seed=4), 10_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss, norm = sft.train_step(model, optimizer, scheduler, examples, micro_batches,
                                sum(sum(m) for _, m in examples), tokenizer.pad_token_id, "cpu", 1, max_grad_norm=1e9)
    return loss, norm, model.state_dict()


def test_an_empty_micro_batch_adds_no_loss_and_no_gradient(tiny):
    """An empty micro-batch (a rank with nothing left) runs a dummy row that carries no loss."""
    loss, norm, weights = sgd_step(tiny, [[0, 1]])
    loss_e, norm_e, weights_e = sgd_step(tiny, [[0, 1], []])
    assert loss_e == pytest.approx(loss, rel=1e-6) and norm_e == pytest.approx(norm, rel=1e-6)
    for name in weights:
        torch.testing.assert_close(weights_e[name], weights[name], rtol=1e-6, atol=1e-7)


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_weights_change(tiny):
    """The stop checks the gradient norm too, not only the loss."""
    tokenizer, model = cello.load_tokenizer(tiny), cello.load_model(tiny)
    examples, _ = sft.tokenize(tokenizer, make_records(2), 10_000)
    model.lm_head.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(SystemExit, match="non-finite loss or gradient"):
        sft.train_step(model, optimizer, scheduler, examples, [[0, 1]], sum(sum(m) for _, m in examples),
                       tokenizer.pad_token_id, "cpu", 1, max_grad_norm=1.0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def val_ids(tmp_path, monkeypatch, seed, fraction):
    """The ids of the validation records sft.main holds out of 10 records."""
    seen = []
    real = sft.tokenize
    monkeypatch.setattr(sft, "tokenize", lambda tok, records, n: seen.append([r["id"] for r in records])
                        or real(tok, records, n))
    data = write(tmp_path / "sft.jsonl", make_records(10))
    sft.main(["--data", data, "--model", "tiny", "--out-dir", str(tmp_path / f"out-{seed}-{fraction}"),
              "--val-fraction", fraction, "--seed", str(seed), "--max-steps", "1", "--batch-size", "2"])
    return seen[1]  # tokenize(train), then tokenize(val)


def test_the_validation_split_is_a_seeded_shuffle_rounded_to_the_nearest_count(tmp_path, monkeypatch):
    """--val-fraction 0.29 of 10 holds out round(2.9) = 3 records, drawn by --seed (not the first ones)."""
    assert val_ids(tmp_path, monkeypatch, 0, "0.29") == ["syn/1", "syn/4", "syn/5"]
    assert val_ids(tmp_path, monkeypatch, 1, "0.29") == ["syn/1", "syn/5", "syn/8"]


def test_the_last_step_gets_a_validation_loss(tmp_path):
    """val_loss every --eval-every steps and on the last step."""
    data, val = write(tmp_path / "sft.jsonl", make_records(4)), write(tmp_path / "val.jsonl", make_records(2, seed=9))
    sft.main(["--data", data, "--val-data", val, "--model", "tiny", "--out-dir", str(tmp_path / "run"),
              "--batch-size", "2", "--max-steps", "3", "--eval-every", "2"])
    assert [r["step"] for r in metrics(tmp_path / "run") if "val_loss" in r] == [2, 3]


def train_tiny_without_val(tmp_path, records, *flags):
    """sft.py on the tiny preset with every record in training; returns (run folder, all their tokens)."""
    out = tmp_path / "run"
    sft.main(["--data", write(tmp_path / "sft.jsonl", records), "--model", "tiny", "--out-dir", str(out),
              "--val-fraction", "0", *flags])
    tokenizer = cello.load_tokenizer(str(out / "tiny-init"))
    return out, sum(len(cello.example_ids(tokenizer, r, r["response"])[0]) for r in records)


def test_metrics_rows_log_the_0_based_epoch_and_all_tokens_of_the_batch(tmp_path):
    """epoch counts from 0; tokens are every token of the batch (prompt included), not response tokens."""
    out, total = train_tiny_without_val(tmp_path, make_records(4), "--batch-size", "4", "--epochs", "2")
    assert [(r["epoch"], r["tokens"]) for r in metrics(out)] == [(0, total), (1, total)]


def test_each_epoch_uses_its_own_batch_order(tmp_path, monkeypatch):
    """Epoch e's steps take epoch_batches(..., epoch=e), also within one uninterrupted run."""
    records = make_records(12)
    seen, real = [], sft.train_step
    monkeypatch.setattr(sft, "train_step", lambda *a, **k: seen.append(sorted(i for m in a[4] for i in m))
                        or real(*a, **k))
    out = tmp_path / "run"
    sft.main(["--data", write(tmp_path / "sft.jsonl", records), "--model", "tiny", "--out-dir", str(out),
              "--batch-size", "3", "--epochs", "2", "--val-fraction", "0"])
    tokenizer = cello.load_tokenizer(str(out / "tiny-init"))
    lengths = [len(cello.example_ids(tokenizer, r, r["response"])[0]) for r in records]
    expected = [sorted(b) for e in (0, 1) for b in sft.epoch_batches(lengths, 3, 8, 0, e)]
    assert seen == expected and expected[:4] != expected[4:]


def test_resume_with_fewer_steps_than_done_is_refused(tmp_path):
    """Else final/ would be rewritten with the checkpoint's later weights under a smaller --max-steps."""
    flags = ["--data", write(tmp_path / "sft.jsonl", make_records(8)), "--model", "tiny", "--out-dir",
             str(tmp_path / "run"), "--batch-size", "2", "--val-fraction", "0.25"]
    sft.main(flags + ["--max-steps", "2"])
    with pytest.raises(SystemExit) as stop:
        sft.main(flags + ["--max-steps", "1", "--resume"])
    assert stop.value.code == (f"sft.py: error: --resume: {tmp_path / 'run' / 'last'} is at step 2, past this run's 1 "
                               "steps: nothing to train; ask for more with --max-steps")


@pytest.mark.parametrize("flag, value, key", [("--seed", "1", "--seed 0"), ("--max-length", "4096", "--max-length 2048"),
                                              ("--bucket-batches", "2", "--bucket-batches 8"),
                                              ("--val-fraction", "0.5", "--val-fraction 0.25"),
                                              ("--model", "small", "--model tiny, this run has small")])
def test_resume_refuses_a_changed_seed_length_limit_bucket_split_or_model(tmp_path, flag, value, key):
    """Every flag that decides the data position is in the run identity that --resume checks, and so is
    the starting model, which resume would otherwise never look at (the weights come from last/)."""
    flags = ["--data", write(tmp_path / "sft.jsonl", make_records(8)), "--model", "tiny", "--out-dir",
             str(tmp_path / "run"), "--batch-size", "2", "--val-fraction", "0.25", "--max-steps", "1"]
    sft.main(flags)
    with pytest.raises(SystemExit) as stop:
        sft.main(flags + [flag, value, "--resume", "--max-steps", "2"])
    assert f"was saved with {key}" in str(stop.value.code)


# ---- found by mutation testing (round 2): bucket composition, the partial last batch, the prefix limit,
# ---- weight decay groups, the schedule past a one-step cosine, the skipped-examples line ----

def test_each_epoch_cuts_its_buckets_from_a_fresh_shuffle():
    """Buckets are cut from all indices shuffled per epoch, so with several buckets the batches are made
    of other examples each epoch (not the same batches in another order)."""
    lengths = [(i * 37) % 91 + 5 for i in range(23)]
    composition = [sorted(map(sorted, sft.epoch_batches(lengths, 4, 2, seed=0, epoch=e))) for e in (0, 1)]
    assert composition[0] != composition[1]


def test_an_epoch_ends_with_its_partial_batch(tmp_path):
    """5 examples at --batch-size 2: 3 steps an epoch (2 + 2 + 1), so every example is trained on."""
    out, total = train_tiny_without_val(tmp_path, make_records(5), "--batch-size", "2", "--epochs", "1")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and sum(r["tokens"] for r in rows) == total


def test_shared_prefix_length_stops_at_a_later_row_s_first_loss_token():
    """Every row's first loss token bounds the prefix, not only the first row's: row 1's target at 2."""
    assert sft.shared_prefix_length([([5, 6, 7, 9], [0, 0, 0, 1]), ([5, 6, 7, 8], [0, 0, 1, 1])]) == 2


def test_weight_decay_applies_to_matrices_only(tmp_path, monkeypatch):
    """AdamW gets two groups: every matrix at --weight-decay, every norm weight (the 1-D parameters) at 0."""
    groups, real = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: groups.extend(params) or real(params, **kw))
    out, _ = train_tiny_without_val(tmp_path, make_records(2), "--max-steps", "1", "--weight-decay", "0.25")
    model = cello.load_model(str(out / "tiny-init"))
    shapes = lambda params: sorted(tuple(p.shape) for p in params)
    assert [g["weight_decay"] for g in groups] == [0.25, 0.0]
    assert shapes(groups[0]["params"]) == shapes(p for p in model.parameters() if p.ndim == 2)
    assert shapes(groups[1]["params"]) == shapes(p for p in model.parameters() if p.ndim == 1) != []


def test_max_grad_norm_and_bucket_batches_reach_the_step(tmp_path, monkeypatch):
    """The flags are passed on, not just parsed: the clip limit to every step, the bucket size to the batches."""
    limits, buckets = [], []
    real_clip, real_batches = cello.clip_grad_norm, sft.epoch_batches
    monkeypatch.setattr(cello, "clip_grad_norm", lambda params, limit: limits.append(limit) or real_clip(params, limit))
    monkeypatch.setattr(sft, "epoch_batches", lambda *a: buckets.append(a[2]) or real_batches(*a))
    train_tiny_without_val(tmp_path, make_records(4), "--max-steps", "2", "--batch-size", "2",
                           "--max-grad-norm", "0.125", "--bucket-batches", "1")
    assert limits == [0.125, 0.125] and buckets == [1]


def test_lr_factor_past_the_end_of_a_one_step_cosine():
    """One step after warm-up runs at the peak; a run continued past that end is at min_lr_ratio."""
    assert [cello.lr_factor(s, 2, 3, 0.1) for s in (2, 3, 4)] == pytest.approx([1.0, 0.1, 0.1])


def test_validation_examples_skipped_alone_are_reported(tmp_path, capsys):
    records = make_records(2)
    long = dict(records[0], response=records[0]["response"].replace("<think>", "<think>" + "Cell by cell. " * 60))
    sft.main(["--data", write(tmp_path / "sft.jsonl", make_records(4)), "--model", "tiny", "--out-dir",
              str(tmp_path / "out"), "--val-data", write(tmp_path / "val.jsonl", [long, records[1]]),
              "--max-length", "400", "--max-steps", "1", "--batch-size", "2"])
    assert "skipped 0 training and 1 validation examples longer than --max-length 400 tokens" in capsys.readouterr().out
