"""eval.py: score responders on a CellPuzzles file and print the paper's metrics.

Each responder (see responders.py) answers every puzzle; each response is scored with reward.score
(SPEC.md's format rule and reward). Prints one markdown table (a row per responder, then rows by N)
and writes, in --out-dir:
  predictions.jsonl  one line per response: responder, id, n, sample, response, answer, and the score
                     fields (valid, correct, reward, exact, uniqueness, num_tokens, error)
  summary.json       {responder: reward.metrics(...)} (with "pass_at_k" when --num-samples > 1)

A sample the api responder got no answer for (the server failed every attempt) is not scored: eval
stops with one line saying how many failed and writes nothing. The answers received stay in the
API cache, so a rerun asks only what is missing; --retry-failed also asks the failed ones again.
A sample the server refused outright (HTTP 400, 413 or 422: a prompt too long, a content filter, where
asking again cannot help) is scored as malformed and counted in summary.json's "refused".
A killed model evaluation, run again with the same command, goes on where it stopped: its rows so
far are kept, batch by batch, in OUT_DIR/.model-<hash>.partial.jsonl until the results are written.

Run (one process; the model responder uses cello's sampler on --device):
    python eval.py --puzzles test.jsonl --responder random independent expert --train train.jsonl --out-dir out/eval
    python eval.py --puzzles test.jsonl --responder model --model-path out/sft/final --out-dir out/eval_sft
    python eval.py --puzzles test.jsonl --responder api --base-url https://api.openai.com/v1 \\
        --api-model o1 --api-key-env OPENAI_API_KEY --out-dir out/eval_o1
"""
import argparse
import hashlib
import json
import os
import sys

from tqdm import tqdm

import api
import cello
import responders
import reward


