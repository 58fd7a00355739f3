"""End to end: `python cello.py demo` runs every stage's script and writes the table and the plot."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, os.path.join(ROOT, "cello.py"), "demo", "--out-dir", str(out),
               "--sft-steps", "2", "--cooldown-steps", "1", "--grpo-steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = (out / "results.md").read_text()
    for row in ("| random |", "| independent |", "| expert |", "| SFT |", "| SFT+GRPO |"):
        assert row in results
    assert (out / "grpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # started again, every stage is found done and nothing is recomputed
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 8


def test_demo_rejects_an_unknown_command():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "cello.py"), "train"], capture_output=True, text=True)
    assert result.returncode != 0 and "usage: python cello.py demo" in result.stderr


def test_demo_rejects_zero_steps_before_writing_anything(tmp_path):
    import cello
    with pytest.raises(SystemExit) as exit_info:
        cello.demo(["--out-dir", str(tmp_path / "demo"), "--grpo-steps", "0"])
    assert exit_info.value.code == "cello.py demo: error: --grpo-steps: expected an integer >= 1, got 0"
    assert not os.path.exists(tmp_path / "demo")


def test_a_killed_training_stage_is_resumed_not_restarted(tmp_path):
    import cello
    out = str(tmp_path / "demo")
    os.makedirs(os.path.join(out, "sft", "last"))  # SFT was killed after a checkpoint; GRPO never started
    stages = {name: command for name, command, _ in cello.demo_stages(out, "data.h5ad", 1500, 600, 100)}
    assert stages["SFT the small model"][-1] == "--resume"
    assert "--resume" not in stages["SFT at a third of the rate"]
    assert "--resume" not in stages["GRPO from the SFT model"]
    os.makedirs(os.path.join(out, "sft-cool", "last"))  # and the second SFT run too
    stages = {name: command for name, command, _ in cello.demo_stages(out, "data.h5ad", 1500, 600, 100)}
    assert stages["SFT at a third of the rate"][-1] == "--resume"


def finish_first_stage(out):
    """Mark the demo's first stage (puzzles) done in the run folder out."""
    (out / "puzzles").mkdir(parents=True)
    (out / "puzzles" / "summary.json").write_text("{}")


def test_a_demo_folder_made_with_other_flags_is_refused(tmp_path, monkeypatch):
    """Finished stages are skipped: rerun with other steps or data, the folder would report its old results.
    Before any stage has finished the flags may change (say, after a wrong --data)."""
    import cello
    out = tmp_path / "demo"
    os.makedirs(out)
    data = os.path.join(ROOT, "data", "pbmc68k_reduced.h5ad")
    cello.write_json_atomic(str(out / "demo_flags.json"), {"--data": "another file's", "--sft-steps": 1500})
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda command, *a, **k: ran.append(os.path.basename(command[1])) or
                        subprocess.CompletedProcess(command, 3))
    with pytest.raises(SystemExit, match="stage 'build puzzles' failed"):
        cello.demo(["--out-dir", str(out), "--sft-steps", "2"])
    assert ran == ["puzzles.py"] and cello.read_json(str(out / "demo_flags.json"))["--sft-steps"] == 2
    monkeypatch.undo()
    finish_first_stage(out)
    (out / "demo_flags.json").write_text('{"--data": ')  # edited by hand
    with pytest.raises(SystemExit) as exit_info:
        cello.demo(["--out-dir", str(out)])
    assert exit_info.value.code.startswith(f"cello.py demo: error: {out}/demo_flags.json is not JSON (")
    flags = {"--data": cello.file_fingerprint(data), "--sft-steps": 1500, "--cooldown-steps": 600, "--grpo-steps": 100}
    cello.write_json_atomic(str(out / "demo_flags.json"), flags)
    with pytest.raises(SystemExit) as exit_info:
        cello.demo(["--out-dir", str(out), "--sft-steps", "2000"])
    assert exit_info.value.code == (f"cello.py demo: error: {out} was made with --sft-steps 1500 (this run: 2000; data "
                                    "by content): its finished stages would be reused; run with its flags, or choose "
                                    "another --out-dir")
    del flags["--cooldown-steps"]  # a folder of the demo before its second SFT stage
    cello.write_json_atomic(str(out / "demo_flags.json"), flags)
    with pytest.raises(SystemExit) as exit_info:
        cello.demo(["--out-dir", str(out)])
    assert exit_info.value.code == (f"cello.py demo: error: {out} was made by an older demo without --cooldown-steps: "
                                    "its finished stages would be reused; choose another --out-dir")
    with pytest.raises(SystemExit) as exit_info:
        cello.demo(["--out-dir", str(tmp_path / "other"), "--data", str(tmp_path / "none.h5ad")])
    assert exit_info.value.code == f"cello.py demo: error: --data {tmp_path / 'none.h5ad'}: no such file"
    assert not os.path.exists(tmp_path / "other")
    with pytest.raises(SystemExit) as exit_info:
        cello.demo(["--out-dir", str(tmp_path / "other"), "--data", str(tmp_path)])
    assert exit_info.value.code == f"cello.py demo: error: --data {tmp_path}: is a folder (expected an .h5ad file)"
    assert not os.path.exists(tmp_path / "other")


