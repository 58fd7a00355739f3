"""distill.py and api.py: the request body, the backoff schedule, the cache, and whole distill runs
against a real chat-completions server on 127.0.0.1 that injects faults (tests/fault_server.py),
including a run killed with SIGKILL and restarted."""
import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time

import httpx
import pytest

import api
import cello
import distill
import fault_server
import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["B cell", "CD14 monocyte", "CD4 T cell", "CD8 T cell", "NK cell", "platelet"]
MARKERS = {"B cell": ["MS4A1", "CD79A"], "CD14 monocyte": ["CD14", "LYZ"], "CD4 T cell": ["IL7R", "CD4"],
           "CD8 T cell": ["CD8A", "CD8B"], "NK cell": ["GNLY", "NKG7"], "platelet": ["PPBP", "PF4"]}
BACKGROUND = ["MALAT1", "RPL13", "RPS27", "TMSB4X", "B2M", "ACTB", "FTL", "EEF1A1"]


def toy_puzzles(count, seed=0, split="train"):
    """Puzzles of 2-4 cells whose genes are their type's two markers among shuffled housekeeping genes."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        n = 2 + i % 3
        answer = rng.sample(LABELS, n)
        cells = []
        for label in answer:
            genes = MARKERS[label] + rng.sample(BACKGROUND, 4)
            rng.shuffle(genes)
            cells.append(genes)
        records.append({"id": f"toy/n{n}/{seed}-{i:04d}", "source": "toy", "donor": "D0", "batch": None,
                        "split": split, "context": "The cell is from a female, originating from the blood.",
                        "cells": cells, "candidates": sorted(answer), "answer": answer})
    return records


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "USER"}]


def test_request_body_chat_model_sends_temperature_and_max_tokens():
    body = api.request_body("gpt-4o", MESSAGES, temperature=0.7, max_tokens=512)
    assert body == {"model": "gpt-4o", "messages": MESSAGES, "temperature": 0.7, "max_tokens": 512}
    assert api.request_body("Qwen/Qwen2.5-7B-Instruct", MESSAGES) == {"model": "Qwen/Qwen2.5-7B-Instruct",
                                                                      "messages": MESSAGES}


@pytest.mark.parametrize("model", ["o1", "o1-2024-12-17", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "openai/o3"])
def test_request_body_reasoning_model_drops_temperature(model):
    body = api.request_body(model, MESSAGES, temperature=0.7, max_tokens=4000, reasoning_effort="high")
    assert body == {"model": model, "messages": MESSAGES, "max_completion_tokens": 4000, "reasoning_effort": "high"}


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4o-mini", "ollama/llama3", "o", "foo1", "olmo-2"])
def test_chat_model_names_are_not_reasoning(model):
    assert not api.is_reasoning_model(model)


def test_request_body_o1_mini_folds_the_system_message_and_flag_overrides_name():
    body = api.request_body("o1-mini", MESSAGES, max_tokens=100)
    assert body["messages"] == [{"role": "user", "content": "SYS\n\nUSER"}]
    assert body["max_completion_tokens"] == 100 and "temperature" not in body
    # the flag wins over the name both ways: a served reasoning model with a custom name, and the opposite
    assert api.request_body("my-r1", MESSAGES, temperature=1.0, max_tokens=9, reasoning=True) == {
        "model": "my-r1", "messages": MESSAGES, "max_completion_tokens": 9}
    assert api.request_body("o1", MESSAGES, temperature=1.0, reasoning=False)["temperature"] == 1.0


class EdgeRng:
    """uniform(a, b) returns a or b: the jitter's bounds."""

    def __init__(self, pick_high):
        self.pick_high = pick_high

    def uniform(self, a, b):
        return b if self.pick_high else a


def test_backoff_exponential_with_equal_jitter_bounds():
    for attempt, d in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 10.0)]:  # base 0.5, capped at 10
        assert api.backoff_delay(attempt, base_s=0.5, max_s=10.0, rng=EdgeRng(False)) == d / 2
        assert api.backoff_delay(attempt, base_s=0.5, max_s=10.0, rng=EdgeRng(True)) == d
    rng = random.Random(0)
    delays = [api.backoff_delay(3, base_s=1.0, max_s=60.0, rng=rng) for _ in range(200)]
    assert all(2.0 <= x <= 4.0 for x in delays) and len(set(delays)) > 100  # jittered, within [d/2, d]


def test_backoff_honours_retry_after():
    assert api.backoff_delay(1, retry_after=0.1, base_s=5.0) == 0.1
    assert api.backoff_delay(5, retry_after=7.0, base_s=5.0, max_s=60.0) == 7.0
    assert api.backoff_delay(1, retry_after=3600.0, max_s=60.0) == 60.0
    assert api.parse_retry_after("0.1") == 0.1 and api.parse_retry_after("12") == 12.0
    assert api.parse_retry_after(None) is None and api.parse_retry_after("soon") is None
    assert api.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= api.parse_retry_after(future) <= 31


def test_redact():
    assert api.redact("bad key sk-abc, again sk-abc", "sk-abc") == "bad key [REDACTED], again [REDACTED]"
    assert api.redact("nothing", None) == "nothing"


