"""api.py: an OpenAI-compatible chat-completions client (httpx, no SDK) as a responder with a cache.

Any server that speaks POST {base_url}/chat/completions works: OpenAI (o1, o3, o4-mini, gpt-5, gpt-4o),
vLLM (`vllm serve MODEL` -> http://localhost:8000/v1), Ollama (http://localhost:11434/v1), OpenRouter.
A library for distill.py and eval.py (through responders.make_responder("api", ...)):

    respond = api.api_responder("https://api.openai.com/v1", "o1", "OPENAI_API_KEY", "out/api_cache.jsonl")
    texts = respond(records, 4)      # [puzzle][sample] response texts; "" for a sample that failed
    respond.usage                    # summed token counts and request counts
    respond.num_tokens               # [puzzle][sample] completion tokens of the last call
    respond.errors                   # {(puzzle id, sample index): error text} of the failed samples

One request per sample (sample k of puzzle p), max_concurrency requests in flight (threads sharing one
httpx.Client). A request is retried with exponential backoff and jitter on 408, 409, 425, 429, 5xx, timeouts,
connection errors and broken or malformed bodies, honouring Retry-After (or retry-after-ms); after
max_attempts the sample is recorded as failed (with its error), not lost, and the run goes on.
401/403/404 (wrong key, URL or model), 402 or OpenAI's 429 "insufficient_quota" (no credit) and
redirects (3xx: a moved endpoint; give its new URL) stop the run: every other request would fail the
same way. A base URL that is not http(s) is refused up front. Other 4xx fail that sample at once, as
retrying cannot help; 400, 413 and 422 (say, a prompt too long or a content filter) mark it refused:
that request is refused, not the server down.

The cache is an append-only JSONL file, one line per finished sample (ok or failed), flushed and
fsync'd, keyed by (puzzle id, sample index, model) plus a hash of the prompt and of the sampling
settings sent (temperature, token limit, reasoning effort), so an edited puzzle or changed settings
are asked again. Not keyed by base_url: the same model name on another server reuses the answers (give
that run its own cache). A restarted run loads it and sends no request for a sample it already has.
Cached failures are final by default, so a rerun costs nothing and gives the same result;
retry_failed=True asks those samples again (the new line wins). Its folder is created up front.

The API key is read from the environment variable named by api_key_env (none for local servers when
api_key_env is empty). It is sent in the Authorization header only and redacted from every error text this
module writes or raises (the cache's errors, messages), as servers echo it back in errors (OpenAI's
401 does). An answer's content is stored as it came: the key is not in the prompt, and rewriting
an answer (a dummy key such as "x" for a local server is in many) would change its reward.
"""
import concurrent.futures
import email.utils
import hashlib
import json
import os
import random
import re
import threading
import time
import urllib.parse

import httpx
from tqdm import tqdm

import cello

# o1, o1-mini, o3, o3-mini, o4-mini, gpt-5, gpt-5-mini, ...: reasoning models. They refuse temperature
# (and top_p) and take max_completion_tokens (which also counts the hidden reasoning tokens).
REASONING_NAME = re.compile(r"^(o\d+)(-|$)|^gpt-5")
# The first reasoning models refuse a system message: its text goes in front of the user message.
NO_SYSTEM_NAME = re.compile(r"^o1-(mini|preview)")
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
FATAL_STATUS = {401, 402, 403, 404}  # wrong key, URL or model, or no credit left: stop the run (so does a 3xx)
REFUSED_STATUS = {400, 413, 422}     # this request refused (too long, filtered): asking again gets the same


def _base_name(model):
    """'openai/o1-mini' -> 'o1-mini': providers such as OpenRouter prefix the vendor."""
    return model.rsplit("/", 1)[-1].lower()


def is_reasoning_model(model):
    """True for o1/o3/o4-style and gpt-5 names (with or without a 'vendor/' prefix)."""
    return bool(REASONING_NAME.match(_base_name(model)))


