"""eval.py end to end on tiny hand-made puzzles: files written, numbers checked by hand, bad input."""
import argparse
import json
import os
import subprocess
import sys

import pytest

import api
import cello
import eval as evaluate
from reward import score as reward_score
import fault_server
import reward
from test_distill import toy_puzzles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def puzzle(pid, cells, answer):
    return {"id": pid, "source": "hand", "donor": "D0", "batch": None, "split": "test",
            "context": "The cell is from a healthy donor.", "cells": cells,
            "candidates": sorted(answer), "answer": answer}


@pytest.fixture
def files(tmp_path):
    """Train: one clean cell per type X, Y, Z (markers x*, y*, z*). Test:
    p1 (N = 2, gold X | Y): cell 2's top gene is an X marker, so on its own it also says X;
    p2 (N = 3, gold Z | X | Y): clean cells."""
    train = [puzzle("t1", [["x1", "x2", "h"], ["y1", "y2", "h"], ["z1", "z2", "h"]], ["X", "Y", "Z"])]
    test = [puzzle("p1", [["x1", "x2", "h"], ["x2", "y1", "h"]], ["X", "Y"]),
            puzzle("p2", [["z1", "h", "z2"], ["h", "x1", "x2"], ["y2", "y1", "h"]], ["Z", "X", "Y"])]
    cello.write_jsonl_atomic(tmp_path / "train.jsonl", train)
    cello.write_jsonl_atomic(tmp_path / "test.jsonl", test)
    return tmp_path


def test_cli_scores_by_hand(files, capsys):
    out = files / "out"
    evaluate.main(["--puzzles", str(files / "test.jsonl"), "--train", str(files / "train.jsonl"),
                   "--responder", "independent", "expert", "--out-dir", str(out)])
    rows = cello.read_jsonl(out / "predictions.jsonl")
    assert [(r["responder"], r["id"], r["sample"]) for r in rows] == [
        ("independent", "p1", 0), ("independent", "p2", 0), ("expert", "p1", 0), ("expert", "p2", 0)]
    by = {(r["responder"], r["id"]): r for r in rows}
    # independent: p1 answers X | X (repeated -> malformed, 0 correct, reward -1), p2 all right (reward 1).
    assert by["independent", "p1"]["response"].endswith("<answer>X | X</answer>")
    assert (by["independent", "p1"]["valid"], by["independent", "p1"]["correct"], by["independent", "p1"]["reward"]) == (False, 0, -1.0)
    assert (by["independent", "p2"]["valid"], by["independent", "p2"]["correct"], by["independent", "p2"]["reward"]) == (True, 3, 1.0)
    # expert: the joint assignment moves p1's cell 2 to Y; both puzzles fully right.
    assert by["expert", "p1"]["response"].endswith("<answer>X | Y</answer>")
    assert all(by["expert", p]["exact"] for p in ("p1", "p2"))

    summary = json.load(open(out / "summary.json"))
    ind = summary["independent"]
    # cells: 0 + 3 of 2 + 3; batches: 1 of 2; valid 1 of 2; uniqueness (1/2 + 1) / 2; reward (-1 + 1) / 2
    assert ind["cell_accuracy"] == pytest.approx(3 / 5)
    assert ind["batch_accuracy"] == 0.5 and ind["format_validity"] == 0.5
    assert ind["uniqueness"] == pytest.approx(0.75) and ind["mean_reward"] == 0.0 and ind["count"] == 2
    assert ind["by_n"]["2"]["cell_accuracy"] == 0.0 and ind["by_n"]["3"]["cell_accuracy"] == 1.0
    assert summary["expert"]["cell_accuracy"] == 1.0 and summary["expert"]["batch_accuracy"] == 1.0
    table = capsys.readouterr().out
    assert "| independent | 60.0% | 50.0% | 50.0% | 75.0% |" in table
    assert "| expert | 100.0% | 100.0% | 100.0% | 100.0% |" in table
    assert "| independent, N=2 | 0.0% | 0.0% | 0.0% | 50.0% |" in table