def test_key_from_the_environment_is_checked_without_echoing_it(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache.jsonl")
    monkeypatch.setenv("CELLO_K", "sk-has space")
    with pytest.raises(ValueError, match="^environment variable CELLO_K holds characters an HTTP header cannot "
                                         "carry$"):
        api.api_responder("http://127.0.0.1:9/v1", "m", "CELLO_K", cache)
    monkeypatch.setenv("CELLO_K", "sk-from-a-file\n")  # the trailing newline is stripped, not refused
    assert api.api_responder("http://127.0.0.1:9/v1", "m", "CELLO_K", cache)([], 4) == []
    monkeypatch.delenv("CELLO_K")
    with pytest.raises(ValueError, match="^environment variable CELLO_K is not set"):
        api.api_responder("http://127.0.0.1:9/v1", "m", "CELLO_K", cache)
    key = "gsk_8fJ2kLmN0pQrStUvWxYz1234567890abcdEFGH"  # a key of name characters, pasted where the name goes
    with pytest.raises(ValueError) as error:
        api.api_responder("http://127.0.0.1:9/v1", "m", key, cache)
    assert "looks like a key" in str(error.value) and "8fJ2" not in str(error.value)
    with pytest.raises(ValueError, match="ids must be unique"):
        api.api_responder("http://127.0.0.1:9/v1", "m", "", cache)(toy_puzzles(1) * 2, 1)


def test_cache_skips_a_torn_last_line_and_later_lines_win(tmp_path):
    path = str(tmp_path / "cache.jsonl")
    a = {"id": "p1", "sample": 0, "model": "m", "ok": False, "error": "HTTP 500"}
    b = {"id": "p1", "sample": 0, "model": "m", "ok": True, "content": "x"}
    with open(path, "w") as f:
        f.write(json.dumps(a) + "\n" + json.dumps(b) + "\n" + '{"id": "p2", "sample": 0, "mo')  # killed mid-line
    cache = api.load_cache(path)
    assert cache == {("p1", 0, "m", None): b}
    with open(path) as f:
        assert f.read().endswith('"mo\n')  # the next append starts on a line of its own


def test_a_file_that_is_not_a_cache_is_refused_before_anything_is_appended(tmp_path):
    """--api-cache pointed at a puzzles file by mistake: its whole JSON lines are not cache entries, so the
    file is refused untouched, not appended to."""
    path = tmp_path / "puzzles.jsonl"
    cello.write_jsonl_atomic(path, toy_puzzles(2))
    before = path.read_bytes()
    with pytest.raises(ValueError) as error:
        api.api_responder("http://127.0.0.1:9/v1", "m", "", str(path))
    assert str(error.value) == (f"the cache {path} line 1 is not an API cache entry (no id, sample and model): "
                                "give the cache a file of its own")
    assert path.read_bytes() == before


def test_credentials_in_the_base_url_are_not_shown(tmp_path, monkeypatch):
    """user:password@ in the base URL (a basic-auth proxy) stays out of error messages, and so does a key
    pasted in place of the URL."""
    mock_server(monkeypatch, lambda request: httpx.Response(404, json={"error": {"message": "no such model"}}))
    respond = api.api_responder("http://me:sk-SECRET-42@server.test/v1", "m", "", str(tmp_path / "c.jsonl"),
                                progress=False)
    with pytest.raises(api.ApiError) as info:
        respond(toy_puzzles(1), 1)
    assert str(info.value).startswith("http://server.test/v1/chat/completions: HTTP 404") and "SECRET" not in str(info.value)
    with pytest.raises(ValueError) as error:
        api.api_responder("sk-proj-SECRET-42", "m", "", str(tmp_path / "c.jsonl"))
    assert str(error.value) == "base URL is not an http(s) URL with a host (e.g. https://api.openai.com/v1)"
    with pytest.raises(ValueError, match="base URL 'htp://x/v1' is not"):  # a URL's typo is shown
        api.api_responder("htp://x/v1", "m", "", str(tmp_path / "c.jsonl"))


def test_cache_is_keyed_by_the_sampling_settings_sent(tmp_path):
    """Changed sampling settings ask again; a setting the model never gets (temperature for o1) does not;
    an entry written before settings counted (the messages' hash alone) still serves the defaults."""
    records = toy_puzzles(1)
    cache = str(tmp_path / "cache.jsonl")
    for model in ("m", "o1"):
        old = {"id": records[0]["id"], "sample": 0, "model": model, "ok": True, "content": "x",
               "prompt_sha": api.prompt_hash(cello.render_messages(records[0]))}
        with open(cache, "a") as f:
            f.write(json.dumps(old) + "\n")

    def todo(model, **settings):
        return api.api_responder("http://127.0.0.1:9/v1", model, "", cache, **settings).pending(records, 1)

    assert todo("m") == set() and todo("o1") == set()
    assert todo("m", temperature=0.7) == todo("m", max_tokens=100) == {(0, 0)}
    assert todo("o1", temperature=0.7) == set()  # never sent to a reasoning model
    assert todo("o1", max_tokens=100) == todo("o1", reasoning_effort="high") == {(0, 0)}
    # an answer for other settings is kept beside the first, not in its place: going back asks nothing
    warm = dict(old, model="m", content="y",
                prompt_sha=api.prompt_hash(cello.render_messages(records[0]), api.sampling_settings("m", 0.7)))
    with open(cache, "a") as f:
        f.write(json.dumps(warm) + "\n")
    assert todo("m", temperature=0.7) == set() and todo("m") == set()


def test_cache_folder_is_made_before_any_request(tmp_path):
    """An --api-cache in a folder that does not exist yet is created; one that cannot be written is refused
    before any request is sent (an answer it could not save would be paid for and lost)."""
    cache = tmp_path / "new" / "folder" / "cache.jsonl"
    api.api_responder("http://127.0.0.1:9/v1", "m", "", str(cache))
    assert cache.exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"^cannot write the cache .*a-file/cache.jsonl \(File exists: .*a-file\)$"):
        api.api_responder("http://127.0.0.1:9/v1", "m", "", str(tmp_path / "a-file" / "cache.jsonl"))


@pytest.mark.parametrize("status, cut", [(500, 300), (200, 200), (401, 300)])
def test_key_at_the_cut_of_an_error_text_is_redacted(tmp_path, monkeypatch, status, cut):
    """The server's text in an error is cut to 300 (HTTP errors) or 200 (malformed bodies) characters:
    a key echoed across the cut must be redacted whole first, not leave its first 20 characters."""
    key = "sk-" + secrets.token_hex(20)
    body = "x" * (cut - 20) + key + " and more"  # 200: not JSON, so a malformed body
    server = httpx.MockTransport(lambda request: httpx.Response(status, text=body))
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **options: real_client(transport=server, **options))
    monkeypatch.setenv("CELLO_TEST_KEY", key)
    cache = tmp_path / "cache.jsonl"
    respond = api.api_responder("http://server.test/v1", "m", "CELLO_TEST_KEY", str(cache), max_attempts=1,
                                progress=False)
    if status == 401:  # fatal: the run stops with the error
        with pytest.raises(api.ApiError) as info:
            respond(toy_puzzles(1), 1)
        errors = [str(info.value)]
    else:
        respond(toy_puzzles(1), 1)
        errors = list(respond.errors.values())
    assert len(errors) == 1 and "[REDACTED]" in errors[0]
    assert key[:8] not in errors[0] and key[:8] not in cache.read_text()


def mock_server(monkeypatch, handler):
    """httpx.Client answers through handler(request) -> httpx.Response, with no socket."""
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **options: real_client(transport=httpx.MockTransport(handler), **options))


