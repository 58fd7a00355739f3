"""distill.py: rejection sampling from a teacher into an SFT file (Cell-o1's distillation step).

For each puzzle, ask a teacher for k responses, score each with reward.score, and accept those with
reward == 1.0 (well formed and every cell right). Cell-o1 did this with o1, k = 8: 38.5% of puzzles kept.
Writes, in --out-dir:
  sft.jsonl      the puzzle records plus "response": by default the first accepted response of each
                 puzzle (--keep-all for every accepted one; see --keep-all's help for why not by default)
  samples.jsonl  one line per sample: id, sample, n, status (accepted | rejected | failed), reward,
                 num_tokens, error
  report.json    acceptance by N and overall (samples, and puzzles with >= 1 accepted), failures, tokens
and prints the acceptance table. All three are written atomically at the end, sft.jsonl last; when no
sample is accepted there is no sft.jsonl, and the run ends with an error.

Teachers (all responders, as in eval.py):
  expert  the marker-gene agent (responders.py), offline; needs --train for its marker profile;
          --temperature > 0 makes its k samples differ.
  api     any OpenAI-compatible endpoint (api.py): OpenAI o1/o3/gpt-*, vLLM, Ollama. Every answer is
          cached in --out-dir/api_cache.jsonl as it arrives, so a killed run restarted with the same
          command sends no request it already has an answer for (reruns are free). The estimated cost
          is printed first and confirmed (or --yes). A sample whose every attempt failed is cached as
          failed (rerun with --retry-failed to ask again); when every sample failed (server down,
          wrong URL) the run stops with one line and writes none of the three files.
  model   a local checkpoint folder through cello's sampler (self-distillation: a trained student
          teaches its next version).
Only the api teacher resumes (through its cache): an expert run takes seconds and is simply redone;
a model-teacher run is redone too (its sampling is seeded, so it gives the same file).

Run (one process; no torchrun):
    python distill.py --teacher expert --train train.jsonl --puzzles train.jsonl --samples 4 --out-dir runs/distill
    OPENAI_API_KEY=... python distill.py --teacher api --api-model o1 --puzzles train.jsonl --samples 8 \\
        --out-dir runs/distill-o1
    python distill.py --teacher api --base-url http://localhost:8000/v1 --api-model Qwen/Qwen2.5-72B-Instruct \\
        --api-key-env "" --price-input 0 --price-output 0 --puzzles train.jsonl --out-dir runs/distill-vllm
    python distill.py --teacher model --model-path runs/grpo/final --puzzles train.jsonl --out-dir runs/self
"""
import argparse
import os
import sys

from tqdm import tqdm

import api
import cello
import responders
import reward

CHARS_PER_TOKEN = 2.5  # gene symbols split into several tokens each: a deliberately high token estimate
CHUNK = 16             # puzzles per call for the offline teachers (one progress step each)


def estimate_cost(records, todo, est_output_tokens, price_input, price_output):
    """(prompt tokens, output tokens, USD) for the (record, sample) pairs in todo.

    prompt tokens = characters of the messages / CHARS_PER_TOKEN; output = est_output_tokens per sample
    (reasoning tokens are billed as output); prices in USD per 1M tokens.
    """
    prompt = sum(sum(len(m["content"]) for m in cello.render_messages(records[i])) for i, _ in todo)
    prompt_tokens = int(prompt / CHARS_PER_TOKEN)
    output_tokens = est_output_tokens * len(todo)
    return prompt_tokens, output_tokens, (prompt_tokens * price_input + output_tokens * price_output) / 1e6


def confirm_cost(args, records, respond):
    """Print what the api teacher respond will send and cost; ask (or require --yes) before spending money."""
    todo = respond.pending(records, args.samples)
    prompt_tokens, output_tokens, usd = estimate_cost(records, todo, args.est_output_tokens, args.price_input,
                                                      args.price_output)
    cached = len(records) * args.samples - len(todo)
    reasoning = {"auto": api.is_reasoning_model(args.api_model), "yes": True, "no": False}[args.reasoning]
    if reasoning:
        print(f"api: {args.api_model} gets the reasoning-model request format (no temperature; "
              "max_completion_tokens, which counts its hidden thinking)")
    print(f"api: {len(todo)} requests to send ({cached} samples already cached), about {prompt_tokens:,} prompt + "
          f"{output_tokens:,} output tokens, estimated ${usd:,.2f} at ${args.price_input}/"
          f"${args.price_output} per 1M tokens")
    if not todo or usd == 0 or args.yes:
        return
    if not sys.stdin.isatty():
        sys.exit("distill.py: error: stdin is not a terminal, so the cost cannot be confirmed: pass --yes")
    try:
        answer = input("Send these requests? [y/N] ")
    except EOFError:  # Ctrl-D: no
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        sys.exit("distill.py: stopped before sending any request")