def test_cli_samples_and_pass_at_k(files, capsys):
    out = files / "out"
    evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "random", "--num-samples", "3",
                   "--seed", "4", "--out-dir", str(out)])
    rows = cello.read_jsonl(out / "predictions.jsonl")
    assert [(r["id"], r["sample"]) for r in rows] == [("p1", 0), ("p1", 1), ("p1", 2), ("p2", 0), ("p2", 1), ("p2", 2)]
    summary = json.load(open(out / "summary.json"))["random"]
    assert summary["count"] == 6 and summary["k"] == 3 and summary["format_validity"] == 1.0
    assert summary["cell_accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 15)
    solved = {r["id"] for r in rows if r["exact"]}
    assert summary["pass_at_k"] == len(solved) / 2
    assert f"random: pass@3 (share of puzzles with a fully correct sample) = {50 * len(solved):.1f}%" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", "/nope.jsonl: no such file"),
    ("folder", ": is a folder (expected a JSONL file of puzzle records)"),
    ("train-folder", ": is a folder (expected a JSONL file of puzzle records)"),
    ("no-train", "eval.py: error: --responder expert needs --train (train puzzles to learn marker scores from)"),
    ("no-train-independent", "eval.py: error: --responder independent needs --train (train puzzles to learn marker "
                             "scores from)"),
    ("unknown", "eval.py: error: --responder: unknown responder 'oracle' (expected one of random, independent, expert, model, api)"),
    ("not-a-model", "eval.py: error: --model-path: not a Hugging Face model folder (no config.json): "),
    ("not-puzzles", "cells, candidates, answer"),  # "lacks field(s) [context, ]cells, ..."
    ("bad-device", "eval.py: error: --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    ("mps-device", "eval.py: error: --device: expected cpu, cuda or cuda:N, got 'mps'"),
])
def test_cli_bad_input(files, case, message):
    out = files / "out"
    (files / "bad.jsonl").write_text('{"id": "x"}\n')
    args = {"missing": ["--puzzles", str(files / "nope.jsonl"), "--responder", "random"],
            "folder": ["--puzzles", str(files), "--responder", "random"],
            "train-folder": ["--puzzles", str(files / "test.jsonl"), "--responder", "expert", "--train", str(files)],
            "no-train": ["--puzzles", str(files / "test.jsonl"), "--responder", "random", "expert"],
            "no-train-independent": ["--puzzles", str(files / "test.jsonl"), "--responder", "independent"],
            "unknown": ["--puzzles", str(files / "test.jsonl"), "--responder", "oracle"],
            "not-a-model": ["--puzzles", str(files / "test.jsonl"), "--responder", "model", "--model-path", str(files)],
            "not-puzzles": ["--puzzles", str(files / "bad.jsonl"), "--responder", "random"],
            "bad-device": ["--puzzles", str(files / "test.jsonl"), "--responder", "model", "--model-path",
                           str(files / "m"), "--device", "gpu"],
            "mps-device": ["--puzzles", str(files / "test.jsonl"), "--responder", "model", "--model-path",
                           str(files / "m"), "--device", "mps"]}[case]
    (files / "m").mkdir()
    (files / "m" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:  # sys.exit("...") prints that one line, exit status 1
        evaluate.main([*args, "--out-dir", str(out)])
    assert isinstance(exit_info.value.code, str) and "\n" not in exit_info.value.code
    assert message in exit_info.value.code and exit_info.value.code.startswith("eval.py: error: ")
    assert not os.path.exists(out)


def test_model_responder_device_defaults_to_the_gpu_when_there_is_one(files, monkeypatch):
    """As sft.py and grpo.py do: `eval.py --responder model` on a GPU machine must not run on the CPU."""
    (files / "m").mkdir()
    (files / "m" / "config.json").write_text("{}")
    argv = ["--puzzles", str(files / "test.jsonl"), "--responder", "model", "--model-path", str(files / "m"),
            "--out-dir", str(files / "out")]
    assert evaluate.parse_args(argv).device == "cpu"  # this machine has no GPU
    monkeypatch.setattr(cello.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cello.torch.cuda, "device_count", lambda: 1)
    assert evaluate.parse_args(argv).device == "cuda"
    assert evaluate.parse_args([*argv, "--device", "cpu"]).device == "cpu"


def test_cli_out_dir_that_is_a_file(files):
    (files / "taken").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "random", "--out-dir",
                       str(files / "taken")])
    assert exit_info.value.code == f"eval.py: error: --out-dir {files / 'taken'}: cannot create the folder (File exists)"