@pytest.mark.parametrize("url", ["api.openai.com/v1", "ftp://host/v1", "http://[::1/v1", "http://host:port/v1"])
def test_a_base_url_that_is_not_http_is_refused_before_any_request(tmp_path, url):
    """Else every request fails as a 'connection error', is retried and cached as failed for good."""
    with pytest.raises(ValueError, match=r"^base URL .* is not an http\(s\) URL with a host"):
        api.api_responder(url, "m", "", str(tmp_path / "cache.jsonl"))
    assert not (tmp_path / "cache.jsonl").exists()


def test_a_key_given_as_the_variable_name_is_refused_without_echoing_it(tmp_path):
    with pytest.raises(ValueError) as info:
        api.api_responder("http://127.0.0.1:9/v1", "m", "sk-abc123secret", str(tmp_path / "cache.jsonl"))
    assert "NAME of an environment variable" in str(info.value) and "abc123" not in str(info.value)


def test_a_redirect_stops_the_run_and_names_the_new_url(tmp_path, monkeypatch):
    calls = []
    mock_server(monkeypatch, lambda request: calls.append(1) or httpx.Response(
        301, headers={"location": "https://new.test/v1/chat/completions"}, text="<html>\n<body>moved</body>\n</html>"))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "cache.jsonl"), max_concurrency=1,
                                progress=False)
    with pytest.raises(api.ApiError, match=r"HTTP 301: redirected to 'https://new.test/v1/chat/completions'"):
        respond(toy_puzzles(3), 2)
    assert len(calls) == 1 and api.load_cache(str(tmp_path / "cache.jsonl")) == {}  # nothing cached as failed


def test_an_error_page_is_one_line_and_odd_usage_keeps_the_answer(tmp_path, monkeypatch):
    answers = [lambda: httpx.Response(404, text="<html>\n  <h1>Not Found</h1>\n</html>\n")]
    mock_server(monkeypatch, lambda request: answers[-1]())
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "a.jsonl"), progress=False)
    with pytest.raises(api.ApiError) as info:
        respond(toy_puzzles(1), 1)
    assert "\n" not in str(info.value) and "HTTP 404: <html> <h1>Not Found</h1> </html>" in str(info.value)
    # a 200 whose usage is not numbers: the answer is kept (usage counts 0), not lost to a crash
    answer = {"choices": [{"message": {"content": "<think>x</think>\n<answer>a</answer>"}, "finish_reason": "stop"}]}
    for usage in ("n/a", {"prompt_tokens": "12k", "completion_tokens": 3}):
        answers.append(lambda: httpx.Response(200, json={**answer, "usage": usage}))
        respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / f"{len(str(usage))}.jsonl"),
                                    progress=False)
        assert respond(toy_puzzles(1), 1) == [[answer["choices"][0]["message"]["content"]]]
        assert respond.usage["prompt_tokens"] == 0


def test_retry_after_ms_is_honoured(tmp_path, monkeypatch):
    answers = iter([httpx.Response(429, headers={"retry-after-ms": "250", "retry-after": "9"}),
                    httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}]})])
    mock_server(monkeypatch, lambda request: next(answers))
    waits = []
    real_delay = api.backoff_delay
    monkeypatch.setattr(api, "backoff_delay", lambda attempt, retry_after=None, *a, **k: waits.append(retry_after)
                        or real_delay(attempt, retry_after, *a, **k))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), progress=False)
    assert respond(toy_puzzles(1), 1) == [["ok"]] and waits == [0.25]


def test_an_undecodable_body_is_retried(tmp_path, monkeypatch):
    """A 200 whose gzip Content-Encoding is not gzip: retried like a malformed body, not a crash of the run."""
    answers = iter([httpx.Response(200, headers={"content-encoding": "gzip"},
                                   stream=httpx.ByteStream(b"not gzip at all")),
                    httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}]})])
    mock_server(monkeypatch, lambda request: next(answers))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), backoff_s=0,
                                progress=False)
    assert respond(toy_puzzles(1), 1) == [["ok"]] and respond.usage["requests"] == 2


@pytest.mark.parametrize("status, error, message", [
    (429, {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"},
     "HTTP 429: .*insufficient_quota"),
    (402, {}, "HTTP 402")])
def test_no_credit_stops_the_run_and_caches_nothing(tmp_path, monkeypatch, status, error, message):
    """No credit (OpenAI's 429 insufficient_quota, or 402): asking again never helps, unlike a rate limit, and
    no failure is cached for a rerun to trust."""
    calls = []
    mock_server(monkeypatch, lambda request: calls.append(1) or httpx.Response(status, json={"error": error}))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), max_concurrency=1,
                                progress=False)
    with pytest.raises(api.ApiError, match=message) as info:
        respond(toy_puzzles(3), 2)
    assert info.value.fatal and len(calls) == 1 and api.load_cache(str(tmp_path / "c.jsonl")) == {}


def test_a_short_key_changes_no_answer_and_a_rerun_asks_nothing(tmp_path, monkeypatch):
    """A dummy key such as "x" (local servers) is inside the model name and the answers: the cache keeps
    both as they are, so a rerun finds every answer and scores it the same."""
    calls = []
    content = "<think>8x more CD8A</think>\n<answer>x | y</answer>"
    mock_server(monkeypatch, lambda request: calls.append(1) or httpx.Response(
        200, json={"choices": [{"message": {"content": content}}]}))
    monkeypatch.setenv("CELLO_TEST_KEY", "x")
    make = lambda: api.api_responder("http://server.test/v1", "mixtral-8x7b", "CELLO_TEST_KEY",
                                     str(tmp_path / "c.jsonl"), progress=False)
    assert make()(toy_puzzles(2), 1) == [[content], [content]] and len(calls) == 2
    assert make()(toy_puzzles(2), 1) == [[content], [content]] and len(calls) == 2


def test_a_lone_surrogate_in_an_answer_is_cached_not_fatal(tmp_path, monkeypatch):
    """Valid JSON ("\\ud83d") that UTF-8 cannot hold: the paid answer is cached with "?" in its place."""
    body = b'{"choices": [{"message": {"content": "<think>\\ud83d</think>"}}]}'  # the escape as a server sends it
    mock_server(monkeypatch, lambda request: httpx.Response(200, content=body, headers={"content-type": "application/json"}))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), progress=False)
    assert respond(toy_puzzles(1), 1) == [["<think>?</think>"]]
    assert [e["content"] for e in api.load_cache(str(tmp_path / "c.jsonl")).values()] == ["<think>?</think>"]