def check_teacher_flags(args):
    """Exit with one line when the teacher lacks a flag it needs (before any folder is made)."""
    if args.teacher == "expert" and not args.train:
        sys.exit("distill.py: error: --teacher expert needs --train (puzzles to learn marker scores from)")
    if args.teacher == "model":
        if not args.model_path:
            sys.exit("distill.py: error: --teacher model needs --model-path (a checkpoint folder)")
        if not cello.is_model_folder(args.model_path):
            sys.exit(f"distill.py: error: --model-path {args.model_path}: not a Hugging Face model folder "
                     "(no config.json)")
        args.device = cello.check_device(args.device, "distill.py")
    if args.teacher == "api" and not args.api_model:
        sys.exit("distill.py: error: --teacher api needs --api-model (the served model's name)")


def make_teacher(args, train):
    """The teacher's respond(records, num_samples) function, built from the flags (check_teacher_flags
    first); train: the expert's train puzzles."""
    if args.teacher == "expert":
        return responders.make_responder("expert", train_records=train,
                                         temperature=args.temperature, seed=args.seed)
    if args.teacher == "model":
        return responders.make_responder("model", path=args.model_path, seed=args.seed,
                                         temperature=1.0 if args.temperature is None else args.temperature,
                                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                         device=args.device)
    try:
        return responders.make_responder(
            "api", temperature=args.temperature, base_url=args.base_url, model=args.api_model,
            api_key_env=args.api_key_env, cache_path=args.cache, max_concurrency=args.max_concurrency,
            timeout_s=args.timeout, max_attempts=args.max_attempts, max_tokens=args.max_tokens,
            reasoning={"auto": None, "yes": True, "no": False}[args.reasoning],
            reasoning_effort=args.reasoning_effort, retry_failed=args.retry_failed, backoff_s=args.backoff)
    except ValueError as exc:  # key variable unset or cache unwritable: the message never holds the key
        sys.exit(f"distill.py: error: {exc}")