def test_cli_bad_input_exit_status(files):
    """The same as a real process: status 1, the one line on stderr, nothing on stdout."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--puzzles", str(files / "test.jsonl"),
                             "--responder", "expert", "--out-dir", str(files / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "eval.py: error: --responder expert needs --train (train puzzles to learn marker scores from)\n"


def start_echo_server(refuse=(), status=400):
    """A chat-completions server on loopback that answers the candidates in prompt order, and refuses
    (HTTP status: 400 as for a prompt too long) the puzzles whose X-Cello-Puzzle header is in refuse.
    Returns (server, seen): seen collects (path, Authorization header, model, temperature) of every request."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body["model"], body.get("temperature")))
            if self.headers.get("X-Cello-Puzzle") in refuse:
                code, data = status, b'{"error": {"message": "maximum context length exceeded"}}'
            else:
                user = body["messages"][-1]["content"]
                candidates = user.split("Match the cells above to one of the following cell types:\n")[1].split("\n")
                text = "<think>\nIn order.\n</think>\n<answer>" + " | ".join(candidates) + "</answer>"
                code, data = 200, json.dumps({
                    "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 7}}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_cli_api_responder_on_loopback(files, monkeypatch):
    """eval.py against a chat-completions server on loopback that answers the candidates in prompt order."""
    server, seen = start_echo_server()
    monkeypatch.setenv("CELLO_TEST_KEY", "sk-test-123")
    try:
        out = files / "out"
        evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "api", "--out-dir", str(out),
                       "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--api-model", "echo",
                       "--api-key-env", "CELLO_TEST_KEY"])
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(seen) == [("/v1/chat/completions", "Bearer sk-test-123", "echo", None)] * 2  # server's temperature
    # p1: candidates X, Y = gold X, Y (2 of 2); p2: X, Y, Z against gold Z, X, Y (0 of 3).
    summary = json.load(open(out / "summary.json"))["api"]
    assert summary["cell_accuracy"] == pytest.approx(2 / 5) and summary["batch_accuracy"] == 0.5
    assert summary["usage"]["prompt_tokens"] == 200 and summary["usage"]["completion_tokens"] == 14
    for written in ("predictions.jsonl", "summary.json", "api_cache.jsonl"):  # the cache defaults to OUT_DIR
        assert "sk-test-123" not in (out / written).read_text()


def test_cli_api_refused_samples_are_scored_malformed(files, capsys):
    """A prompt the server refuses outright (HTTP 400) gets the same answer when asked again, so it counts
    as a malformed answer instead of blocking the evaluation; a server that refuses every sample is a
    setup error."""
    server, seen = start_echo_server(refuse={"p1"})
    argv = ["--puzzles", str(files / "test.jsonl"), "--responder", "api", "--api-key-env", "",
            "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--api-model", "echo"]
    try:
        evaluate.main(argv + ["--out-dir", str(files / "out"), "--temperature", "0"])
        assert len(seen) == 2  # a refusal is not retried
        assert [t for *_, t in seen] == [0, 0]  # greedy asked for explicitly (the default sends none)
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv + ["--out-dir", str(files / "out1"), "--limit", "1"])
    finally:
        server.shutdown()
        server.server_close()
    # p1 refused: 0 of 2 cells; p2 answered X | Y | Z against gold Z | X | Y: 0 of 3; p2 is well formed.
    summary = json.load(open(files / "out" / "summary.json"))["api"]
    assert summary["refused"] == 1 and summary["format_validity"] == 0.5 and summary["count"] == 2
    rows = {r["id"]: r for r in cello.read_jsonl(files / "out" / "predictions.jsonl")}
    assert rows["p1"]["valid"] is False and rows["p1"]["error"].startswith("refused by the server: HTTP 400")
    assert "the server refused 1 of 2 samples" in capsys.readouterr().out
    assert exit_info.value.code.startswith("eval.py: error: --responder api: the server refused every sample "
                                           "(first: 'p1' sample 0: HTTP 400")
    assert not os.path.exists(files / "out1" / "summary.json")
    # 402 (no credit left) is no refusal of the prompt: it stops the run, and nothing is scored
    server, seen = start_echo_server(refuse={"p2"}, status=402)
    try:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "api", "--api-key-env", "",
                           "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--api-model", "echo",
                           "--out-dir", str(files / "out402")])
    finally:
        server.shutdown()
        server.server_close()
    assert exit_info.value.code.startswith("eval.py: error: --responder api: ") and "HTTP 402" in exit_info.value.code
    assert not os.path.exists(files / "out402" / "summary.json")