def test_pending_reasks_changed_prompts_and_optionally_failures():
    records = toy_puzzles(2)
    sha = [api.prompt_hash(cello.render_messages(r)) for r in records]
    cache = {(records[0]["id"], 0, "m", sha[0]): {"ok": True, "prompt_sha": sha[0]},
             (records[0]["id"], 1, "m", sha[0]): {"ok": False, "prompt_sha": sha[0]},
             (records[1]["id"], 0, "m", "an-older-prompt"): {"ok": True, "prompt_sha": "an-older-prompt"}}
    assert api.pending(records, 2, "m", cache) == {(1, 0), (1, 1)}
    assert api.pending(records, 2, "m", cache, retry_failed=True) == {(0, 1), (1, 0), (1, 1)}
    assert api.pending(records, 2, "other-model", cache) == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_acceptance_and_sft_selection():
    records = toy_puzzles(2)
    rows = [{"id": records[0]["id"], "n": 2, "status": s, "reward": r} for s, r in
            [("rejected", -1.0), ("accepted", 1.0), ("accepted", 1.0)]]
    rows += [{"id": records[1]["id"], "n": 3, "status": s, "reward": r} for s, r in
             [("failed", None), ("rejected", 0.25), ("rejected", 0.0)]]
    a = distill.acceptance(rows)
    assert a == {"puzzles": 2, "samples": 6, "accepted": 2, "rejected": 3, "failed": 1, "rejected_malformed": 1,
                 "sample_acceptance": 2 / 6, "puzzles_accepted": 1, "puzzle_acceptance": 0.5}
    texts = [["t0", "t1", "t2"], ["u0", "u1", "u2"]]
    assert [r["response"] for r in distill.select_sft(records, texts, rows, keep_all=False)] == ["t1"]
    assert [r["response"] for r in distill.select_sft(records, texts, rows, keep_all=True)] == ["t1", "t2"]


def test_cost_estimate():
    records = toy_puzzles(3)
    chars = sum(len(m["content"]) for m in cello.render_messages(records[1]))
    prompt, output, usd = distill.estimate_cost(records, {(1, 0), (1, 1)}, 1000, 15.0, 60.0)
    assert prompt == int(2 * chars / distill.CHARS_PER_TOKEN) and output == 2000
    assert usd == pytest.approx((prompt * 15.0 + 2000 * 60.0) / 1e6)


# ---------------------------------------------------------------------------------------------
# Whole runs against the fault-injecting server
# ---------------------------------------------------------------------------------------------

SAMPLES, MAX_ATTEMPTS = 4, 4


def distill_cmd(puzzles, out_dir, base_url, *extra):
    return [sys.executable, os.path.join(ROOT, "distill.py"), "--teacher", "api", "--puzzles", puzzles,
            "--out-dir", out_dir, "--samples", str(SAMPLES), "--base-url", base_url, "--api-model", "toy-chat",
            "--api-key-env", "CELLO_TEST_KEY", "--max-concurrency", "4", "--timeout", "0.5",
            "--max-attempts", str(MAX_ATTEMPTS), "--backoff", "0.05", *extra]


def run(cmd, key, monkeypatch, capsys):
    """distill.main() in this process (cello and torch are imported already: no start-up cost) with the
    command line cmd and the key in the environment; returns (exit code or sys.exit message, output)."""
    monkeypatch.setenv("CELLO_TEST_KEY", key)
    monkeypatch.setattr(sys, "argv", cmd[1:])
    capsys.readouterr()
    try:
        distill.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err + (code if isinstance(code, str) else "")


def read_log(path):
    return cello.read_jsonl(path) if os.path.exists(path) else []


def files_under(folder):
    for base, _, names in os.walk(folder):
        for name in names:
            yield os.path.join(base, name)


@pytest.fixture
def setup(tmp_path):
    puzzles = str(tmp_path / "puzzles.jsonl")
    cello.write_jsonl_atomic(puzzles, toy_puzzles(16))
    key = "sk-test-" + secrets.token_hex(16)
    servers = []

    def serve(name):
        server, url = fault_server.start(puzzles, key, str(tmp_path / f"{name}.log"))
        servers.append(server)
        return url, str(tmp_path / f"{name}.log")

    yield puzzles, key, serve, tmp_path
    for server in servers:
        server.shutdown()
        server.server_close()


