"""Tests for cello.py section 4: distributed helpers, FSDP2 sharding, checkpoints and resume.

Run as a script under torchrun, this file is also the worker of the 2-process FSDP2 test:
    torchrun --nproc_per_node 2 tests/test_checkpoint.py MODEL_DIR WORK_DIR
"""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for the torchrun worker; pytest's conftest does the same
import cello  # noqa: E402

CELLS = [["GNLY", "NKG7", "GZMB", "CST7"], ["CD79A", "MS4A1", "CD74", "HLA-DRA"], ["LYZ", "S100A9", "CST3", "FCN1"]]
RECORDS = [{"id": f"r{i}", "context": "The cell is from a human, originating from the blood.", "cells": CELLS[i:] + CELLS[:i],
            "candidates": ["B cell", "Monocyte", "NK cell"], "answer": ["NK cell", "B cell", "Monocyte"],
            "response": "<think>GNLY means NK.</think>\n<answer>NK cell | B cell | Monocyte</answer>"} for i in range(3)]
# two sequences of equal length: rank r of the 2-process run trains on row r
BATCH = torch.tensor([[5, 9, 23, 7, 41, 3, 17, 88, 12, 60, 6, 31], [44, 8, 2, 71, 19, 30, 11, 5, 97, 14, 26, 50]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cello.build_model("tiny", str(tmp_path_factory.mktemp("init") / "tiny"), RECORDS, seed=0)


def train_setup(path, lr=1e-2, device=None):
    model = cello.load_model(path)
    if device is not None:
        cello.shard_model(model, device)  # before the optimizer: sharding replaces the parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, batch):
    """One AdamW step on the mean token loss of batch; returns the gradient norm before the step."""
    model(batch, labels=batch).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return norm.item()


def test_single_process_helpers_are_plain():
    assert cello.setup_distributed()[:2] == (0, 1)
    assert cello.all_reduce(2.5) == 2.5 and cello.all_reduce([1.0, 3.0]) == [1.0, 3.0]
    model = torch.nn.Linear(2, 2)
    assert cello.shard_model(model, torch.device("cpu")) is model
    # --bf16 in one process autocasts; without the flag nothing is cast
    with cello.bf16_autocast(model, True):
        assert model(torch.ones(1, 2)).dtype == torch.bfloat16
    with cello.bf16_autocast(model, False):
        assert model(torch.ones(1, 2)).dtype == torch.float32


def test_check_gpu_script_passes_its_cpu_dry_run(model_dir, tmp_path):
    """check_gpu.py only runs for real on a GPU machine; its --device cpu dry run keeps it working."""
    puzzles = tmp_path / "puzzles.jsonl"
    puzzles.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    command = [sys.executable, "check_gpu.py", "--device", "cpu", "--model", model_dir, "--puzzles", str(puzzles),
               "--prompts", "3", "--new-tokens", "8"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("PASS") == 10 and "FAIL" not in run.stdout and "all checks passed" in run.stdout
    assert "PASS  FSDP2 bf16 == the unsharded model with bf16 parameters" in run.stdout


def test_save_load_gives_identical_logits(model_dir, tmp_path):
    model, optimizer, scheduler = train_setup(model_dir)
    train_step(model, optimizer, scheduler, BATCH)  # weights now differ from the initial ones
    tokenizer = cello.load_tokenizer(model_dir)
    out = str(tmp_path / "ckpt")
    cello.save_checkpoint(out, model, tokenizer)
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    loaded = cello.load_model(out)
    assert torch.equal(loaded(BATCH).logits, model(BATCH).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert cello.load_tokenizer(out).get_vocab() == tokenizer.get_vocab()
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")


def test_resume_restores_weights_optimizer_scheduler_and_rng(model_dir, tmp_path):
    out = str(tmp_path / "ckpt")
    tokenizer = cello.load_tokenizer(model_dir)
    model, optimizer, scheduler = train_setup(model_dir)
    for _ in range(2):
        train_step(model, optimizer, scheduler, BATCH)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    cello.save_checkpoint(out, model, tokenizer, optimizer, scheduler, state={"step": 2, "position": 7})
    # the uninterrupted run: its next random numbers and its next step
    draws = (random.random(), np.random.rand(), torch.rand(3))
    train_step(model, optimizer, scheduler, BATCH)
    # a fresh process would start from the initial weights and a new optimizer, then resume
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    resumed, optimizer2, scheduler2 = train_setup(model_dir)
    assert cello.load_resume(out, resumed, optimizer2, scheduler2) == {"step": 2, "position": 7}
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    assert scheduler2.last_epoch == 2 and optimizer2.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    assert optimizer2.state_dict()["state"][0]["step"].item() == 2  # AdamW moments came back too
    train_step(resumed, optimizer2, scheduler2, BATCH)
    assert torch.equal(resumed(BATCH).logits, model(BATCH).logits)


def test_crash_mid_save_leaves_no_checkpoint_that_looks_whole(model_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "ckpt")
    tokenizer = cello.load_tokenizer(model_dir)
    model, optimizer, scheduler = train_setup(model_dir)
    before = model(BATCH).logits

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:  # first save crashes while writing the resume state
        m.setattr(cello.torch, "save", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            cello.save_checkpoint(out, model, tokenizer, optimizer, scheduler, state={"step": 1})
    assert os.listdir(tmp_path) == []  # nothing under out, and no temporary folder left either
    cello.save_checkpoint(out, model, tokenizer, optimizer, scheduler, state={"step": 1})
    train_step(model, optimizer, scheduler, BATCH)
    with monkeypatch.context() as m:  # a later save crashes: the older checkpoint stays whole
        m.setattr(cello, "save_tokenizer", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            cello.save_checkpoint(out, model, tokenizer, optimizer, scheduler, state={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert torch.equal(cello.load_model(out)(BATCH).logits, before)
    assert cello.load_resume(out, *train_setup(model_dir)) == {"step": 1}


def test_every_checkpoint_file_is_on_disk_before_the_rename_names_it(model_dir, tmp_path, monkeypatch):
    """A power cut after the rename must not find a whole-looking folder of empty files: every file
    is fsync'd while still under the temporary name, then the parent folder (the renames)."""
    out = str(tmp_path / "ckpt")
    model, optimizer, scheduler = train_setup(model_dir)
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.abspath(src)))
        real_replace(src, dst)

    monkeypatch.setattr(cello.os, "fsync", fsync)
    monkeypatch.setattr(cello.os, "replace", replace)
    cello.save_checkpoint(out, model, cello.load_tokenizer(model_dir), optimizer, scheduler, state={"step": 1})
    rename = events.index(("replace", out + ".tmp"))
    synced = {os.path.basename(path) for kind, path in events[:rename] if kind == "fsync"}
    assert set(os.listdir(out)) | {"ckpt.tmp"} <= synced  # each file, and the folder itself
    assert ("fsync", str(tmp_path)) in events[rename:]


def test_checkpoint_weights_are_stored_as_save_pretrained_stores_them(model_dir, tmp_path):
    """The same tensor names as save_pretrained: the tied head once, under the input embedding's name
    (the name from_pretrained and vLLM read). A weight that is a view into a larger storage (an FSDP2
    shard gathered with its padding) is stored as its own values, not refused as shared memory."""
    from safetensors.torch import load_file

    model = cello.load_model(model_dir)
    norm = model.model.norm.weight.detach().clone()
    padded = torch.cat([norm, torch.full((7,), 5.0)])
    model.model.norm.weight = torch.nn.Parameter(padded[:len(norm)])  # storage 7 floats longer than the weight
    cello.save_checkpoint(str(tmp_path / "ckpt"), model, cello.load_tokenizer(model_dir))
    model.save_pretrained(tmp_path / "hf")
    saved, reference = cello._read_weights(str(tmp_path / "ckpt")), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(saved) == sorted(reference) and "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved
    assert all(torch.equal(saved[name], reference[name]) for name in saved) and torch.equal(saved["model.norm.weight"], norm)


def test_a_sharded_checkpoint_resumes_whole(model_dir, tmp_path):
    """A model over 5 GB is saved as shards and model.safetensors.index.json: resume reads every shard."""
    from huggingface_hub import save_torch_state_dict

    model, optimizer, scheduler = train_setup(model_dir)
    train_step(model, optimizer, scheduler, BATCH)  # weights now differ from the initial ones
    out = str(tmp_path / "ckpt")
    cello.save_checkpoint(out, model, cello.load_tokenizer(model_dir), state={"step": 1})
    weights = cello._read_weights(out)
    os.remove(os.path.join(out, "model.safetensors"))
    save_torch_state_dict(weights, out, max_shard_size=40_000)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) >= 3
    resumed = cello.load_model(model_dir)
    assert cello.load_resume(out, resumed) == {"step": 1}
    assert torch.equal(resumed(BATCH).logits, model(BATCH).logits)


def test_each_rank_resumes_its_own_random_streams(model_dir, tmp_path, monkeypatch):
    """resume.pt holds every rank's generators: rank 1 of 2 takes the second; with another number of
    ranks, every rank takes rank 0's."""
    model = cello.load_model(model_dir)
    out = str(tmp_path / "ckpt")
    cello.save_checkpoint(out, model, cello.load_tokenizer(model_dir), state={"step": 1})
    resume = torch.load(os.path.join(out, "resume.pt"), weights_only=False)
    streams = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        streams.append(cello.rng_states())
    resume["rng"] = streams
    torch.save(resume, os.path.join(out, "resume.pt"))
    monkeypatch.setattr(cello, "get_rank", lambda: 1)
    for world_size, seed in ((2, 11), (3, 10)):
        monkeypatch.setattr(cello, "get_world_size", lambda: world_size)
        cello.load_resume(out, model)
        drawn = torch.rand(2)
        torch.manual_seed(seed)
        assert torch.equal(drawn, torch.rand(2)), world_size


def test_a_checkpoint_with_only_some_resume_parts(model_dir, tmp_path):
    """An optimizer without a state saves the state {}; a checkpoint without a scheduler leaves this run's
    scheduler as it is; resuming an optimizer from a checkpoint that has none is one clear line."""
    model, optimizer, scheduler = train_setup(model_dir)
    tokenizer = cello.load_tokenizer(model_dir)
    cello.save_checkpoint(str(tmp_path / "optimizer_only"), model, tokenizer, optimizer)
    assert cello.load_resume(str(tmp_path / "optimizer_only"), model, optimizer, scheduler, expect={"step": 3}) == {}
    assert scheduler.last_epoch == 0
    cello.save_checkpoint(str(tmp_path / "state_only"), model, tokenizer, state={"step": 2})
    with pytest.raises(SystemExit) as stop:
        cello.load_resume(str(tmp_path / "state_only"), model, optimizer)
    assert stop.value.code == f"cello: error: {tmp_path}/state_only has no optimizer state (optimizer.pt)"


def test_resume_skips_a_folder_that_lacks_resume_pt_or_config_json(model_dir, tmp_path):
    """A half-copied last/ (resume.pt without config.json) or a model-only folder (config.json without
    resume.pt) is not resumable: --resume takes last.old, and load_resume refuses the folder in one line."""
    model = cello.load_model(model_dir)
    run = tmp_path / "run"
    cello.save_checkpoint(str(run / "last.old"), model, cello.load_tokenizer(model_dir), state={"step": 1})
    for missing in ("config.json", "resume.pt"):
        shutil.rmtree(run / "last", ignore_errors=True)
        shutil.copytree(run / "last.old", run / "last")
        os.remove(run / "last" / missing)
        assert cello.checkpoint_to_resume(str(run), True, "sft.py") == f"{run}/last.old"
        with pytest.raises(SystemExit) as stop:
            cello.load_resume(str(run / "last"), model)
        assert stop.value.code == (f"cello: error: {run}/last is not a resumable checkpoint "
                                   "(needs config.json and resume.pt)")


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(model_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    model = cello.load_model(model_dir)
    with pytest.raises(ValueError, match="holds files but no checkpoint"):
        cello.save_checkpoint(str(tmp_path / "run"), model, cello.load_tokenizer(model_dir))
    assert os.listdir(tmp_path / "run") == ["metrics.jsonl"]


def test_load_resume_of_a_plain_model_folder_is_one_clear_error(model_dir):
    with pytest.raises(SystemExit, match="is not a resumable checkpoint"):
        cello.load_resume(model_dir, cello.load_model(model_dir))


def test_load_resume_refuses_another_run_or_another_architecture(model_dir, tmp_path):
    """A checkpoint of another script or starting model, or weights of another shape: one line each."""
    out = str(tmp_path / "last")
    model = cello.load_model(model_dir)
    cello.save_checkpoint(out, model, cello.load_tokenizer(model_dir), state={"step": 3, "script": "sft.py"})
    with pytest.raises(SystemExit) as stop:
        cello.load_resume(out, model, expect={"script": "grpo.py"})
    assert stop.value.code == (f"cello: error: --resume: {out} was saved with script sft.py, this run has grpo.py: "
                               "resume with the run's own flags, or start afresh in another --out-dir")
    assert cello.load_resume(out, model, expect={"script": "sft.py"}) == {"step": 3, "script": "sft.py"}
    assert cello.load_resume(out, model, expect={"model": "small"}) == {"step": 3, "script": "sft.py"}  # not saved
    other = cello.load_model(cello.build_model("small", str(tmp_path / "small"), RECORDS, seed=0))
    with pytest.raises(SystemExit) as stop:
        cello.load_resume(out, other)
    assert stop.value.code.startswith(f"cello: error: --resume: the weights in {out} do not fit this model (")
    assert "\n" not in stop.value.code


def test_model_fingerprint_follows_the_content_not_the_place(model_dir, tmp_path):
    import shutil

    moved = shutil.copytree(model_dir, tmp_path / "moved")
    assert cello.model_fingerprint(str(moved)) == cello.model_fingerprint(model_dir)
    other = cello.build_model("tiny", str(tmp_path / "seed1"), RECORDS, seed=1)  # same shapes, other weights
    assert cello.model_fingerprint(other) != cello.model_fingerprint(model_dir)


def test_keep_metrics_until_skips_a_row_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    cello.keep_metrics_until(str(path), 2)
    assert cello.read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    # a fresh run (step 0) keeps nothing, not even the step-0 line of an attempt that died before its
    # first checkpoint: it writes its own
    path.write_text('{"step": 0, "val_count": 3}\n{"step": 1, "loss": 2.0}\n')
    cello.keep_metrics_until(str(path), 0)
    assert cello.read_jsonl(path) == []


def test_a_model_folder_without_weights_or_tokenizer_file_is_one_clear_error(model_dir, tmp_path):
    import shutil

    for missing, loader, what in [("model.safetensors", cello.load_model, "model"),
                                  ("tokenizer.json", cello.load_tokenizer, "tokenizer")]:
        folder = tmp_path / f"no-{missing}"
        shutil.copytree(model_dir, folder)
        os.remove(folder / missing)
        with pytest.raises(SystemExit) as stop:
            loader(str(folder))
        assert stop.value.code.startswith(f"cello: error: cannot load the {what} in '{folder}' (")


@pytest.mark.slow
def test_two_process_fsdp2_matches_one_process(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    # --standalone: torchrun binds its rendezvous to a free port itself (no race with other jobs)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.abspath(__file__), model_dir, str(tmp_path)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line or "error:" in line]
    assert run.returncode == 0, "\n".join(errors[:20]) + "\n" + run.stderr[-2000:]
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    # the same step in one process, on both rows at once (equal lengths: the mean of the two ranks'
    # means is the mean over the whole batch)
    model, optimizer, scheduler = train_setup(model_dir)
    grad_norm = train_step(model, optimizer, scheduler, BATCH)
    assert result["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    # the sharded run's checkpoint loads with from_pretrained and gives its logits
    sharded_logits = torch.load(tmp_path / "logits.pt")
    loaded = cello.load_model(str(tmp_path / "ckpt"))
    assert torch.allclose(loaded(BATCH).logits, sharded_logits, atol=1e-5)
    assert torch.allclose(model(BATCH).logits, sharded_logits, atol=1e-4)  # and match the 1-process step
    # resuming into a fresh sharded model continued exactly like the uninterrupted sharded run
    assert result["resumed_state"] == {"step": 1}
    assert result["resumed_max_diff"] == 0.0
    assert result["sum_rank"] == 1.0
    assert result["gathered"] == ["rank 0", 0, "rank 1", 1]  # concatenated in rank order
    # each rank resumed its own Python stream (seeded 100 + rank before the save)
    assert result["python_draws"] == [random.Random(100).random(), random.Random(101).random()]
    fp32_loss = cello.load_model(model_dir)(BATCH, labels=BATCH).loss.item()
    assert result["bf16_loss"] == pytest.approx(fp32_loss, abs=1e-2) and result["bf16_loss"] != fp32_loss
    assert result["bf16_grad_dtype"] == "torch.float32" and result["autocast_under_fsdp"] is False
    assert result["bf16_reduced_not_bf16"] > 0  # reduce_dtype float32


def test_activation_checkpointing_gives_the_same_gradients(model_dir):
    grads, calls = [], []
    for checkpointing in [False, True]:
        model = cello.shard_model(cello.load_model(model_dir), torch.device("cpu"),
                                  activation_checkpointing=checkpointing)
        model.train()
        calls.append(0)
        mlp = model.model.layers[0].mlp  # counted by wrapping forward: module hooks do not fire in a replay
        forward = mlp.forward
        mlp.forward = lambda *a, forward=forward: calls.__setitem__(-1, calls[-1] + 1) or forward(*a)
        model(BATCH, labels=BATCH).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert model.is_gradient_checkpointing
    assert calls == [1, 2]  # checkpointed: the layer runs again in backward
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def worker(model_dir, work_dir):
    """One rank of the 2-process test: shard, one step on this rank's row, save, resume, compare."""
    torch.set_num_threads(1)
    rank, world_size, device = cello.setup_distributed()
    assert world_size == 2 and device.type == "cpu"
    model, optimizer, scheduler = train_setup(model_dir, device=device)
    assert type(model).__name__.startswith("FSDP")
    grad_norm = train_step(model, optimizer, scheduler, BATCH[rank:rank + 1])
    logits = model(BATCH).logits.detach()
    out = os.path.join(work_dir, "ckpt")
    random.seed(100 + rank)  # each rank its own Python stream: the checkpoint keeps both, each rank resumes its own
    cello.save_checkpoint(out, model, cello.load_tokenizer(model_dir), optimizer, scheduler, state={"step": 1})
    random.seed(0)
    resumed, optimizer2, scheduler2 = train_setup(model_dir, device=device)
    state = cello.load_resume(out, resumed, optimizer2, scheduler2)
    python_draw = random.random()
    train_step(model, optimizer, scheduler, BATCH[rank:rank + 1])
    train_step(resumed, optimizer2, scheduler2, BATCH[rank:rank + 1])
    resumed_max_diff = (resumed(BATCH).logits - model(BATCH).logits).abs().max().item()
    # bf16 mixed precision with activation checkpointing: bf16 compute, float32 master weights and grads
    mixed = cello.load_model(model_dir)
    cello.shard_model(mixed, device, bf16=True, activation_checkpointing=True)
    mixed.train()
    loss = mixed(BATCH, labels=BATCH).loss
    mixed(BATCH[rank:rank + 1], labels=BATCH[rank:rank + 1]).loss.backward()  # each rank its own row
    # gradients are reduced in float32: the mean of the ranks' two different bf16-computed gradients
    # holds values that bfloat16 cannot (a bf16 reduction would leave none)
    embedding_grad = mixed.model.embed_tokens.weight.grad.full_tensor()
    not_bf16 = (embedding_grad != embedding_grad.to(torch.bfloat16).float()).sum().item()
    with cello.bf16_autocast(mixed, True):  # FSDP2's policy casts: the one-process autocast stays off
        autocast_under_fsdp = torch.is_autocast_enabled("cpu")
    result = {"autocast_under_fsdp": autocast_under_fsdp, "grad_norm": grad_norm, "resumed_state": state,
              "resumed_max_diff": resumed_max_diff,
              "sum_rank": cello.all_reduce(float(rank)),
              "gathered": cello.all_gather_list([f"rank {rank}", rank]),
              "python_draws": cello.all_gather_list([python_draw]),
              "bf16_loss": loss.item(), "bf16_grad_dtype": str(mixed.model.embed_tokens.weight.grad.dtype),
              "bf16_reduced_not_bf16": not_bf16}
    if rank == 0:
        torch.save(logits, os.path.join(work_dir, "logits.pt"))
        with open(os.path.join(work_dir, "result.json"), "w") as f:
            json.dump(result, f)
    cello.cleanup_distributed()


if __name__ == "__main__":
    worker(*sys.argv[1:3])
    cello.exit_after_torchrun()


def test_checkpoint_to_resume_finds_last_or_last_old_and_a_fresh_run_refuses_an_old_checkpoint(model_dir, tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    with pytest.raises(SystemExit) as stop:
        cello.checkpoint_to_resume(run, True, "grpo.py")
    assert stop.value.code == f"grpo.py: error: --resume: no checkpoint {run}/last to resume from"
    assert cello.checkpoint_to_resume(run, False, "grpo.py") is None  # nothing there: a fresh run may start
    model = cello.load_model(model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    cello.save_checkpoint(f"{run}/last", model, cello.load_tokenizer(model_dir), optimizer, state={"step": 4})
    assert cello.checkpoint_to_resume(run, True, "sft.py") == f"{run}/last"
    os.replace(f"{run}/last", f"{run}/last.old")  # a crash between save_checkpoint's two renames
    assert cello.checkpoint_to_resume(run, True, "sft.py") == f"{run}/last.old"
    assert cello.load_resume(f"{run}/last.old", model, optimizer) == {"step": 4}
    with pytest.raises(SystemExit) as stop:  # a fresh run here would leave the old run for a later --resume
        cello.checkpoint_to_resume(run, False, "sft.py")
    assert stop.value.code == (f"sft.py: error: --out-dir {run} holds an earlier run's checkpoint (last.old/): pass "
                               "--resume to continue that run, or choose another --out-dir")
    finished = tmp_path / "finished"
    os.makedirs(finished / "final")  # an older run's final model, with no checkpoint to resume
    with pytest.raises(SystemExit) as stop:
        cello.checkpoint_to_resume(str(finished), False, "sft.py")
    assert stop.value.code == (f"sft.py: error: --out-dir {finished} holds an earlier run's final model (final/) "
                               "and no checkpoint to resume from: choose another --out-dir")
    # The run resumed from last.old saves its next checkpoint and is killed as it renames it into place:
    # last.old must still be there (it once was deleted first, leaving only last.tmp: nothing to resume).
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if src.endswith("last.tmp"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(cello.os, "replace", killed_at_the_rename)
        with pytest.raises(KeyboardInterrupt):
            cello.save_checkpoint(f"{run}/last", model, cello.load_tokenizer(model_dir), optimizer, state={"step": 5})
    assert cello.checkpoint_to_resume(run, True, "sft.py") == f"{run}/last.old"
    assert cello.load_resume(f"{run}/last.old", model, optimizer) == {"step": 4}
    cello.save_checkpoint(f"{run}/last", model, cello.load_tokenizer(model_dir), optimizer, state={"step": 5})
    assert sorted(os.listdir(run)) == ["last"] and cello.load_resume(f"{run}/last", model, optimizer) == {"step": 5}


def test_a_save_killed_at_its_rename_keeps_the_previous_checkpoint(model_dir, tmp_path):
    """save_checkpoint moves last/ aside (last.old) before renaming last.tmp into place, and drops
    last.old only after: a kill at any point leaves one whole checkpoint, and --resume takes the newest."""
    model, tok = cello.load_model(model_dir), cello.load_tokenizer(model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    run = str(tmp_path / "run")
    os.makedirs(run)
    cello.save_checkpoint(f"{run}/last", model, tok, optimizer, state={"step": 1})
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if src.endswith("last.tmp"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(cello.os, "replace", killed_at_the_rename)
        cello.save_checkpoint(f"{run}/last", model, tok, optimizer, state={"step": 2})
    assert sorted(os.listdir(run)) == ["last.old", "last.tmp"]  # step 1 moved aside, not deleted
    assert cello.load_resume(cello.checkpoint_to_resume(run, True, "sft.py"), model, optimizer) == {"step": 1}
    cello.save_checkpoint(f"{run}/last", model, tok, optimizer, state={"step": 3})
    with pytest.MonkeyPatch.context() as m:  # killed after the rename, before last.old is dropped
        m.setattr(cello, "_remove_folder", lambda path: None)
        cello.save_checkpoint(f"{run}/last", model, tok, optimizer, state={"step": 4})
    assert sorted(os.listdir(run)) == ["last", "last.old"]
    assert cello.checkpoint_to_resume(run, True, "sft.py") == f"{run}/last"  # the newer one
    # an empty folder may be saved into; a killed save's leftover .tmp is cleared, not merged
    (tmp_path / "empty").mkdir()
    cello.save_checkpoint(str(tmp_path / "empty"), model, tok)
    assert cello.is_checkpoint_complete(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "ckpt.tmp")
    (tmp_path / "ckpt.tmp" / "optimizer.pt").write_text("stale")
    cello.save_checkpoint(str(tmp_path / "ckpt"), model, tok, state={"step": 1})
    assert "optimizer.pt" not in os.listdir(tmp_path / "ckpt")


def test_a_folder_is_renamed_before_it_is_deleted(tmp_path):
    """A kill half-way through deleting last.old must not leave a half folder under a name resume reads."""
    victim = tmp_path / "last.old"
    victim.mkdir()
    (victim / "config.json").write_text("{}")
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if os.path.exists(path):
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(cello.shutil, "rmtree", killed)
        cello._remove_folder(str(victim))
    assert not victim.exists() and (tmp_path / "last.old.trash").exists()


def test_write_text_atomic_syncs_the_whole_text_before_the_rename_and_cleans_up(tmp_path):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cello.os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_size)) or real_fsync(fd))
        m.setattr(cello.os, "replace", lambda a, b: events.append(("replace", os.path.basename(b))) or real_replace(a, b))
        cello.write_text_atomic(str(tmp_path / "a.txt"), "\u00e9" * 10)
    assert events == [("fsync", 20), ("replace", "a.txt")]  # all 20 UTF-8 bytes on disk, then the name
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):  # the rename fails: no temporary file stays
        cello.write_text_atomic(str(tmp_path / "folder"), "x")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "folder"]
    cello.write_jsonl_atomic(str(tmp_path / "r.jsonl"), [{"a": "\u00e9\u2192"}])
    assert (tmp_path / "r.jsonl").read_text(encoding="utf-8") == '{"a": "\u00e9\u2192"}\n'  # the characters, not JSON escapes


def test_atomic_writes_are_utf8_whatever_the_locale(tmp_path):
    """Readers decode UTF-8; under a C locale a plain open(..., "w") would fail on an o1 trace's arrow
    (UnicodeEncodeError) and leave its temporary file behind."""
    text = "Cell 1: CD14, LYZ \u2192 CD14+ Monocyte"
    code = ("import cello, puzzles; cello.write_text_atomic('a.txt', TEXT); puzzles.write_all_atomic('.', {'b.txt': TEXT})"
            .replace("TEXT", ascii(text)))
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]  # no temporary file left
    assert all((tmp_path / name).read_text(encoding="utf-8") == text for name in ("a.txt", "b.txt"))


def test_a_rerun_clears_what_a_killed_atomic_write_left(tmp_path):
    """A SIGKILL between the temporary file and the rename leaves the temporary file; the next write of
    the same file must take it over, not leave it for good (as a pid in its name did)."""
    code = ("import os, signal, cello, puzzles\n"
            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"  # killed just before the rename
            "cello.write_text_atomic('a.txt', 'x') if ARG == 'a' else puzzles.write_all_atomic('.', {'b.txt': 'x'})")
    for arg in ("a", "b"):
        killed = subprocess.run([sys.executable, "-c", code.replace("ARG", repr(arg))], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True)
        assert killed.returncode == -9
    assert sorted(os.listdir(tmp_path)) == [".b.txt.tmp", "a.txt.tmp"]
    cello.write_text_atomic(str(tmp_path / "a.txt"), "whole")
    import puzzles
    puzzles.write_all_atomic(str(tmp_path), {"b.txt": "whole"})
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text() == "whole"


def test_a_damaged_checkpoint_is_a_one_line_error(model_dir, tmp_path):
    """An interrupted copy: cut weights, a cut resume/optimizer file, a broken generation config."""
    model = cello.load_model(model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    out = str(tmp_path / "last")
    cello.save_checkpoint(out, model, cello.load_tokenizer(model_dir), optimizer, state={"step": 2})

    def cut(name):
        path = os.path.join(out, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    def error_of(call):
        with pytest.raises(SystemExit) as stop:
            call()
        assert isinstance(stop.value.code, str) and "\n" not in stop.value.code
        return stop.value.code

    cut("model.safetensors")  # resume reads the weights itself, not through from_pretrained
    assert error_of(lambda: cello.load_resume(out, model, optimizer)).startswith(
        f"cello: error: cannot read the weights in {out} (")
    cello.save_checkpoint(out, model, cello.load_tokenizer(model_dir), optimizer, state={"step": 2})
    cut("optimizer.pt")
    assert error_of(lambda: cello.load_resume(out, model, optimizer)).startswith(
        f"cello: error: cannot read {out}/optimizer.pt (")
    cut("resume.pt")
    assert "the checkpoint is damaged" in error_of(lambda: cello.load_resume(out, model, optimizer))
    cut("model.safetensors")
    assert error_of(lambda: cello.load_model(out)).startswith(f"cello: error: cannot load the model in {out!r} (")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        f.write('{"eos_token_id": ')
    assert error_of(lambda: cello.stop_token_ids(out, cello.load_tokenizer(out))) == (
        f"cello: error: {out}/generation_config.json is not a JSON object (a copy cut short?)")


def test_cuda_rng_states_of_more_gpus_than_this_machine_has_restore_the_ones_it_has(monkeypatch):
    """A run saved on 8 GPUs per node, resumed where 2 are visible: no index error, GPUs 0 and 1 restored."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    states = {**cello.rng_states(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    cello.set_rng_states(states)
    assert restored == [(0, 0), (1, 1)]


def test_rng_states_hold_the_gpus_generators_only_where_there_is_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu 0", "gpu 1"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cello.rng_states()["cuda"] == ["gpu 0", "gpu 1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in cello.rng_states()


def test_ctrl_c_ends_a_script_with_one_line_saying_how_to_continue():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        cello.run_script(interrupted, "sft.py", "the same command with --resume continues")
    assert stop.value.code == "sft.py: interrupted; the same command with --resume continues"
    ran = []
    cello.run_script(lambda: ran.append(1), "sft.py", "unused")  # a plain run returns normally
    assert ran == [1]