def test_pass_at_k_counts_a_puzzle_with_any_exact_sample():
    def resp(answer):
        return f"<think>x</think>\n<answer>{answer}</answer>"
    gold = ["a", "b"]
    rows = [{"id": "p1", **reward_score(resp("a | b"), gold)}, {"id": "p1", **reward_score(resp("b | a"), gold)},
            {"id": "p2", **reward_score(resp("b | a"), gold)}, {"id": "p2", **reward_score("junk", gold)}]
    assert evaluate.summarize(rows, 2)["pass_at_k"] == 0.5  # p1: one exact sample of two; p2: none


def test_samples_of_a_deterministic_responder_need_a_temperature(files):
    for responder in (["expert", "--train", str(files / "train.jsonl")], ["model", "--model-path", str(files)]):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", *responder, "--num-samples", "4",
                           "--out-dir", str(files / "out")])
        assert exit_info.value.code == (f"eval.py: error: --num-samples 4 at temperature 0 gives {responder[0]} 4 copies "
                                        "of one deterministic answer: pass --temperature > 0 (or --num-samples 1)")
    with pytest.raises(SystemExit) as exit_info:  # independent has no temperature at all
        evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "independent", "--train",
                       str(files / "train.jsonl"), "--num-samples", "4", "--temperature", "1", "--out-dir",
                       str(files / "out")])
    assert exit_info.value.code == ("eval.py: error: --num-samples 4 gives independent 4 copies of one deterministic "
                                    "answer at any temperature: evaluate it with --num-samples 1")
    assert not os.path.exists(files / "out")


def test_a_torn_partial_line_does_not_swallow_the_next_row(files, tmp_path):
    """A kill mid-write leaves half a line: the resumed run ends it before appending, so the rows it
    appends stay readable (else the first would be glued to the torn half and lost)."""
    import responders

    records = cello.read_jsonl(files / "test.jsonl")
    partial = str(tmp_path / ".model-x.partial.jsonl")
    respond = responders.make_responder("random", seed=0)
    evaluate.evaluate(respond, records[:1], 1, 1, "t", resume_path=partial)
    with open(partial, "a") as f:
        f.write('{"id": "p2", "sam')   # killed while writing p2's row
    evaluate.evaluate(respond, records, 1, 1, "t", resume_path=partial)
    assert set(evaluate.load_partial(partial)) == {("p1", 0), ("p2", 0)}


def test_a_partial_file_of_one_torn_line_is_ended_too(files, tmp_path):
    """Killed while writing the first batch: no whole row yet, and the torn half is still ended."""
    import responders

    records = cello.read_jsonl(files / "test.jsonl")
    partial = str(tmp_path / ".model-x.partial.jsonl")
    with open(partial, "w") as f:
        f.write('{"id": "p1", "sam')
    evaluate.evaluate(responders.make_responder("random", seed=0), records[:1], 1, 1, "t", resume_path=partial)
    assert set(evaluate.load_partial(partial)) == {("p1", 0)}