def test_api_distill_survives_faults_and_a_kill(setup, monkeypatch, capsys):
    puzzles, key, serve, tmp = setup
    records = cello.read_jsonl(puzzles)
    every = {(r["id"], k) for r in records for k in range(SAMPLES)}
    outputs = []  # stdout + stderr of every run, checked for the key at the end

    # 1. An uninterrupted run: every sample ends accepted, rejected or failed after MAX_ATTEMPTS requests.
    url, log_path = serve("ref")
    code, output = run(distill_cmd(puzzles, str(tmp / "ref"), url, "--yes"), key, monkeypatch, capsys)
    outputs.append(output)
    assert code == 0, output
    assert "samples failed (first: " in output and "rerun with --retry-failed to ask them again" in output
    statuses = {(r["id"], r["sample"]): r["status"] for r in cello.read_jsonl(tmp / "ref" / "samples.jsonl")}
    assert statuses == {(pid, k): fault_server.expected_status(pid, k) for pid, k in every}
    assert set(statuses.values()) == {"accepted", "rejected", "failed"}
    log = read_log(log_path)
    assert all(line["id"] == line["prompt_id"] for line in log)  # the header names the prompt's puzzle
    assert all(line["body_keys"] == ["messages", "model"] for line in log)  # no temperature / max_tokens given
    faults = sum(line["outcome"] != "ok" for line in log) / len(log)
    assert 0.15 <= faults <= 0.6, faults  # the fault mix really was exercised
    assert {line["outcome"] for line in log} == {"ok", *fault_server.FAULTS}
    requests = {}
    for line in log:
        requests.setdefault((line["id"], line["sample"]), []).append(line["outcome"])
    for sample, status in statuses.items():
        if status == "failed":
            assert requests[sample] == ["500"] * MAX_ATTEMPTS
        else:  # asked until one answer arrived whole, never after it
            assert requests[sample][-1] in ("ok", "slow") and requests[sample].count("ok") <= 1
    report = json.loads((tmp / "ref" / "report.json").read_text())
    assert report["overall"]["samples"] == len(every)
    assert report["overall"]["failed"] == sum(s == "failed" for s in statuses.values())
    assert report["usage"]["cached"] == 0 and report["usage"]["requests"] == len(log)
    sft = cello.read_jsonl(tmp / "ref" / "sft.jsonl")
    first_accepted = [r["id"] for r in records if any(statuses[(r["id"], k)] == "accepted" for k in range(SAMPLES))]
    assert [row["id"] for row in sft] == first_accepted
    assert all(row["response"].endswith("<answer>" + " | ".join(row["answer"]) + "</answer>") for row in sft)

    # 2. The same run, killed (SIGKILL) once some samples are cached, then restarted with the same command.
    url, log_path = serve("killed")
    out = str(tmp / "killed")
    cmd = distill_cmd(puzzles, out, url, "--yes")
    env = {**os.environ, "CELLO_TEST_KEY": key, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    cache_path = os.path.join(out, "api_cache.jsonl")
    while proc.poll() is None:
        if os.path.exists(cache_path) and len(api.load_cache(cache_path)) >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    outputs.append(proc.communicate()[0])
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    time.sleep(0.3)  # let the server log any request that was on the wire
    finished = {(e["id"], e["sample"]) for e in api.load_cache(cache_path).values()}
    seen_before = len(read_log(log_path))
    assert 12 <= len(finished) < len(every)
    code, output = run(cmd, key, monkeypatch, capsys)  # the restart (in this process: same code path)
    outputs.append(output)
    assert code == 0, output
    after = read_log(log_path)[seen_before:]
    assert after, "the restarted run sent no request"
    assert not {(line["id"], line["sample"]) for line in after} & finished  # nothing finished is asked again
    assert (tmp / "killed" / "sft.jsonl").read_bytes() == (tmp / "ref" / "sft.jsonl").read_bytes()
    assert {(r["id"], r["sample"]): r["status"] for r in cello.read_jsonl(tmp / "killed" / "samples.jsonl")} == statuses
    restarted = json.loads((tmp / "killed" / "report.json").read_text())
    assert restarted["overall"] == report["overall"] and restarted["by_n"] == report["by_n"]
    assert restarted["usage"]["cached"] == len(finished)

    # 3. --retry-failed asks again exactly the samples cached as failed (the doomed ones), nothing else.
    seen_before = len(read_log(log_path))
    code, output = run(cmd + ["--retry-failed"], key, monkeypatch, capsys)
    outputs.append(output)
    assert code == 0, output
    retried = [(line["id"], line["sample"]) for line in read_log(log_path)[seen_before:]]
    failed = {sample for sample, status in statuses.items() if status == "failed"}
    assert set(retried) == failed and len(retried) == MAX_ATTEMPTS * len(failed)

    # 4. The key is in no file a run wrote and in no output, though the server echoed it in its 500s.
    for path in list(files_under(str(tmp / "ref"))) + list(files_under(out)):
        assert key not in open(path, encoding="utf-8", errors="replace").read(), path
    assert "[REDACTED]" in (tmp / "ref" / "api_cache.jsonl").read_text()
    assert all(key not in text for text in outputs)


def test_wrong_key_stops_the_run_without_leaking_either_key(setup, monkeypatch, capsys):
    puzzles, key, serve, tmp = setup
    url, log_path = serve("server")
    wrong = "sk-wrong-" + secrets.token_hex(16)
    code, output = run(distill_cmd(puzzles, str(tmp / "out"), url, "--yes"), wrong, monkeypatch, capsys)
    assert isinstance(code, str) and "HTTP 401" in code and "[REDACTED]" in code
    assert wrong not in output and key not in output
    log = read_log(log_path)
    assert log and all(line["outcome"] == "401" for line in log)
    assert len(log) <= 4  # not retried, and the other workers stop: at most one request per worker
    assert not os.path.exists(tmp / "out" / "sft.jsonl")
    for path in files_under(str(tmp / "out")):
        assert wrong not in open(path).read()


def test_a_server_that_answers_nothing_is_an_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Connection refused for every sample: an outage, not a data set of 0 rows with exit status 0."""
    puzzles = str(tmp_path / "p.jsonl")
    cello.write_jsonl_atomic(puzzles, toy_puzzles(2))
    cmd = distill_cmd(puzzles, str(tmp_path / "out"), "http://127.0.0.1:9/v1", "--yes", "--max-attempts", "1")
    code, output = run(cmd, "sk-test", monkeypatch, capsys)
    assert isinstance(code, str) and code.startswith("distill.py: error: 8 of 8 samples failed (first: ")
    assert "connection error" in code and code.endswith("rerun with --retry-failed to ask them again")
    assert "\n" not in code and not (tmp_path / "out" / "report.json").exists()
    assert not (tmp_path / "out" / "sft.jsonl").exists()


def test_api_run_needs_yes_without_a_terminal(setup, monkeypatch, capsys):
    puzzles, key, serve, tmp = setup
    url, log_path = serve("server")
    code, output = run(distill_cmd(puzzles, str(tmp / "out"), url), key, monkeypatch, capsys)
    assert isinstance(code, str) and "pass --yes" in code
    assert "64 requests to send (0 samples already cached)" in output and "estimated $" in output
    assert read_log(log_path) == []  # nothing was sent
    code, _ = run(distill_cmd(puzzles, str(tmp / "out"), url, "--yes", "--api-key-env", "CELLO_NO_SUCH_VAR"), key,
                  monkeypatch, capsys)
    assert code == "distill.py: error: environment variable CELLO_NO_SUCH_VAR is not set (it should hold the API key)"


# ---------------------------------------------------------------------------------------------
# The expert teacher
# ---------------------------------------------------------------------------------------------

def expert_cmd(tmp_path, *extra):
    """An expert-teacher distill command on small toy files (written here)."""
    train, puzzles = str(tmp_path / "train.jsonl"), str(tmp_path / "puzzles.jsonl")
    cello.write_jsonl_atomic(train, toy_puzzles(40, seed=1))
    cello.write_jsonl_atomic(puzzles, toy_puzzles(12, seed=2))
    return [sys.executable, "distill.py", "--teacher", "expert", "--train", train, "--puzzles", puzzles,
            "--out-dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("flag, value, expected", [
    ("--samples", "0", "an integer >= 1, got 0"),
    ("--limit", "0", "an integer >= 1, got 0"),
    ("--limit", "-2", "an integer >= 1, got -2"),
    ("--seed", "-1", "an integer in [0, 2^63), got -1"),
    ("--seed", str(2**63), f"an integer in [0, 2^63), got {2**63}"),
    ("--temperature", "-1", "a number >= 0, got -1.0"),
    ("--max-new-tokens", "0", "an integer >= 1, got 0"),
    ("--batch-size", "0", "an integer >= 1, got 0"),
    ("--max-concurrency", "0", "an integer >= 1, got 0"),
    ("--timeout", "0", "a number > 0, got 0.0"),
    ("--timeout", "inf", "a number > 0, got inf"),
    ("--max-attempts", "0", "an integer >= 1, got 0"),
    ("--backoff", "-1", "a number >= 0, got -1.0"),
    ("--max-tokens", "0", "an integer >= 1, got 0"),
    ("--price-input", "-1", "a number >= 0, got -1.0"),
    ("--est-output-tokens", "-1", "an integer >= 0, got -1"),
])
def test_numeric_flag_out_of_range(tmp_path, monkeypatch, capsys, flag, value, expected):
    code, output = run(expert_cmd(tmp_path, flag, value), "unused", monkeypatch, capsys)
    assert code == f"distill.py: error: {flag}: expected {expected}"
    assert not os.path.exists(tmp_path / "out")


def test_bad_train_file_and_duplicate_ids(tmp_path, monkeypatch, capsys):
    cmd = expert_cmd(tmp_path)
    train = cmd[cmd.index("--train") + 1]
    os.remove(train)
    code, _ = run(cmd, "unused", monkeypatch, capsys)
    assert code == f"distill.py: error: --train {train}: no such file"
    with open(train, "w") as f:
        f.write('{"id": "x"}\n')
    code, _ = run(cmd, "unused", monkeypatch, capsys)
    assert code.startswith(f"distill.py: error: {train} line 1: lacks field(s) ")
    cmd = expert_cmd(tmp_path)
    puzzles = cmd[cmd.index("--puzzles") + 1]
    cello.write_jsonl_atomic(puzzles, toy_puzzles(2) * 2)
    code, _ = run(cmd, "unused", monkeypatch, capsys)
    assert code == (f"distill.py: error: --puzzles {puzzles}: duplicate id 'toy/n2/0-0000' "
                    "(each puzzle needs its own id)")
    os.remove(puzzles)  # one line, as for --train (not argparse's usage block and status 2)
    code, output = run(cmd, "unused", monkeypatch, capsys)
    assert code == f"distill.py: error: --puzzles {puzzles}: no such file" and "usage:" not in output
    os.makedirs(puzzles)
    code, output = run(cmd, "unused", monkeypatch, capsys)
    assert code == f"distill.py: error: --puzzles {puzzles}: is a folder (expected a JSONL file of puzzle records)"


def test_expert_teacher_rejection_sampling(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, output = run(expert_cmd(tmp_path, "--samples", "3", "--temperature", "2.0"), "unused", monkeypatch, capsys)
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    rows = cello.read_jsonl(out / "samples.jsonl")
    assert len(rows) == 36 and {r["status"] for r in rows} <= {"accepted", "rejected"}
    assert report["overall"]["accepted"] == sum(r["status"] == "accepted" for r in rows) > 0
    assert report["overall"]["accepted"] + report["overall"]["rejected"] == 36
    # toy_puzzles(12) has 4 puzzles each of N = 2, 3, 4, so 12 samples each; the acceptances add up
    assert {n: a["samples"] for n, a in report["by_n"].items()} == {"2": 12, "3": 12, "4": 12}
    for n, a in report["by_n"].items():
        assert a["accepted"] == sum(r["status"] == "accepted" for r in rows if r["n"] == int(n))
    sft = cello.read_jsonl(out / "sft.jsonl")
    assert len(sft) == report["overall"]["puzzles_accepted"] == report["sft_rows"]
    assert all(reward.reward(row["response"], row["answer"]) == 1.0 for row in sft)
    assert "| all |" in output


@pytest.mark.parametrize("teacher, message", [
    (["expert"], "--teacher expert needs --train (puzzles to learn marker scores from)"),
    (["expert", "--train", "nope.jsonl"], "--train nope.jsonl: no such file"),
    (["model"], "--teacher model needs --model-path (a checkpoint folder)"),
    (["model", "--model-path", "nope"], "--model-path nope: not a Hugging Face model folder (no config.json)"),
    (["api"], "--teacher api needs --api-model (the served model's name)"),
])
def test_a_teacher_without_what_it_needs_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys, teacher,
                                                                          message):
    puzzles = str(tmp_path / "puzzles.jsonl")
    cello.write_jsonl_atomic(puzzles, toy_puzzles(2))
    code, _ = run([sys.executable, "distill.py", "--puzzles", puzzles, "--out-dir", str(tmp_path / "out"),
                   "--teacher", *teacher], "unused", monkeypatch, capsys)
    assert code == f"distill.py: error: {message}" and not os.path.exists(tmp_path / "out")


def test_an_empty_train_file_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    puzzles, train = str(tmp_path / "puzzles.jsonl"), tmp_path / "train.jsonl"
    cello.write_jsonl_atomic(puzzles, toy_puzzles(2))
    train.write_text("")
    code, _ = run([sys.executable, "distill.py", "--puzzles", puzzles, "--out-dir", str(tmp_path / "out"),
                   "--teacher", "expert", "--train", str(train)], "unused", monkeypatch, capsys)
    assert code == f"distill.py: error: --train {train}: no records" and not os.path.exists(tmp_path / "out")


def test_model_teacher_samples_whole_batches_of_its_batch_size(tmp_path, monkeypatch, capsys):
    """--batch-size 6 on 20 puzzles: batches of 6, 6, 6, 2 (as eval.py makes them), not 6, 6, 4, 4 (cut at
    16-puzzle chunks); --batch-size 20: one batch, not 16 and 4."""
    import torch

    torch.set_num_threads(1)
    puzzles = str(tmp_path / "puzzles.jsonl")
    records = toy_puzzles(20)
    cello.write_jsonl_atomic(puzzles, records)
    path = cello.prepare_model("tiny", str(tmp_path / "models"), records)
    calls, sample = [], cello.sample
    monkeypatch.setattr(cello, "sample", lambda model, prompts, *a, **k: calls.append(len(prompts)) or
                        sample(model, prompts, *a, **k))
    for batch_size, expected in (("6", [6, 6, 6, 2]), ("20", [20])):
        calls.clear()
        code, output = run([sys.executable, "distill.py", "--teacher", "model", "--model-path", path, "--puzzles",
                            puzzles, "--max-new-tokens", "2", "--batch-size", batch_size, "--out-dir",
                            str(tmp_path / f"out{batch_size}")], "unused", monkeypatch, capsys)
        assert calls == expected and code.startswith("distill.py: error: no sample was accepted"), output  # untrained


def test_model_teacher_self_distillation_plumbing(tmp_path, monkeypatch, capsys):
    """A tiny untrained checkpoint as the teacher: its k sampled responses are scored (all malformed,
    so nothing is accepted: no SFT file, and an error), with their token counts in samples.jsonl."""
    import torch

    torch.set_num_threads(1)
    puzzles = str(tmp_path / "puzzles.jsonl")
    records = toy_puzzles(3)
    cello.write_jsonl_atomic(puzzles, records)
    path = cello.prepare_model("tiny", str(tmp_path / "models"), records)
    out = tmp_path / "out"
    code, output = run([sys.executable, "distill.py", "--teacher", "model", "--model-path", path, "--puzzles",
                        puzzles, "--samples", "2", "--max-new-tokens", "5", "--out-dir", str(out)], "unused",
                       monkeypatch, capsys)
    assert code == f"distill.py: error: no sample was accepted, so no sft.jsonl was written; {out / 'samples.jsonl'} " \
                   "and report.json say why", output
    rows = cello.read_jsonl(out / "samples.jsonl")
    assert [(r["id"], r["sample"]) for r in rows] == [(r["id"], k) for r in records for k in range(2)]
    assert all(r["status"] == "rejected" and r["reward"] == -1.0 and 1 <= r["num_tokens"] <= 5 for r in rows)
    report = json.loads((out / "report.json").read_text())
    assert report["overall"]["rejected_malformed"] == 6 and report["sft_rows"] == 0
    assert report["metrics"]["mean_length"] == pytest.approx(sum(r["num_tokens"] for r in rows) / 6)
    assert not (out / "sft.jsonl").exists()  # an empty one would pass for a finished stage


def test_reasoning_model_requests_on_the_wire(setup, monkeypatch, capsys):
    """--api-model o3-mini: the server receives max_completion_tokens and never temperature, though given."""
    puzzles, key, serve, tmp = setup
    url, log_path = serve("server")
    cmd = distill_cmd(puzzles, str(tmp / "out"), url, "--yes", "--limit", "2", "--temperature", "0.5",
                      "--max-tokens", "300")
    cmd[cmd.index("toy-chat")] = "o3-mini"
    code, output = run(cmd, key, monkeypatch, capsys)
    assert code == 0, output
    assert "o3-mini gets the reasoning-model request format" in output
    log = read_log(log_path)
    assert {(line["id"], line["sample"]) for line in log} == {(r["id"], k) for r in cello.read_jsonl(puzzles)[:2]
                                                             for k in range(SAMPLES)}
    assert all(line["body_keys"] == ["max_completion_tokens", "messages", "model"] for line in log)


# ---- found by mutation testing: report counts, the cost gate, partial failures ----

def test_a_puzzle_whose_samples_all_failed_still_counts_as_a_puzzle():
    """puzzles counts every puzzle distilled; puzzle_acceptance = puzzles with an accepted sample / all."""
    rows = [{"id": "a", "status": "accepted", "reward": 1.0}, {"id": "b", "status": "failed", "reward": None}]
    a = distill.acceptance(rows)
    assert (a["puzzles"], a["puzzles_accepted"], a["puzzle_acceptance"]) == (2, 1, 0.5)


def test_a_free_run_needs_no_confirmation(monkeypatch, capsys):
    """An estimate of $0 (a local server, --price-input 0 --price-output 0) is sent without --yes."""
    respond = lambda records, k: None
    respond.pending = lambda records, k: {(0, 0), (1, 0)}
    args = argparse.Namespace(samples=1, est_output_tokens=2000, price_input=0.0, price_output=0.0, reasoning="no",
                              api_model="m", yes=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    distill.confirm_cost(args, toy_puzzles(2), respond)  # no SystemExit
    assert "2 requests to send" in capsys.readouterr().out


def test_keep_all_reports_every_sft_row(tmp_path, monkeypatch, capsys):
    """report.json's sft_rows is the number of rows in sft.jsonl, also with --keep-all."""
    code, output = run(expert_cmd(tmp_path, "--samples", "3", "--temperature", "2.0", "--keep-all"), "unused",
                       monkeypatch, capsys)
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = cello.read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert report["sft_rows"] == len(rows) == report["overall"]["accepted"] > report["overall"]["puzzles_accepted"]


# ---- found by mutation testing: which HTTP answers stop, which are retried, how fast a stop is ----

OK = {"choices": [{"message": {"content": "ok"}}]}


def test_insufficient_quota_in_the_error_type_alone_stops_the_run(tmp_path, monkeypatch):
    """A 429 whose error *type* (code absent) is insufficient_quota is no credit: fatal, not retried."""
    calls = []
    mock_server(monkeypatch, lambda request: calls.append(1) or httpx.Response(
        429, json={"error": {"message": "quota", "type": "insufficient_quota", "code": None}}))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), max_concurrency=1,
                                backoff_s=0, progress=False)
    with pytest.raises(api.ApiError) as info:
        respond(toy_puzzles(1), 1)
    assert info.value.fatal and len(calls) == 1