def ask_teacher(respond, records, num_samples, teacher, batch_size):
    """(responses [puzzle][sample], token counts [puzzle][sample] or None) from the teacher.

    The api teacher gets every puzzle at once (its own progress bar, max concurrency); the offline
    teachers get about CHUNK puzzles per call under one progress bar: for the model, a whole number of
    its --batch-size batches, so that it samples the batches eval.py would. Token counts come from the
    responder's num_tokens (model: sampled tokens; api: completion tokens); the expert has none.
    """
    if teacher == "api":
        try:
            return respond(records, num_samples), respond.num_tokens
        except api.ApiError as exc:  # 401/402/403/404: the message is already redacted
            sys.exit(f"distill.py: error: {exc}")
    texts, counts = [], []
    with tqdm(total=len(records), desc=f"{teacher} teacher", unit="puzzle") as bar:
        step = batch_size * max(1, CHUNK // batch_size) if teacher == "model" else CHUNK
        for start in range(0, len(records), step):
            chunk = records[start:start + step]
            texts += respond(chunk, num_samples)
            counts += getattr(respond, "num_tokens", None) or [[None] * num_samples for _ in chunk]
            bar.update(len(chunk))
    return texts, counts


def judge(records, texts, counts, errors):
    """One row per sample: status accepted (reward == 1.0), rejected (scored lower) or failed (no answer
    from the teacher after its retries), with the score when there is one."""
    rows = []
    for record, responses, tokens in zip(records, texts, counts):
        for k, text in enumerate(responses):
            row = {"id": record["id"], "sample": k, "n": len(record["answer"]), "num_tokens": tokens[k]}
            if (record["id"], k) in errors:
                row.update(status="failed", reward=None, error=errors[(record["id"], k)], score=None)
            else:
                s = reward.score(text, record["answer"], tokens[k])
                row.update(status="accepted" if s["reward"] == 1.0 else "rejected", reward=s["reward"],
                           error=s["error"], score=s)
            rows.append(row)
    return rows


def select_sft(records, texts, rows, keep_all):
    """SFT rows (record + "response") in puzzle then sample order: every accepted sample with keep_all,
    else the first accepted sample of each puzzle."""
    sft, kept = [], set()
    samples = [(record, text) for record, responses in zip(records, texts) for text in responses]
    for (record, text), row in zip(samples, rows):  # rows are in the same puzzle-then-sample order
        if row["status"] == "accepted" and (keep_all or record["id"] not in kept):
            sft.append({**record, "response": text})
            kept.add(record["id"])
    return sft


def acceptance(rows):
    """Counts and rates over sample rows: samples, accepted, rejected (malformed | wrong), failed,
    sample_acceptance = accepted / samples, puzzles, puzzles_accepted (>= 1 accepted sample),
    puzzle_acceptance = puzzles_accepted / puzzles."""
    count = {status: sum(r["status"] == status for r in rows) for status in ("accepted", "rejected", "failed")}
    puzzles = {r["id"] for r in rows}
    accepted_puzzles = {r["id"] for r in rows if r["status"] == "accepted"}
    return {
        "puzzles": len(puzzles), "samples": len(rows), **count,
        "rejected_malformed": sum(r["status"] == "rejected" and r["reward"] == -1.0 for r in rows),
        "sample_acceptance": count["accepted"] / len(rows) if rows else None,
        "puzzles_accepted": len(accepted_puzzles),
        "puzzle_acceptance": len(accepted_puzzles) / len(puzzles) if puzzles else None,
    }


def format_acceptance(report):
    """The printed markdown table: one row per N, then all."""
    lines = ["| N | puzzles | samples | accepted | rejected (malformed) | failed | sample acceptance | "
             "puzzles with >= 1 accepted |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, a in list(report["by_n"].items()) + [("all", report["overall"])]:
        lines.append(f"| {name} | {a['puzzles']} | {a['samples']} | {a['accepted']} | {a['rejected']} "
                     f"({a['rejected_malformed']}) | {a['failed']} | {100 * a['sample_acceptance']:.1f}% | "
                     f"{a['puzzles_accepted']} ({100 * a['puzzle_acceptance']:.1f}%) |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cello.HelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--puzzles", required=True, help="puzzles JSONL to distill (records of puzzles.py)")
    group.add_argument("--out-dir", required=True,
                       help="folder for sft.jsonl, samples.jsonl, report.json (and the api cache)")
    group.add_argument("--samples", type=int, default=4, help="responses asked per puzzle (k; the paper used 8)")
    group.add_argument("--limit", type=int, default=None,
                       help="distill only the first LIMIT puzzles (>= 1; to try a teacher cheaply)")
    group.add_argument("--keep-all", action="store_true",
                       help="keep every accepted response of a puzzle (default: the first one, as in Cell-o1's "
                            "reasoning split; keeping all over-weights the easy puzzles, where all k are accepted)")
    group = parser.add_argument_group("teacher")
    group.add_argument("--teacher", required=True, choices=("expert", "api", "model"), help="who answers the puzzles")
    group.add_argument("--temperature", type=float, default=None,
                       help=f"sampling temperature (default: expert {responders.DEFAULT_TEMPERATURE} (Gumbel noise "
                            "on its marker scores), model 1.0, api the server's; never sent to reasoning models)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (expert, model; 0 to 2^63 - 1)")
    group.add_argument("--train", default=None, help="expert: train puzzles JSONL it learns marker scores from")
    group.add_argument("--model-path", default=None, help="model: checkpoint folder (Hugging Face format)")
    group.add_argument("--max-new-tokens", type=int, default=1024, help="model: response length limit in tokens")
    group.add_argument("--batch-size", type=int, default=8, help="model: puzzles sampled together")
    group.add_argument("--device", default=None,
                       help="model: torch device (default: cuda when there is a GPU, else cpu)")
    group = parser.add_argument_group("api teacher")
    group.add_argument("--base-url", default="https://api.openai.com/v1",
                       help="OpenAI-compatible base URL (vLLM: http://localhost:8000/v1, "
                            "Ollama: http://localhost:11434/v1)")
    group.add_argument("--api-model", default=None,
                       help="model name the server knows (o1, gpt-4o, Qwen/Qwen2.5-72B-Instruct)")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="name of the environment variable holding the key ('' for none); "
                            "the key itself never goes on the command line")
    group.add_argument("--api-cache", dest="cache", default=None,
                       help="the api answer cache JSONL (default: OUT_DIR/api_cache.jsonl); keyed by model name, "
                            "prompt and sampling settings, not by --base-url")
    group.add_argument("--max-concurrency", type=int, default=8, help="requests in flight at once")
    group.add_argument("--timeout", type=float, default=600.0,
                       help="seconds per request before it is retried (o1 can think for minutes)")
    group.add_argument("--max-attempts", type=int, default=6, help="requests per sample before it is recorded failed")
    group.add_argument("--backoff", type=float, default=1.0,
                       help="first retry delay in seconds (doubles per retry, jittered, at most 60)")
    group.add_argument("--retry-failed", action="store_true",
                       help="ask again the samples cached as failed (default: cached failures are final)")
    group.add_argument("--max-tokens", type=int, default=None,
                       help="response token limit (sent as max_completion_tokens to reasoning models, where it "
                            "counts their thinking too; default: the server's)")
    group.add_argument("--reasoning", choices=("auto", "yes", "no"), default="auto",
                       help="reasoning-model request format (no temperature, max_completion_tokens); "
                            "auto: from the name (o1, o3, o4-mini, gpt-5)")
    group.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default=None,
                       help="reasoning models: how hard to think (default: the server's)")
    group = parser.add_argument_group("api cost (printed before a run; asks to confirm unless --yes)")
    group.add_argument("--price-input", type=float, default=15.0,
                       help="USD per 1M prompt tokens (default: o1's list price)")
    group.add_argument("--price-output", type=float, default=60.0,
                       help="USD per 1M output tokens, reasoning included (default: o1's list price)")
    group.add_argument("--est-output-tokens", type=int, default=2000,
                       help="expected output tokens per sample (reasoning included), for the estimate")
    group.add_argument("--yes", action="store_true", help="send without asking (needed when stdin is not a terminal)")
    args = parser.parse_args(argv)
    cello.check_ranges("distill.py", args, {
        "--samples": "an integer >= 1", "--limit": "an integer >= 1", "--seed": "an integer in [0, 2^63)",
        "--temperature": "a number >= 0", "--max-new-tokens": "an integer >= 1", "--batch-size": "an integer >= 1",
        "--max-concurrency": "an integer >= 1", "--timeout": "a number > 0", "--max-attempts": "an integer >= 1",
        "--backoff": "a number >= 0", "--max-tokens": "an integer >= 1", "--price-input": "a number >= 0",
        "--price-output": "a number >= 0", "--est-output-tokens": "an integer >= 0"})
    args.cache = args.cache or api.default_cache_path(args.out_dir)
    return args