def test_only_a_batch_s_own_rows_are_appended_when_a_sample_failed(files, tmp_path):
    """An api sample that got no answer has no row: the batch appends its other rows, not a row of the
    batch before in its place."""
    records = cello.read_jsonl(files / "test.jsonl")[:2]
    partial = str(tmp_path / ".model-x.partial.jsonl")

    def respond(chunk, num_samples):
        respond.errors = {(chunk[0]["id"], 1): "HTTP 503"} if chunk[0]["id"] == records[1]["id"] else {}
        return [["junk"] * num_samples for _ in chunk]

    evaluate.evaluate(respond, records, 2, 1, "t", resume_path=partial)
    lines = cello.read_jsonl(partial)
    first, second = records[0]["id"], records[1]["id"]
    assert [(r["id"], r["sample"]) for r in lines] == [(first, 0), (first, 1), (second, 0)]


def test_cli_api_key_unset(files, monkeypatch):
    monkeypatch.delenv("CELLO_UNSET_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "api", "--out-dir", str(files / "out"),
                       "--base-url", "http://127.0.0.1:9/v1", "--api-model", "m", "--api-key-env", "CELLO_UNSET_KEY"])
    assert "--responder api: " in exit_info.value.code and "CELLO_UNSET_KEY" in exit_info.value.code


def test_cli_model_responder(files):
    """A tiny checkpoint through cello's sampler: greedy responses, token counts in the summary."""
    import torch

    torch.set_num_threads(1)
    records = cello.read_jsonl(files / "test.jsonl")
    path = cello.prepare_model("tiny", str(files / "models"), records)
    out = files / "out"
    os.makedirs(out)
    (out / ".model-other.partial.jsonl").write_text('{"id": "p1"}\n')  # a killed run with other settings
    evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "model", "--model-path", path,
                   "--max-new-tokens", "6", "--batch-size", "1", "--out-dir", str(out)])
    rows = cello.read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["p1", "p2"]
    assert all(1 <= r["num_tokens"] <= 6 for r in rows)
    summary = json.load(open(out / "summary.json"))["model"]
    assert summary["mean_length"] == pytest.approx(sum(r["num_tokens"] for r in rows) / 2)
    # an untrained model writes nothing well formed: every response is malformed and scores 0 cells
    assert summary["format_validity"] == 0.0 and summary["cell_accuracy"] == 0.0
    # this run's partial rows are removed once the results are whole; the other run's stay for its rerun
    assert [n for n in os.listdir(out) if n.endswith(".partial.jsonl")] == [".model-other.partial.jsonl"]
    os.remove(out / ".model-other.partial.jsonl")

    # A run killed after its first batch (of one puzzle) goes on with the second: the first is not asked
    # again, and the rows are the straight run's.
    calls, sample = [], cello.sample

    def sample_then_die(*args, **kwargs):
        calls.append(len(args[1]))  # prompts in this batch
        if len(calls) == 2 and die:
            raise KeyboardInterrupt
        return sample(*args, **kwargs)

    argv = ["--puzzles", str(files / "test.jsonl"), "--responder", "model", "--model-path", path,
            "--batch-size", "1", "--out-dir", str(files / "resumed")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cello, "sample", sample_then_die)
        # other settings: both asked again (and the killed run's rows are kept for it); then the same
        # command, or greedy with another batch size: only p2
        for tokens, batch, dies, asked in [("6", "1", True, None), ("5", "1", False, [1, 1]), ("6", "1", False, [1]),
                                           ("6", "1", True, None), ("6", "2", False, [1])]:
            die, calls[:] = dies, []
            if dies:
                with pytest.raises(KeyboardInterrupt):
                    evaluate.main(argv + ["--max-new-tokens", tokens, "--batch-size", batch])
                assert not os.path.exists(files / "resumed" / "predictions.jsonl")
            else:
                evaluate.main(argv + ["--max-new-tokens", tokens, "--batch-size", batch])
                assert calls == asked
                if tokens == "6":
                    assert cello.read_jsonl(files / "resumed" / "predictions.jsonl") == rows
                os.remove(files / "resumed" / "predictions.jsonl")