def test_status_300_is_a_redirect_that_stops_the_run(tmp_path, monkeypatch):
    """Every 3xx, 300 included, stops the run as a moved endpoint."""
    mock_server(monkeypatch, lambda request: httpx.Response(300, headers={"location": "https://x.test/v1"}))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), progress=False)
    with pytest.raises(api.ApiError, match="HTTP 300: redirected") as info:
        respond(toy_puzzles(1), 1)
    assert info.value.fatal


def test_a_fatal_error_wakes_a_worker_waiting_out_a_retry_after(tmp_path, monkeypatch):
    """A worker sleeping on Retry-After 20 s gives up at once when another gets a 401: the run stops fast."""
    def handler(request):
        if request.headers["X-Cello-Sample"] == "0":
            return httpx.Response(429, headers={"retry-after": "20"}, json={"error": {"message": "slow down"}})
        time.sleep(0.5)  # sample 0 is waiting out its Retry-After by now
        return httpx.Response(401, json={"error": {"message": "bad key"}})
    mock_server(monkeypatch, handler)
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), max_concurrency=2,
                                progress=False)
    start = time.monotonic()
    with pytest.raises(api.ApiError, match="HTTP 401"):
        respond(toy_puzzles(1), 2)
    assert time.monotonic() - start < 8


