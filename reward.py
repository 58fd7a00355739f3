"""reward.py: parse a CellPuzzles response, the paper's rule-based reward, and its metrics.

Pure Python (no torch), and no function here raises on any response string: a response that cannot
be read is simply malformed. The rules are SPEC.md's:

  format   the whole response is
               <think>...</think>\\n<answer>label 1 | ... | label N</answer>
           with each of <think>, </think>, <answer>, </answer> exactly once, nothing before <think>
           and nothing after </answer>, not even a newline; exactly N labels split on '|' (each
           stripped, none empty), no label repeated (compared stripped and case-insensitive).
           The paper's code differs from SPEC's text in three corner cases, and this file follows
           SPEC: its regex ends in `$`, which in Python also accepts one final newline; it drops
           empty labels ("A | | B"); it compares repeats exactly ("A | a" is no repeat there).
  reward   -1 if malformed, else (c / N + [c == N]) / 2, where c counts the cells whose label equals
           the gold label at the same position (stripped, case-insensitive). So a valid answer scores
           in [0, 0.5) or exactly 1.0.

Used as a library by eval.py, distill.py and grpo.py. A quick check from the shell:
    python reward.py "<think>x</think>
    <answer>A | B</answer>" "A|C"
"""
import sys

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def norm_label(label):
    """The form labels are compared in: stripped and case-folded."""
    return label.strip().casefold()


def _lenient_labels(text):
    """The stripped '|'-separated parts of the last <answer>...</answer>, read leniently.

    None when there is no closing </answer> with an <answer> before it; [] when that answer is blank.
    Plain string searches (no regex) keep this linear on huge inputs.
    """
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    inner = text[start + len("<answer>"):end]
    if not inner.strip():
        return []
    return [part.strip() for part in inner.split("|")]


def parse_answer(text, n):
    """Check a response against SPEC.md's format rule for a puzzle of n cells.

    Returns dict(valid, labels, error):
      valid   True when the format rule holds (see the module docstring);
      labels  the lenient parse (stripped '|'-parts of the last <answer>...</answer>), given even when
              the response is malformed so that uniqueness can be measured; None when no answer block,
              [] when it is blank;
      error   None when valid, else one short reason.
    """
    if not isinstance(text, str):
        return {"valid": False, "labels": None, "error": "response is not a string"}
    labels = _lenient_labels(text)

    def bad(reason):
        return {"valid": False, "labels": labels, "error": reason}

    if not text.strip():
        return bad("empty response")
    for tag in TAGS:
        count = text.count(tag)
        if count != 1:
            return bad(f"{tag} occurs {count} times (expected exactly once)")
    p_think, p_think_end, p_answer, p_answer_end = (text.find(tag) for tag in TAGS)
    if not p_think < p_think_end < p_answer < p_answer_end:
        return bad("tags out of order (expected <think> </think> <answer> </answer>)")
    if p_think != 0:
        return bad("text before <think>")
    if not text.endswith("</answer>"):
        return bad("text after </answer>")
    if text[p_think_end + len("</think>"):p_answer] != "\n":
        return bad("expected exactly one newline between </think> and <answer>")
    parts = [part.strip() for part in text[p_answer + len("<answer>"):p_answer_end].split("|")]
    if len(parts) != n:
        return bad(f"{len(parts)} labels (expected {n})")
    if any(not part for part in parts):
        return bad("empty label")
    if len({norm_label(part) for part in parts}) != len(parts):
        return bad("repeated label")
    return {"valid": True, "labels": parts, "error": None}


def count_correct(labels, answer):
    """c = number of positions i where labels[i] equals answer[i] (stripped, case-insensitive)."""
    return sum(norm_label(p) == norm_label(g) for p, g in zip(labels, answer))


def reward(text, answer):
    """The paper's reward: -1.0 if malformed, else (c / N + [c == N]) / 2 with N = len(answer)."""
    parsed = parse_answer(text, len(answer))
    if not parsed["valid"]:
        return -1.0
    n = len(answer)
    c = count_correct(parsed["labels"], answer)
    return (c / n + (1.0 if c == n else 0.0)) / 2


def score(text, answer, num_tokens=None):
    """Everything the metrics need about one response to one puzzle.

    Returns dict(n, valid, correct, reward, exact, uniqueness, num_tokens, error):
      correct     c (0 when malformed: a malformed response gets none of its N cells);
      exact       valid and c == N;
      uniqueness  distinct labels / labels of the lenient parse (case-insensitive; 0 when nothing parses).
    """
    n = len(answer)
    parsed = parse_answer(text, n)
    labels = parsed["labels"] or []
    correct = count_correct(parsed["labels"], answer) if parsed["valid"] else 0
    return {
        "n": n,
        "valid": parsed["valid"],
        "correct": correct,
        "reward": reward(text, answer),
        "exact": parsed["valid"] and correct == n,
        "uniqueness": len({norm_label(x) for x in labels}) / len(labels) if labels else 0.0,
        "num_tokens": num_tokens,
        "error": parsed["error"],
    }


def _summarize(scores):
    """The paper's metrics over a list of score() dicts (values None when the list is empty).

      cell_accuracy    sum(correct) / sum(n)             pooled over cells
      batch_accuracy   mean(exact)                        share of puzzles fully right
      format_validity  mean(valid)
      uniqueness       mean(uniqueness)                   mean over responses
      mean_reward      mean(reward)
      mean_length      mean(num_tokens) over the responses that have one (None if none do)
      count            number of responses
    """
    count = len(scores)
    lengths = [s["num_tokens"] for s in scores if s.get("num_tokens") is not None]
    cells = sum(s["n"] for s in scores)

    def mean(key):
        return sum(float(s[key]) for s in scores) / count if count else None

    return {
        "cell_accuracy": sum(s["correct"] for s in scores) / cells if cells else None,
        "batch_accuracy": mean("exact"),
        "format_validity": mean("valid"),
        "uniqueness": mean("uniqueness"),
        "mean_reward": mean("reward"),
        "mean_length": sum(lengths) / len(lengths) if lengths else None,
        "count": count,
    }


def metrics(scores):
    """The metrics of _summarize over all scores, plus "by_n": {N: the same metrics for puzzles of N cells}."""
    out = _summarize(scores)
    out["by_n"] = {n: _summarize([s for s in scores if s["n"] == n]) for n in sorted({s["n"] for s in scores})}
    return out


def format_table(rows):
    """A markdown table of metrics: rows maps a name (e.g. a responder) to a metrics() dict."""

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["| | cell-level | batch-level | format validity | uniqueness | mean length | count |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in rows.items():
        length = "-" if m.get("mean_length") is None else f"{m['mean_length']:.1f}"
        lines.append(f"| {name} | {pct(m['cell_accuracy'])} | {pct(m['batch_accuracy'])} | "
                     f"{pct(m['format_validity'])} | {pct(m['uniqueness'])} | {length} | {m['count']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit('usage: python reward.py RESPONSE "gold 1|gold 2|..."')
    gold = [label.strip() for label in sys.argv[2].split("|")]
    print(score(sys.argv[1], gold))