def test_cli_model_responder_refuses_a_response_longer_than_the_model_s_context(files):
    # a typo once failed on allocating 6.4 TB for the response buffer, with a traceback
    path = cello.prepare_model("tiny", str(files / "models"), cello.read_jsonl(files / "test.jsonl"))
    out = files / "too-long"
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "model", "--model-path", path,
                       "--max-new-tokens", "100000000000", "--out-dir", str(out)])
    assert str(stop.value) == ("cello: error: --max-new-tokens 100000000000 is more than the model's context of "
                               f"4096 tokens (max_position_embeddings in {os.path.join(path, 'config.json')})")
    assert not os.path.exists(out / "predictions.jsonl")


def test_cli_model_responder_writing_into_the_model_folder(files):
    """--out-dir the model's own folder: the run removes its partial file at the end (its name does not
    change as predictions.jsonl is written beside the weights), and the model keeps its identity."""
    import torch

    torch.set_num_threads(1)
    path = cello.prepare_model("tiny", str(files / "models"), cello.read_jsonl(files / "test.jsonl"))
    before = cello.model_fingerprint(path)
    evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "model", "--model-path", path,
                   "--max-new-tokens", "3", "--out-dir", path])
    assert {"predictions.jsonl", "summary.json"} <= set(os.listdir(path))
    assert not [n for n in os.listdir(path) if n.endswith(".partial.jsonl")]
    assert cello.model_fingerprint(path) == before


@pytest.mark.parametrize("flag, value, expected", [
    ("--limit", "0", "an integer >= 1, got 0"),
    ("--limit", "-1", "an integer >= 1, got -1"),  # once it silently dropped the last puzzle
    ("--num-samples", "0", "an integer >= 1, got 0"),
    ("--batch-size", "0", "an integer >= 1, got 0"),
    ("--max-new-tokens", "0", "an integer >= 1, got 0"),
    ("--max-concurrency", "0", "an integer >= 1, got 0"),
    ("--seed", "-1", "an integer in [0, 2^63), got -1"),
    ("--seed", str(2**63), f"an integer in [0, 2^63), got {2**63}"),
    ("--temperature", "-0.5", "a number >= 0, got -0.5"),
    ("--temperature", "nan", "a number >= 0, got nan"),
    ("--top-p", "0", "a number in (0, 1], got 0.0"),
    ("--top-p", "1.5", "a number in (0, 1], got 1.5"),
])
def test_cli_numeric_flag_out_of_range(files, flag, value, expected):
    out = files / "out"
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "random", "--num-samples", "2",
                       "--out-dir", str(out), flag, value])
    assert exit_info.value.code == f"eval.py: error: {flag}: expected {expected}"
    assert not os.path.exists(out)


@pytest.mark.parametrize("responder", [["random"], ["api", "--base-url", "http://127.0.0.1:9/v1", "--api-model", "m",
                                                    "--api-key-env", ""]])
def test_cli_duplicate_ids(files, responder):
    """A repeated id would merge two puzzles in pass@k (and key the same API cache line): refused."""
    records = cello.read_jsonl(files / "test.jsonl")
    cello.write_jsonl_atomic(files / "dup.jsonl", records + records[:1])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--puzzles", str(files / "dup.jsonl"), "--out-dir", str(files / "out"), "--responder",
                       *responder])
    assert exit_info.value.code == (f"eval.py: error: --puzzles {files / 'dup.jsonl'}: duplicate id 'p1' "
                                    "(each puzzle needs its own id)")
    assert not os.path.exists(files / "out")