# ---- found by mutation testing (round 2): the report's run fields, an N whose samples all failed, the table,
# ---- the model teacher's default temperature ----

def test_report_names_the_run_and_keeps_an_n_whose_samples_all_failed(tmp_path, monkeypatch, capsys):
    """Only a run whose every sample failed stops; otherwise the answers received are distilled, and the
    report keeps the N whose samples all failed."""
    records = toy_puzzles(2)  # N = 2 and N = 3
    puzzles = str(tmp_path / "p.jsonl")
    cello.write_jsonl_atomic(puzzles, records)

    def respond(recs, k):
        return [[f"<think>x</think>\n<answer>{' | '.join(r['answer'])}</answer>"] * k for r in recs]
    respond.errors = {(records[0]["id"], 0): "HTTP 500", (records[0]["id"], 1): "HTTP 500"}
    respond.num_tokens, respond.pending, respond.usage = [[10, 10], [10, 10]], lambda recs, k: set(), None
    monkeypatch.setattr(distill, "make_teacher", lambda args, train: respond)
    code, output = run([sys.executable, "distill.py", "--teacher", "api", "--api-model", "m", "--puzzles", puzzles,
                        "--samples", "2", "--keep-all", "--out-dir", str(tmp_path / "out")], "unused", monkeypatch,
                       capsys)
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {k: report[k] for k in ("teacher", "teacher_model", "puzzles_file", "samples_per_puzzle", "keep")} == {
        "teacher": "api", "teacher_model": "m", "puzzles_file": puzzles, "samples_per_puzzle": 2, "keep": "all"}
    assert (report["overall"]["failed"], report["overall"]["accepted"], report["sft_rows"]) == (2, 2, 2)
    assert report["by_n"]["2"] == {"puzzles": 1, "samples": 2, "accepted": 0, "rejected": 0, "failed": 2,
                                   "rejected_malformed": 0, "sample_acceptance": 0.0, "puzzles_accepted": 0,
                                   "puzzle_acceptance": 0.0}
    assert "| 2 | 1 | 2 | 0 | 0 (0) | 2 | 0.0% | 0 (0.0%) |" in output


