"""A chat-completions server on 127.0.0.1 for tests: right, wrong and malformed answers, and faults.

It reads the test's puzzle file, so it finds the puzzle from the user message and answers with the
gold labels (accepted), two labels swapped (rejected) or no <think> block (rejected as malformed),
chosen per (puzzle id, sample index) by a hash: the same sample always gets the same answer.

Faults are chosen per (puzzle id, sample index, attempt) by a hash, attempt being the server's own
count of requests for that sample (so it continues across a killed and restarted client):
  - "doomed" samples (about 10%) get HTTP 500 on every attempt: they must end failed-after-retries;
  - other samples get a fault on attempts 1 and 2 with probability 0.3 each, never on attempt 3+,
    so a client with max_attempts >= 3 always gets their answer.
Fault kinds: 429 with Retry-After 0.1, 500 (whose body echoes the API key, as some servers echo a
wrong one), a response slower than the client's timeout, malformed JSON, a cut-off body
(Content-Length larger than what is sent, then close). A wrong key gets 401 echoing the key.

Every request is logged as one JSON line: id, sample (from the X-Cello-Puzzle / X-Cello-Sample
headers), prompt_id (the puzzle found from the user message), attempt, outcome, and the body's keys.
"""
import hashlib
import http.server
import json
import threading
import time
import urllib.parse

import cello

FAULTS = ("429", "500", "slow", "badjson", "cutoff")


def bucket(*parts):
    """A stable number in [0, 100) from the parts."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16) % 100


def doomed(pid, k):
    return bucket("doomed", pid, k) < 10


def outcome(pid, k, attempt):
    """What the server does with this request: "ok" or one of FAULTS."""
    if doomed(pid, k):
        return "500"
    if attempt <= 2 and bucket("fault", pid, k, attempt) < 30:
        return FAULTS[bucket("kind", pid, k, attempt) % len(FAULTS)]
    return "ok"


def answer_kind(pid, k):
    """"right" (60%), "wrong" (30%) or "malformed" (10%) for a sample."""
    b = bucket("answer", pid, k)
    return "right" if b < 60 else "wrong" if b < 90 else "malformed"


def expected_status(pid, k):
    """How the client must classify this sample: accepted, rejected or failed."""
    if doomed(pid, k):
        return "failed"
    return "accepted" if answer_kind(pid, k) == "right" else "rejected"


def content_for(record, k):
    labels = list(record["answer"])
    kind = answer_kind(record["id"], k)
    if kind == "wrong":
        labels[0], labels[1] = labels[1], labels[0]
    answer = "<answer>" + " | ".join(labels) + "</answer>"
    return answer if kind == "malformed" else f"<think>Sample {k}: reading the markers.</think>\n{answer}"


def start(puzzles_path, key, log_path, slow_s=1.5, ok_delay_s=0.02):
    """Serve on a free port in a daemon thread; returns (server, base_url). server.shutdown() stops it."""
    by_user = {cello.render_user(r): r for r in cello.read_jsonl(puzzles_path)}
    attempts, lock = {}, threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep the test output quiet
            pass

        def send(self, status, payload, headers=(), declared=None, cut=False):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(declared or len(data)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            try:
                self.wfile.write(data[:len(data) // 2] if cut else data)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (slow answers)
                pass
            if cut:
                self.close_connection = True

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
            record = by_user[user]
            pid, k = urllib.parse.unquote(self.headers["X-Cello-Puzzle"]), int(self.headers["X-Cello-Sample"])
            given_key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            with lock:
                attempt = attempts[(pid, k)] = attempts.get((pid, k), 0) + 1
                what = "401" if given_key != key else outcome(pid, k, attempt)
                with open(log_path, "a") as f:
                    f.write(json.dumps({"id": pid, "sample": k, "prompt_id": record["id"], "attempt": attempt,
                                        "outcome": what, "body_keys": sorted(body)}) + "\n")
            if what == "401":
                self.send(401, {"error": {"message": f"Incorrect API key provided: {given_key}"}})
            elif what == "429":
                self.send(429, {"error": {"message": "rate limited"}}, headers=[("Retry-After", "0.1")])
            elif what == "500":
                self.send(500, {"error": {"message": f"internal error while serving key {given_key}"}})
            elif what == "badjson":
                self.send(200, b'{"choices": [{"message": {"content": "<think>')
            else:
                if what == "slow":
                    time.sleep(slow_s)
                time.sleep(ok_delay_s)
                content = content_for(record, k)
                payload = {"object": "chat.completion",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": len(content) // 4}}
                data = json.dumps(payload).encode()
                self.send(200, data, declared=len(data) + 100 if what == "cutoff" else None, cut=what == "cutoff")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