def request_body(model, messages, temperature=None, max_tokens=None, reasoning=None, reasoning_effort=None):
    """The JSON body of one chat-completions request.

    reasoning: True/False, or None to decide from the model name (is_reasoning_model).
      chat model:      temperature and max_tokens are sent when given (None = the server's default).
      reasoning model: temperature is never sent (refused); max_tokens goes as max_completion_tokens;
                       reasoning_effort ("low" | "medium" | "high") is sent when given; o1-mini and
                       o1-preview get the system text folded into the user message (they refuse "system").
    """
    reasoning = is_reasoning_model(model) if reasoning is None else reasoning
    body = {"model": model, "messages": messages}
    if not reasoning:
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body
    if NO_SYSTEM_NAME.match(_base_name(model)) and messages and messages[0]["role"] == "system":
        system, user = messages[0], messages[1]
        body["messages"] = [{"role": "user", "content": system["content"] + "\n\n" + user["content"]}] + messages[2:]
    if max_tokens is not None:
        body["max_completion_tokens"] = max_tokens
    if reasoning_effort is not None:
        body["reasoning_effort"] = reasoning_effort
    return body


def parse_retry_after(value):
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt, retry_after=None, base_s=1.0, max_s=60.0, rng=random):
    """Seconds to wait before retry number `attempt` (1 = the first retry).

    With a Retry-After from the server: exactly that, capped at max_s.
    Else exponential with "equal jitter": d = min(max_s, base_s * 2 ** (attempt - 1)), wait in [d/2, d]
    (uniform), so concurrent clients that failed together do not retry together, yet each waits at
    least half the schedule.
    """
    if retry_after is not None:
        return min(retry_after, max_s)
    d = min(max_s, base_s * 2 ** (attempt - 1))
    return d / 2 + rng.uniform(0, d / 2)


def redact(text, secret):
    """text with every occurrence of secret replaced by '[REDACTED]' (unchanged when there is no secret)."""
    return text.replace(secret, "[REDACTED]") if secret else text


def prompt_hash(messages, settings=None):
    """A short hash of the chat messages and of the sampling settings sent with them (see
    sampling_settings): a cached answer is reused only for the same request. With no settings (the
    server's defaults) it hashes the messages alone, as caches written before settings counted did,
    so those caches stay valid."""
    key = [messages, settings] if settings else messages
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def sampling_settings(model, temperature=None, max_tokens=None, reasoning=None, reasoning_effort=None):
    """What request_body sends besides the model and the messages: {} for the server's defaults.
    A setting the model never gets (temperature for a reasoning model) is not in it."""
    body = request_body(model, [], temperature, max_tokens, reasoning, reasoning_effort)
    return {key: value for key, value in body.items() if key not in ("model", "messages")}


def default_cache_path(out_dir):
    """Where a run keeps its api answers unless told otherwise (eval.py --api-cache, distill.py --api-cache)."""
    return os.path.join(out_dir, "api_cache.jsonl")


def load_cache(path):
    """{(id, sample, model, prompt_sha): entry} from a cache JSONL file; the last line of a key wins.
    prompt_sha (the prompt and the sampling settings) is part of the key, so answers to other settings
    stay usable: switching settings back does not ask (and pay) again.

    A line cut short by a kill (the only way a line can be broken: each is written whole, then fsync'd)
    is skipped, and a newline is appended so the next line starts clean. Raises ValueError on a whole
    JSON line that is not a cache entry (a puzzles file given as the cache), before anything is appended.
    """
    cache = {}
    if not os.path.exists(path):
        return cache
    with open(path, "rb") as f:  # line by line: a paper-scale cache (80k samples) can be large
        for number, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            try:
                cache[cache_key(entry)] = entry
            except (KeyError, TypeError):
                raise ValueError(f"the cache {path} line {number} is not an API cache entry (no id, sample and "
                                 "model): give the cache a file of its own") from None
    cello.end_torn_line(path)
    return cache


def cache_key(entry):
    """The key of a cache entry: (id, sample, model, prompt_sha); None for an entry written before
    prompts were hashed, which no request matches."""
    return entry["id"], entry["sample"], entry["model"], entry.get("prompt_sha")