def test_acceptance_table_rows():
    a = {"puzzles": 2, "samples": 6, "accepted": 2, "rejected": 3, "failed": 1, "rejected_malformed": 1,
         "sample_acceptance": 2 / 6, "puzzles_accepted": 1, "puzzle_acceptance": 0.5}
    assert distill.format_acceptance({"by_n": {3: a}, "overall": a}).splitlines()[2:] == [
        "| 3 | 2 | 6 | 2 | 3 (1) | 1 | 33.3% | 1 (50.0%) |", "| all | 2 | 6 | 2 | 3 (1) | 1 | 33.3% | 1 (50.0%) |"]


def test_model_teacher_samples_at_temperature_1_unless_told(monkeypatch):
    seen = []
    monkeypatch.setattr(distill.responders, "make_responder", lambda name, **kw: seen.append(kw["temperature"]))
    args = argparse.Namespace(teacher="model", model_path="m", seed=0, temperature=None, batch_size=8,
                              max_new_tokens=16, device="cpu")
    distill.make_teacher(args, None)
    distill.make_teacher(argparse.Namespace(**{**vars(args), "temperature": 0.0}), None)
    assert seen == [1.0, 0.0]


@pytest.mark.parametrize("typed", ["y", "Y", "yes", " YES "])
def test_the_cost_prompt_takes_yes_in_any_case(monkeypatch, capsys, typed):
    respond = lambda records, k: None
    respond.pending = lambda records, k: {(0, 0)}
    args = argparse.Namespace(samples=1, est_output_tokens=2000, price_input=15.0, price_output=60.0,
                              reasoning="no", api_model="m", yes=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: typed)
    distill.confirm_cost(args, toy_puzzles(1), respond)  # no SystemExit
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    with pytest.raises(SystemExit, match="stopped before sending any request"):
        distill.confirm_cost(args, toy_puzzles(1), respond)


@pytest.mark.parametrize("model", ["O1", "OpenAI/O3-Mini", "GPT-5"])
def test_reasoning_model_names_are_matched_case_insensitively(model):
    assert api.is_reasoning_model(model)
    assert "temperature" not in api.request_body(model, [], temperature=0.7)


@pytest.mark.parametrize("status", [408, 409, 425])
def test_retryable_4xx_are_retried(tmp_path, monkeypatch, status):
    answers = iter([httpx.Response(status, text="again"), httpx.Response(200, json=OK)])
    mock_server(monkeypatch, lambda request: next(answers))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), backoff_s=0,
                                progress=False)
    assert respond(toy_puzzles(1), 1) == [["ok"]] and respond.usage["requests"] == 2


def test_a_negative_retry_after_is_no_wait():
    assert api.parse_retry_after("-5") == 0.0


def test_an_answer_without_usage_has_no_token_count(tmp_path, monkeypatch):
    """None, not 0: a length of 0 would pull eval's mean length down."""
    mock_server(monkeypatch, lambda request: httpx.Response(200, json=OK))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), progress=False)
    assert respond(toy_puzzles(1), 1) == [["ok"]] and respond.num_tokens == [[None]]


def test_a_base_url_with_a_trailing_slash(tmp_path, monkeypatch):
    paths = []
    mock_server(monkeypatch, lambda request: paths.append(request.url.path) or httpx.Response(200, json=OK))
    respond = api.api_responder("http://server.test/v1/", "m", "", str(tmp_path / "c.jsonl"), progress=False)
    assert respond(toy_puzzles(1), 1) == [["ok"]] and paths == ["/v1/chat/completions"]


def test_a_null_content_is_an_empty_answer_not_a_retry(tmp_path, monkeypatch):
    """A reasoning model that spent its whole budget thinking answers content null: that is its answer
    (scored malformed), not a broken body to pay for again."""
    body = {"choices": [{"message": {"content": None}, "finish_reason": "length"}]}
    mock_server(monkeypatch, lambda request: httpx.Response(200, json=body))
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), backoff_s=0,
                                progress=False)
    assert respond(toy_puzzles(1), 1) == [[""]]
    assert respond.usage["requests"] == 1 and respond.errors == {}


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_refused_request_is_marked_refused_and_asked_once(tmp_path, monkeypatch, status):
    mock_server(monkeypatch, lambda request: httpx.Response(status, text="prompt too long"))
    records = toy_puzzles(1)
    respond = api.api_responder("http://server.test/v1", "m", "", str(tmp_path / "c.jsonl"), backoff_s=0,
                                progress=False)
    assert respond(records, 1) == [[""]]
    assert respond.usage["requests"] == 1 and respond.refused == {(records[0]["id"], 0)}


def test_o1_mini_folding_keeps_the_later_messages():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    assert api.request_body("o1-mini", messages)["messages"] == [{"role": "user", "content": "S\n\nU"}, messages[2]]