def test_a_stage_killed_twice_reports_the_time_of_both_attempts(tmp_path, monkeypatch):
    import time

    import cello
    clock = [1000.0]

    def killed_after_a_minute(*args, **kwargs):
        clock[0] += 60
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr(subprocess, "run", killed_after_a_minute)
    out = tmp_path / "demo"
    for attempts in (1, 2):
        with pytest.raises(KeyboardInterrupt):
            cello.demo(["--out-dir", str(out)])
        assert cello.read_json(str(out / "timings.json")) == {"build puzzles": 60.0 * attempts}


# ---- found by mutation testing (round 2): last.old, how the stages connect, skipping and stopping, the data ----

def test_a_training_stage_killed_between_a_checkpoint_s_renames_is_resumed(tmp_path):
    """A kill between save_checkpoint's renames leaves only last.old, which --resume takes."""
    import cello
    out = str(tmp_path / "demo")
    os.makedirs(os.path.join(out, "grpo", "last.old"))
    stages = {name: command for name, command, _ in cello.demo_stages(out, "data.h5ad", 1500, 600, 100)}
    assert stages["GRPO from the SFT model"][-1] == "--resume"
    assert "--resume" not in stages["SFT the small model"]


def test_each_stage_reads_what_the_stages_before_it_wrote(tmp_path):
    """SFT on the distilled file; GRPO from the SFT model, validated on val (never test); each model
    evaluated on test."""
    import cello
    stages = {name: (command, done)
              for name, command, done in cello.demo_stages(str(tmp_path), "d.h5ad", 1500, 600, 100)}

    def flag(name, option):
        command = stages[name][0]
        return command[command.index(option) + 1]

    def made_by(name):
        return os.path.dirname(stages[name][1])
    train, val, test = (os.path.join(made_by("build puzzles"), f"{s}.jsonl") for s in ("train", "val", "test"))
    assert flag("distill from the expert", "--puzzles") == flag("distill from the expert", "--train") == train
    assert flag("SFT the small model", "--data") == os.path.join(made_by("distill from the expert"), "sft.jsonl")
    assert flag("SFT at a third of the rate", "--data") == flag("SFT the small model", "--data")
    assert flag("SFT at a third of the rate", "--model") == made_by("SFT the small model")
    assert flag("GRPO from the SFT model", "--model") == made_by("SFT at a third of the rate")
    assert (flag("GRPO from the SFT model", "--train"), flag("GRPO from the SFT model", "--val")) == (train, val)
    assert flag("evaluate SFT", "--model-path") == made_by("SFT at a third of the rate")
    assert flag("evaluate SFT+GRPO", "--model-path") == made_by("GRPO from the SFT model")
    for name in ("evaluate the baselines", "evaluate SFT", "evaluate SFT+GRPO"):
        assert flag(name, "--puzzles") == test


def test_a_demo_skips_finished_stages_and_stops_at_a_failed_one(tmp_path, monkeypatch):
    import cello
    from conftest import DATA
    out = tmp_path / "demo"
    finish_first_stage(out)
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda command, *a, **k: ran.append(os.path.basename(command[1])) or
                        subprocess.CompletedProcess(command, 3))
    with pytest.raises(SystemExit) as exit_info:
        cello.demo(["--out-dir", str(out), "--sft-steps", "2"])
    assert ran == ["distill.py"]
    assert exit_info.value.code == ("cello.py demo: stage 'distill from the expert' failed (exit 3); fix it and run "
                                    "the demo again: finished stages are kept")
    # the flags are recorded, so that a rerun with others is refused
    assert cello.read_json(str(out / "demo_flags.json")) == {"--data": cello.file_fingerprint(DATA), "--sft-steps": 2,
                                                             "--cooldown-steps": 300, "--grpo-steps": 50}


def test_a_demo_folder_made_from_other_data_is_refused(tmp_path):
    import cello
    from conftest import DATA
    out = tmp_path / "demo"
    finish_first_stage(out)
    cello.write_json_atomic(str(out / "demo_flags.json"), {"--data": cello.file_fingerprint(DATA), "--sft-steps": 1500,
                                                            "--cooldown-steps": 300, "--grpo-steps": 50})
    other = tmp_path / "other.h5ad"
    other.write_bytes(b"other data")
    with pytest.raises(SystemExit) as exit_info:
        cello.demo(["--out-dir", str(out), "--data", str(other)])
    assert exit_info.value.code.startswith(f"cello.py demo: error: {out} was made with --data ")