def fail(message):
    """Bad input: one clear line on stderr, exit status 1, nothing written."""
    sys.exit(f"eval.py: error: {message}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Score responders on a puzzles JSONL file.",
                                     formatter_class=cello.HelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--puzzles", required=True, help="puzzles JSONL to answer (e.g. the test split)")
    io.add_argument("--out-dir", required=True, help="folder for predictions.jsonl and summary.json")
    io.add_argument("--limit", type=int, default=None, help="answer only the first this many puzzles (>= 1)")
    who = parser.add_argument_group("responders")
    who.add_argument("--responder", nargs="+", default=["expert"], help=f"one or more of {', '.join(responders.NAMES)}")
    who.add_argument("--train", help="train puzzles JSONL (independent and expert learn marker scores from it)")
    who.add_argument("--num-samples", type=int, default=1, help="responses per puzzle (k > 1 also reports pass@k)")
    who.add_argument("--temperature", type=float, default=None,
                     help="expert: Gumbel noise scale (default 0 = deterministic); model: sampling temperature "
                          "(default 0 = greedy); api: sent as given (default: none sent, the server's default; "
                          "never sent to reasoning models)")
    who.add_argument("--seed", type=int, default=0, help="seed of random, expert and model sampling (0 to 2^63 - 1)")
    model = parser.add_argument_group("model responder (a Hugging Face checkpoint folder)")
    model.add_argument("--model-path", help="checkpoint folder (config.json, weights, tokenizer)")
    model.add_argument("--batch-size", type=int, default=8, help="puzzles per responder call (and per sampler batch)")
    model.add_argument("--max-new-tokens", type=int, default=1024, help="response length limit in tokens")
    model.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    model.add_argument("--device", default=None,
                       help="torch device for the model responder (default: cuda when there is a GPU, else cpu)")
    api_flags = parser.add_argument_group("api responder (an OpenAI-compatible endpoint)")
    api_flags.add_argument("--base-url", help="endpoint base URL, e.g. https://api.openai.com/v1")
    api_flags.add_argument("--api-model", help="model name the endpoint serves")
    api_flags.add_argument("--api-key-env", default="OPENAI_API_KEY",
                           help="name of the environment variable holding the key ('' for none)")
    api_flags.add_argument("--api-cache", help="append-only response cache JSONL (default: OUT_DIR/api_cache.jsonl); "
                                               "keyed by model name, prompt and sampling settings, not by --base-url")
    api_flags.add_argument("--max-concurrency", type=int, default=8, help="concurrent API requests")
    api_flags.add_argument("--retry-failed", action="store_true",
                           help="ask again the samples cached as failed (default: cached failures are final)")
    args = parser.parse_args(argv)

    cello.check_ranges("eval.py", args, {
        "--limit": "an integer >= 1", "--num-samples": "an integer >= 1", "--batch-size": "an integer >= 1",
        "--max-new-tokens": "an integer >= 1", "--max-concurrency": "an integer >= 1",
        "--seed": "an integer in [0, 2^63)", "--temperature": "a number >= 0", "--top-p": "a number in (0, 1]"})

    for name in args.responder:
        if name not in responders.NAMES:
            fail(f"--responder: unknown responder {name!r} (expected one of {', '.join(responders.NAMES)})")
    if len(set(args.responder)) != len(args.responder):
        fail("--responder: a responder is named twice")
    cello.check_file(args.puzzles, "eval.py", "--puzzles", "a JSONL file of puzzle records")
    if args.num_samples > 1 and "independent" in args.responder:  # it has no temperature: always one answer
        fail(f"--num-samples {args.num_samples} gives independent {args.num_samples} copies of one deterministic "
             "answer at any temperature: evaluate it with --num-samples 1")
    repeated = [name for name in args.responder if name in ("expert", "model")]  # deterministic at temperature 0
    if args.num_samples > 1 and not args.temperature and repeated:
        fail(f"--num-samples {args.num_samples} at temperature 0 gives {', '.join(repeated)} {args.num_samples} copies "
             "of one deterministic answer: pass --temperature > 0 (or --num-samples 1)")
    needs_train = sorted({"independent", "expert"} & set(args.responder))
    if needs_train and not args.train:
        fail(f"--responder {' '.join(needs_train)} needs --train (train puzzles to learn marker scores from)")
    if args.train:
        cello.check_file(args.train, "eval.py", "--train", "a JSONL file of puzzle records")
    if "model" in args.responder:
        if not args.model_path:
            fail("--responder model needs --model-path (a checkpoint folder)")
        if not cello.is_model_folder(args.model_path):
            fail(f"--model-path: not a Hugging Face model folder (no config.json): {args.model_path}")
        args.device = cello.check_device(args.device, "eval.py")
    if "api" in args.responder and not (args.base_url and args.api_model):
        fail("--responder api needs --base-url and --api-model")
    return args


def build(name, args, train_records):
    """The responder called name, with this run's options."""
    local_temperature = args.temperature or 0.0  # eval's default for the local responders: deterministic
    if name in ("random", "independent", "expert"):
        return responders.make_responder(name, train_records=train_records, temperature=local_temperature,
                                         seed=args.seed)
    if name == "model":
        return responders.make_responder("model", path=args.model_path, batch_size=args.batch_size,
                                         max_new_tokens=args.max_new_tokens, temperature=local_temperature,
                                         top_p=args.top_p, device=args.device, seed=args.seed)
    try:
        return responders.make_responder("api", base_url=args.base_url, model=args.api_model,
                                         api_key_env=args.api_key_env, cache_path=api_cache(args),
                                         max_concurrency=args.max_concurrency, temperature=args.temperature,
                                         retry_failed=args.retry_failed)
    except ValueError as e:  # e.g. the key variable is unset (the message names the variable, never the key)
        fail(f"--responder api: {e}")


def api_cache(args):
    """The api responder's cache: --api-cache, else OUT_DIR/api_cache.jsonl."""
    return args.api_cache or api.default_cache_path(args.out_dir)


def check_answered(respond, total, args):
    """Exit with one line when the api responder got no answer for some samples: an outage is not the
    model's error, so eval reports it instead of scoring it (the answers received are in the cache).
    A sample the server refused outright (respond.refused: say, a prompt too long for the model) is
    scored as malformed instead, as asking again cannot help, unless it refused every sample: then
    the request itself is wrong (say, a setting this model does not take)."""
    errors = getattr(respond, "errors", {})
    refused = getattr(respond, "refused", set())
    unanswered = {key: error for key, error in errors.items() if key not in refused}
    if unanswered or len(refused) == total:
        (pid, k), error = min((unanswered or errors).items())
        first = " ".join(error.split())[:200]  # the server's text may span lines
        if unanswered:
            fail(f"--responder api: {len(unanswered)} of {total} samples failed (no answer from the server; first: "
                 f"{pid!r} sample {k}: {first}); the answers received are cached in {api_cache(args)}: rerun with "
                 "--retry-failed to ask the failed ones again")
        fail(f"--responder api: the server refused every sample (first: {pid!r} sample {k}: {first})")
    if refused:
        print(f"eval.py: api: the server refused {len(refused)} of {total} samples (first: "
              f"{' '.join(errors[min(refused)].split())[:200]}); they are scored as malformed")


def partial_path(args, records):
    """OUT_DIR/.model-<hash>.partial.jsonl: the model responder's rows so far, for a resumed run. The hash
    covers what the rows depend on (the puzzles, the checkpoint's files, the sampling settings), so a
    changed run starts afresh instead of mixing in stale rows. Greedy rows (no --temperature, or 0)
    do not depend on top-p, the seed or the batching, so a rerun with a smaller --batch-size (say,
    after running out of memory) keeps them."""
    sampling = [args.temperature, args.top_p, args.seed, args.batch_size] if args.temperature else "greedy"
    settings = [records, cello.model_fingerprint(args.model_path), args.max_new_tokens, args.num_samples, sampling]
    sha = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(args.out_dir, f".model-{sha}.partial.jsonl")


def load_partial(path):
    """{(id, sample): row} of a partial file; a line cut short by a kill is skipped (the last line of a key wins)."""
    rows = cello.read_jsonl(path, skip_broken=True) if os.path.exists(path) else []
    return {(row["id"], row["sample"]): row for row in rows}


def evaluate(respond, records, num_samples, batch_size, desc, resume_path=None):
    """Answer and score every puzzle; returns prediction rows (one per response) in puzzle order.
    A sample in respond.errors (the api responder got no answer) gets no row, as it is not the model's,
    unless it is in respond.refused (the server refused it outright): that one is scored as malformed.
    resume_path: each batch's rows are appended there (flushed and fsync'd) as they are scored, and a
    puzzle whose rows are all there is not asked again, so a killed run goes on where it stopped. Greedy
    rows come out the same; sampled ones are new draws, as the generator starts again at its seed."""
    done = load_partial(resume_path) if resume_path else {}
    if resume_path:
        cello.end_torn_line(resume_path)
    rows = []
    bar = tqdm(total=len(records), desc=desc, unit="puzzle", file=sys.stderr)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        # ask only the puzzles without all their rows in the resume file (a greedy rerun may batch differently)
        todo = [record for record in chunk if not all((record["id"], k) in done for k in range(num_samples))]
        fresh = {}  # (id, sample) -> row of this call's answers (a failed sample has none)
        if todo:
            texts = respond(todo, num_samples)
            lengths = getattr(respond, "num_tokens", None) or [[None] * num_samples for _ in todo]
            failed = getattr(respond, "errors", {})
            refused = getattr(respond, "refused", set())
            for record, samples, counts in zip(todo, texts, lengths):
                for k, (text, count) in enumerate(zip(samples, counts)):
                    key = (record["id"], k)
                    if key in failed and key not in refused:
                        continue
                    s = reward.score(text, record["answer"], num_tokens=count)
                    if key in refused:
                        s["error"] = f"refused by the server: {failed[key]}"
                    fresh[key] = {"id": record["id"], "sample": k, "response": text, "answer": record["answer"], **s}
            if resume_path:
                cello.append_jsonl(resume_path, fresh.values(), durable=True)
        asked = {record["id"] for record in todo}
        for record in chunk:
            for k in range(num_samples):
                key = (record["id"], k)
                if key in fresh:
                    rows.append(fresh[key])
                elif record["id"] not in asked:  # from the resume file, scored again so that a fix of the
                    row = done[key]              # reward reaches rows written before it
                    rows.append({**row, **reward.score(row["response"], record["answer"], num_tokens=row["num_tokens"])})
        bar.update(len(chunk))
    bar.close()
    return rows


def summarize(rows, num_samples):
    """reward.metrics over all responses, plus pass_at_k (share of puzzles with an exact sample) when k > 1."""
    m = reward.metrics(rows)
    if num_samples > 1:
        exact = {}
        for r in rows:
            exact[r["id"]] = exact.get(r["id"], False) or r["exact"]
        m["pass_at_k"] = sum(exact.values()) / len(exact)
        m["k"] = num_samples
    return m


def main(argv=None):
    args = parse_args(argv)
    cello.refuse_torchrun("eval.py")
    records = cello.read_puzzles(args.puzzles, "--puzzles", "eval.py")[:args.limit]
    cello.check_unique_ids(records, "--puzzles", args.puzzles, "eval.py")
    train_records = cello.read_puzzles(args.train, "--train", "eval.py") if args.train else None
    cello.make_out_dir(args.out_dir, "eval.py")
    print(f"eval.py: {len(records)} puzzles from {args.puzzles}, {args.num_samples} sample(s) each")

    predictions, summary = [], {}
    model_partial = partial_path(args, records) if "model" in args.responder else None  # the api has its own cache
    for name in args.responder:
        respond = build(name, args, train_records)
        # the api responder runs its own concurrent requests (and progress bar): give it every puzzle at once
        per_call = len(records) if name == "api" else args.batch_size
        try:
            rows = evaluate(respond, records, args.num_samples, per_call, name, model_partial if name == "model" else None)
        except api.ApiError as e:  # wrong key, URL or model: every request would fail the same way
            fail(f"--responder api: {e}")
        check_answered(respond, len(records) * args.num_samples, args)
        predictions += [{"responder": name, **r} for r in rows]
        summary[name] = summarize(rows, args.num_samples)
        if getattr(respond, "usage", None):
            summary[name]["usage"] = dict(respond.usage)
            summary[name]["refused"] = len(respond.refused)

    table = {name: m for name, m in summary.items()}
    for name, m in summary.items():
        for n, mn in m["by_n"].items():
            table[f"{name}, N={n}"] = mn
    print(reward.format_table(table))
    for name, m in summary.items():
        if "pass_at_k" in m:
            print(f"{name}: pass@{m['k']} (share of puzzles with a fully correct sample) = {100 * m['pass_at_k']:.1f}%")
    cello.write_jsonl_atomic(os.path.join(args.out_dir, "predictions.jsonl"), predictions)
    cello.write_json_atomic(os.path.join(args.out_dir, "summary.json"), summary)
    if model_partial:  # this run's rows are whole now; another run's partial rows stay
        os.remove(model_partial)
    print(f"eval.py: wrote {args.out_dir}/predictions.jsonl and summary.json")


if __name__ == "__main__":
    cello.run_script(main, "eval.py", "the same command continues: the model's and the api's answers so far "
                                      "are kept and not asked again")