def acceptance_report(args, rows, sft, respond):
    """report.json: acceptance overall and by N, token usage, and the reward metrics of the samples."""
    return {
        "teacher": args.teacher,
        "teacher_model": args.api_model if args.teacher == "api" else args.model_path,
        "puzzles_file": args.puzzles,
        "samples_per_puzzle": args.samples,
        "keep": "all" if args.keep_all else "first",
        "sft_rows": len(sft),
        "overall": acceptance(rows),
        "by_n": {n: acceptance([r for r in rows if r["n"] == n]) for n in sorted({r["n"] for r in rows})},
        "usage": getattr(respond, "usage", None),
        "metrics": reward.metrics([r["score"] for r in rows if r["score"] is not None]),
    }


def main(argv=None):
    args = parse_args(argv)
    cello.refuse_torchrun("distill.py")
    records = cello.read_puzzles(args.puzzles, "--puzzles", "distill.py")[:args.limit]
    cello.check_unique_ids(records, "--puzzles", args.puzzles, "distill.py")
    check_teacher_flags(args)
    train = cello.read_puzzles(args.train, "--train", "distill.py") if args.teacher == "expert" else None
    cello.make_out_dir(args.out_dir, "distill.py")  # after the flags and files are checked: bad input leaves no folder
    respond = make_teacher(args, train)
    if args.teacher == "api":
        confirm_cost(args, records, respond)
    texts, counts = ask_teacher(respond, records, args.samples, args.teacher, args.batch_size)
    rows = judge(records, texts, counts, getattr(respond, "errors", {}))
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:  # the api teacher got no answer (server down, every attempt failed, or a refusal)
        first = " ".join(str(failed[0]["error"]).split())[:200]
        summary = (f"{len(failed)} of {len(rows)} samples failed (first: {failed[0]['id']!r} sample "
                   f"{failed[0]['sample']}: {first}); they are cached as failed in {args.cache}: rerun with "
                   "--retry-failed to ask them again")
        if len(failed) == len(rows):  # nothing to distill from: an outage, not a result; write nothing
            sys.exit(f"distill.py: error: {summary}")
        print(f"distill.py: {summary}")

    sft = select_sft(records, texts, rows, args.keep_all)
    report = acceptance_report(args, rows, sft, respond)
    columns = ("id", "sample", "n", "status", "reward", "num_tokens", "error")
    cello.write_jsonl_atomic(os.path.join(args.out_dir, "samples.jsonl"), [{c: r[c] for c in columns} for r in rows])
    cello.write_json_atomic(os.path.join(args.out_dir, "report.json"), report)
    print(format_acceptance(report))
    if report["usage"]:
        print("usage: " + ", ".join(f"{key} {value:,}" for key, value in report["usage"].items()))
    if not sft:  # an empty sft.jsonl would pass for a finished stage (the demo's, a script's) and fail in sft.py
        sys.exit(f"distill.py: error: no sample was accepted, so no sft.jsonl was written; "
                 f"{os.path.join(args.out_dir, 'samples.jsonl')} and report.json say why")
    cello.write_jsonl_atomic(os.path.join(args.out_dir, "sft.jsonl"), sft)  # last: it marks the run finished
    print(f"wrote {len(sft)} SFT rows to {os.path.join(args.out_dir, 'sft.jsonl')}")


if __name__ == "__main__":
    cello.run_script(main, "distill.py", "the same command continues; the api teacher's answers so far are "
                                         "cached and not asked again (other teachers start afresh)")