def test_cli_api_failures_are_reported_not_scored(files, monkeypatch):
    """A sample the server fails on every attempt (fault_server's doomed p1 sample 7 of 8) is no model error:
    eval stops with one line and writes no result; the answers are cached (in a folder eval creates), so a
    rerun sends nothing, and --retry-failed asks exactly the failed sample again."""
    key = "sk-test-eval-0123456789abcdef"
    log = str(files / "server.log")
    server, url = fault_server.start(str(files / "test.jsonl"), key, log, slow_s=0.05)
    monkeypatch.setenv("CELLO_TEST_KEY", key)
    monkeypatch.setattr(api, "backoff_delay", lambda *args, **kwargs: 0.0)  # six attempts without the waits
    out, cache = files / "out", files / "new" / "folder" / "cache.jsonl"
    argv = ["--puzzles", str(files / "test.jsonl"), "--responder", "api", "--num-samples", "8", "--out-dir", str(out),
            "--base-url", url, "--api-model", "toy", "--api-key-env", "CELLO_TEST_KEY", "--api-cache", str(cache)]
    message = (f"eval.py: error: --responder api: 1 of 16 samples failed (no answer from the server; first: 'p1' "
               f"sample 7: HTTP 500: {{\"error\": {{\"message\": \"internal error while serving key [REDACTED]\"}}}}); "
               f"the answers received are cached in {cache}: rerun with --retry-failed to ask the failed ones again")
    try:
        for extra, asked in [([], {("p1", 7)} | {(p, k) for p in ("p1", "p2") for k in range(8)}),
                             ([], set()),  # a rerun: everything is cached, the failure too
                             (["--retry-failed"], {("p1", 7)})]:
            before = len(cello.read_jsonl(log)) if os.path.exists(log) else 0
            with pytest.raises(SystemExit) as exit_info:
                evaluate.main(argv + extra)
            assert exit_info.value.code == message
            assert {(r["id"], r["sample"]) for r in cello.read_jsonl(log)[before:]} == asked
            assert not os.path.exists(out / "predictions.jsonl") and not os.path.exists(out / "summary.json")
            entries = api.load_cache(str(cache))
            assert len(entries) == 16 and [k[:3] for k, e in entries.items() if not e["ok"]] == [("p1", 7, "toy")]
    finally:
        server.shutdown()
        server.server_close()
    assert key not in cache.read_text()


# ---- found by mutation testing: resume, re-scoring, pass@k, the partial file's key ----

def test_a_puzzle_with_only_some_samples_in_the_partial_file_is_asked_again(tmp_path):
    """Resume skips a puzzle only when all its --num-samples rows are in the partial file."""
    records = [dict(r, split="test") for r in toy_puzzles(2)]
    partial = str(tmp_path / ".model-x.partial.jsonl")
    cello.write_jsonl_atomic(partial, [{"id": records[0]["id"], "sample": 0, "response": "junk",
                                        "answer": records[0]["answer"], "num_tokens": None}])
    asked = []

    def respond(recs, k):
        asked.extend(r["id"] for r in recs)
        return [["junk"] * k for _ in recs]
    rows = evaluate.evaluate(respond, records, 2, 2, "t", resume_path=partial)
    assert asked == [records[0]["id"], records[1]["id"]] and len(rows) == 4


def test_rows_from_the_partial_file_are_scored_again(tmp_path):
    """A resumed row's score fields come from reward.score now, not from the file."""
    record = dict(toy_puzzles(1)[0], split="test")
    text = f"<think>x</think>\n<answer>{' | '.join(record['answer'])}</answer>"
    partial = str(tmp_path / ".model-x.partial.jsonl")
    cello.write_jsonl_atomic(partial, [{"id": record["id"], "sample": 0, "response": text, "answer": record["answer"],
                                        "num_tokens": 7, "reward": 0.25, "exact": False, "valid": False}])
    rows = evaluate.evaluate(lambda recs, k: pytest.fail("asked again"), [record], 1, 1, "t", resume_path=partial)
    assert rows[0]["reward"] == 1.0 and rows[0]["exact"] and rows[0]["valid"]
    assert {k: rows[0][k] for k in reward.score(text, record["answer"], 7)} == reward.score(text, record["answer"], 7)


def test_pass_at_k_only_when_k_is_above_1():
    """summary has pass_at_k and k only for --num-samples > 1."""
    rows = [{"id": "p1", **reward.score("<think>x</think>\n<answer>a | b</answer>", ["a", "b"])}]
    assert "pass_at_k" not in evaluate.summarize(rows, 1) and "k" not in evaluate.summarize(rows, 1)
    assert evaluate.summarize(rows, 2)["pass_at_k"] == 1.0