def pending(records, num_samples, model, cache, retry_failed=False, settings=None):
    """The (record index, sample index) pairs that need a request: no cache entry for the same prompt
    and settings (or, with retry_failed, a cached failure). cache: load_cache's dict; settings:
    sampling_settings' dict."""
    todo = set()
    for i, record in enumerate(records):
        sha = prompt_hash(cello.render_messages(record), settings)
        for k in range(num_samples):
            entry = cache.get((record["id"], k, model, sha))
            if not entry or (retry_failed and not entry["ok"]):
                todo.add((i, k))
    return todo


class ApiError(Exception):
    """One failed request: retryable (with the server's Retry-After, if any) or not; fatal stops the run."""

    def __init__(self, message, retryable, retry_after=None, fatal=False, refused=False):
        super().__init__(message)
        self.retryable, self.retry_after, self.fatal, self.refused = retryable, retry_after, fatal, refused


def server_text(response, secret, limit):
    """The server's answer for an error message: redacted, on one line (an HTML error page spans many),
    cut to limit characters."""
    return " ".join(redact(response.text, secret).split())[:limit]


def quota_exhausted(response):
    """True for OpenAI's 429 whose error code or type is "insufficient_quota" (no credit left), not a rate limit."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and "insufficient_quota" in (error.get("code"), error.get("type"))


def post_once(client, url, headers, body, secret=None):
    """Send one request; return (content, usage, finish_reason) or raise ApiError.
    The server's text in an error is redacted (secret) before it is cut short: a key straddling the cut
    would otherwise survive in part."""
    try:
        response = client.post(url, headers=headers, json=body)
    except httpx.TimeoutException as exc:
        raise ApiError(f"timeout ({type(exc).__name__})", retryable=True) from None
    except httpx.TransportError as exc:  # refused connection, reset, body cut short (RemoteProtocolError)
        raise ApiError(f"connection error ({type(exc).__name__}: {exc})", retryable=True) from None
    except httpx.DecodingError as exc:  # a body that its Content-Encoding does not decode: like a malformed one
        raise ApiError(f"undecodable body ({exc})", retryable=True) from None
    status = response.status_code
    if 300 <= status < 400:  # a moved endpoint: every request would be redirected the same way
        raise ApiError(f"HTTP {status}: redirected to {response.headers.get('location')!r}; give that URL as the "
                       "base URL", retryable=False, fatal=True)
    if status != 200:
        message = f"HTTP {status}: {server_text(response, secret, 300)}"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        milliseconds = parse_retry_after(response.headers.get("retry-after-ms"))  # OpenAI's finer variant
        if milliseconds is not None:
            retry_after = milliseconds / 1000
        if status == 429 and quota_exhausted(response):  # OpenAI's "no credit": as 402, asking again never helps
            raise ApiError(message, retryable=False, fatal=True)
        if status in RETRY_STATUS or status >= 500:
            raise ApiError(message, retryable=True, retry_after=retry_after)
        raise ApiError(message, retryable=False, fatal=status in FATAL_STATUS, refused=status in REFUSED_STATUS)
    try:
        data = response.json()
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""  # null content (say, all budget spent thinking) = ""
        if not isinstance(content, str):
            raise TypeError(f"content is {type(content).__name__}")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ApiError(f"malformed body ({type(exc).__name__}: {exc}): {server_text(response, secret, 200)}",
                       retryable=True) from None
    # a lone UTF-16 surrogate ("\\ud83d", valid JSON) cannot be written as UTF-8: it becomes "?", so the
    # paid answer can be cached
    content = content.encode("utf-8", "replace").decode("utf-8")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    try:  # usage is only counted: an odd value must not lose an answer already paid for
        usage = {key: int(usage.get(key) or 0) for key in ("prompt_tokens", "completion_tokens")}
    except (ValueError, TypeError):
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
    return content, usage, choice.get("finish_reason")


def chat_url(base_url):
    """(the chat-completions URL, the same URL without user:password@ for messages), or ValueError when
    base_url is not an http(s) URL with a host: else every request would fail as a "connection error",
    be retried and be cached as failed."""
    try:
        parsed = urllib.parse.urlsplit(base_url)
        parsed.port  # raises ValueError for a port that is not a number
        valid_url = parsed.scheme in ("http", "https") and bool(parsed.hostname)
    except ValueError:  # also an unclosed [IPv6 address
        valid_url = False
    if not valid_url:
        shown = f" {base_url!r}" if "/" in base_url or "." in base_url else ""  # not a key pasted in its place
        raise ValueError(f"base URL{shown} is not an http(s) URL with a host (e.g. https://api.openai.com/v1)")
    url = base_url.rstrip("/") + "/chat/completions"
    return url, url.replace(parsed.netloc, parsed.netloc.rpartition("@")[2], 1)


def read_api_key(api_key_env):
    """The key in environment variable api_key_env (None when api_key_env is "" or None: local servers),
    or ValueError naming the variable, never showing the key (nor a key pasted in place of the name)."""
    if not api_key_env:
        return None
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):  # not echoed: it may be a key
        raise ValueError("the API key variable must be the NAME of an environment variable (such as "
                         "OPENAI_API_KEY), not the key itself")
    secret = (os.environ.get(api_key_env) or "").strip()  # a key pasted from a file often ends in "\n"
    if not secret:
        if not api_key_env.isupper() and len(api_key_env) > 20:  # a key pasted in place of the name (gsk_...)
            raise ValueError("the API key variable names no set environment variable, and its name is not "
                             "shown as it looks like a key: give the NAME of the variable that holds the key")
        raise ValueError(f"environment variable {api_key_env} is not set (it should hold the API key)")
    if not all(33 <= ord(c) < 127 for c in secret):  # else httpx's error would quote the header, key and all
        raise ValueError(f"environment variable {api_key_env} holds characters an HTTP header cannot carry")
    return secret


def api_responder(base_url, model, api_key_env, cache_path, max_concurrency=8, timeout_s=600.0, max_attempts=6,
                  temperature=None, max_tokens=None, reasoning=None, reasoning_effort=None, retry_failed=False,
                  backoff_s=1.0, progress=True):
    """A respond(records, num_samples) -> [puzzle][sample] texts that asks a chat-completions endpoint.

    base_url      e.g. https://api.openai.com/v1 (requests go to {base_url}/chat/completions)
    api_key_env   name of the environment variable holding the key; "" or None for no key (local servers)
    cache_path    the append-only JSONL cache (see the module docstring)
    timeout_s     per-request timeout (connect, read and write, each) in seconds
    max_attempts  requests per sample before it is recorded as failed
    temperature, max_tokens, reasoning, reasoning_effort: see request_body (None = server default)
    backoff_s: the first backoff in seconds (see backoff_delay)

    respond.usage sums over every call: prompt_tokens and completion_tokens of the samples returned
    (cached ones included: that is what the data set cost), requests (HTTP requests sent by this
    process), cached (samples served from the cache), failed (samples returned as failed).
    respond.errors maps (puzzle id, sample index) to the error of each failed sample returned;
    respond.refused holds those of them the server refused outright (HTTP 400, 413 or 422, such as a
    prompt too long or a content filter): asking again gives the same answer.
    respond.num_tokens holds the last call's completion token counts [puzzle][sample] (as the model
    responder's; reasoning tokens included; None for a failed sample or a server without usage).
    respond.pending(records, num_samples) is the set of (record index, sample index) a call would ask.
    Raises ValueError when base_url is not an http(s) URL, api_key_env is not a variable name or the
    variable is unset, or the cache cannot be written (all before any request), ApiError on a fatal
    answer (401/402/403/404, a 429 for no credit, or a redirect).
    """
    url, url_shown = chat_url(base_url)
    secret = read_api_key(api_key_env)
    try:  # before any request: an answer that cannot be saved is paid for and lost
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        open(cache_path, "a").close()
    except OSError as exc:
        raise ValueError(f"cannot write the cache {cache_path} ({exc.strerror}: {exc.filename})") from None
    cache = load_cache(cache_path)
    settings = sampling_settings(model, temperature, max_tokens, reasoning, reasoning_effort)
    lock = threading.Lock()  # guards the cache file, the cache dict and the counters
    stop = threading.Event()  # set on a fatal error: the other workers give up
    client = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=max_concurrency))

    def save(entry):  # its error is redacted already (fetch)
        with lock:
            cello.append_jsonl(cache_path, [entry], durable=True)
            cache[cache_key(entry)] = entry

    def fetch(record, k, messages):
        """Ask for sample k of one puzzle until it succeeds, fails for good, or attempts run out."""
        body = request_body(model, messages, temperature, max_tokens, reasoning, reasoning_effort)
        headers = {"X-Cello-Puzzle": urllib.parse.quote(record["id"]), "X-Cello-Sample": str(k)}
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        entry = {"id": record["id"], "sample": k, "model": model, "prompt_sha": prompt_hash(messages, settings)}
        for attempt in range(1, max_attempts + 1):
            if stop.is_set():
                return None
            with lock:
                respond.usage["requests"] += 1
            try:
                content, usage, finish_reason = post_once(client, url, headers, body, secret)
            except ApiError as exc:
                error = redact(str(exc), secret)
                if exc.fatal:
                    stop.set()
                    raise ApiError(redact(f"{url_shown}: {exc}", secret), retryable=False, fatal=True) from None
                if stop.is_set():  # the run is stopping: no failure of ours goes in the cache
                    return None
                if not exc.retryable or attempt == max_attempts:
                    entry.update(ok=False, content=None, usage=None, attempts=attempt, error=error,
                                 refused=exc.refused)
                    save(entry)
                    return entry
                stop.wait(backoff_delay(attempt, exc.retry_after, backoff_s))  # sleep, unless stopped
                continue
            entry.update(ok=True, content=content, usage=usage, finish_reason=finish_reason, attempts=attempt,
                         error=None)
            save(entry)
            return entry

    def respond(records, num_samples):
        if len({r["id"] for r in records}) != len(records):
            raise ValueError("api: puzzle ids must be unique (they key the cache)")
        results = [[None] * num_samples for _ in records]
        todo = respond.pending(records, num_samples)
        for i, record in enumerate(records):
            sha = prompt_hash(cello.render_messages(record), settings)
            for k in range(num_samples):
                if (i, k) not in todo:
                    results[i][k] = cache[(record["id"], k, model, sha)]
                    respond.usage["cached"] += 1
        with concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency) as pool:
            futures = {pool.submit(fetch, records[i], k, cello.render_messages(records[i])): (i, k)
                       for i, k in sorted(todo)}
            try:
                for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                                   desc=f"api {model}", unit="sample", disable=not progress or not futures):
                    i, k = futures[future]
                    results[i][k] = future.result()  # a fatal ApiError surfaces here
            except BaseException:  # a fatal answer or Ctrl-C: the other workers stop before their next attempt
                # (a request in flight still ends, and its answer, already paid for, is cached)
                stop.set()
                pool.shutdown(cancel_futures=True)
                raise
        texts, respond.num_tokens = [], []
        for record, entries in zip(records, results):
            texts.append([])
            respond.num_tokens.append([])
            for k, entry in enumerate(entries):
                if entry["ok"]:
                    respond.usage["prompt_tokens"] += entry["usage"]["prompt_tokens"]
                    respond.usage["completion_tokens"] += entry["usage"]["completion_tokens"]
                    texts[-1].append(entry["content"])
                    respond.num_tokens[-1].append(entry["usage"]["completion_tokens"] or None)
                else:
                    respond.usage["failed"] += 1
                    respond.errors[(record["id"], k)] = entry["error"]
                    if entry.get("refused"):
                        respond.refused.add((record["id"], k))
                    texts[-1].append("")
                    respond.num_tokens[-1].append(None)
        return texts

    respond.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cached": 0, "failed": 0}
    respond.errors, respond.refused, respond.num_tokens = {}, set(), []
    respond.pending = lambda records, num_samples: pending(records, num_samples, model, cache, retry_failed, settings)
    return respond