def test_partial_path_covers_what_the_rows_depend_on(tmp_path):
    """Greedy (no --temperature or 0): one hash for any batch size; sampled: seed, top-p and batch size
    change it; the puzzles' content (not only their ids) changes it."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    records = [dict(r, split="test") for r in toy_puzzles(2)]

    def path(recs=records, **kw):
        args = dict(out_dir=str(tmp_path), model_path=str(tmp_path / "m"), max_new_tokens=8, num_samples=1,
                    temperature=None, top_p=1.0, seed=0, batch_size=8)
        return evaluate.partial_path(argparse.Namespace(**{**args, **kw}), recs)
    assert path(temperature=0.0, batch_size=1) == path() == path(batch_size=2)
    sampled = path(temperature=1.0)
    assert len({sampled, path(temperature=1.0, seed=1), path(temperature=1.0, top_p=0.9),
                path(temperature=1.0, batch_size=4)}) == 4
    changed = [dict(records[0], cells=records[0]["cells"][::-1]), records[1]]
    assert path(changed) != path()


# ---- found by mutation testing (round 2): which failure is named first, the partial file's key and last row ----

def test_the_failure_named_first_is_the_first_puzzle_and_sample(tmp_path):
    respond = lambda records, k: None
    respond.errors, respond.refused = {("p2", 0): "HTTP 500: b", ("p1", 1): "HTTP 503: a"}, set()
    args = argparse.Namespace(api_cache=str(tmp_path / "c.jsonl"), out_dir=str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.check_answered(respond, 4, args)
    assert ("2 of 4 samples failed (no answer from the server; first: 'p1' sample 1: HTTP 503: a)"
            in exit_info.value.code)


def test_partial_path_covers_the_number_of_samples(tmp_path):
    """Rows drawn with --num-samples 4 are not the rows of a run with 2 (the generator is shared by all samples)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    args = dict(out_dir=str(tmp_path), model_path=str(tmp_path / "m"), max_new_tokens=8, temperature=1.0, top_p=1.0,
                seed=0, batch_size=8)
    records = [dict(r, split="test") for r in toy_puzzles(2)]
    paths = {evaluate.partial_path(argparse.Namespace(**args, num_samples=k), records) for k in (2, 4)}
    assert len(paths) == 2


def test_the_last_row_of_a_key_in_the_partial_file_wins(tmp_path):
    """A puzzle asked again after a kill appends new rows for samples already there: the newer row is used."""
    partial = str(tmp_path / ".model-x.partial.jsonl")
    cello.write_jsonl_atomic(partial, [{"id": "p1", "sample": 0, "response": "old"},
                                       {"id": "p1", "sample": 0, "response": "new"}])
    assert evaluate.load_partial(partial) == {("p1", 0): {"id": "p1", "sample": 0, "response": "new"}}


def test_local_responders_are_deterministic_unless_told(files, monkeypatch):
    """eval's default for expert and model is temperature 0 (the expert's own default, 0.1, is for
    distillation): without --temperature the expert gets 0.0, not None."""
    seen = {}
    real = evaluate.responders.make_responder

    def spy(name, **options):
        seen[name] = options.get("temperature")
        return real(name, **options)

    monkeypatch.setattr(evaluate.responders, "make_responder", spy)
    args = evaluate.parse_args(["--puzzles", str(files / "test.jsonl"), "--responder", "expert", "random",
                                "--train", str(files / "train.jsonl"), "--out-dir", str(files / "out")])
    for name in args.responder:
        evaluate.build(name, args, cello.read_jsonl(files / "train.jsonl"))
    assert seen == {"expert": 0.0, "random": 0.0}


def test_an_explicit_temperature_0_is_refused_with_samples_too(files):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--puzzles", str(files / "test.jsonl"), "--responder", "expert", "--train",
                       str(files / "train.jsonl"), "--num-samples", "2", "--temperature", "0",
                       "--out-dir", str(files / "out")])
    assert e.value.code == ("eval.py: error: --num-samples 2 at temperature 0 gives expert 2 copies of one "
                            "deterministic answer: pass --temperature > 0 (or --num-samples 1)")
