"""responders.py: who answers CellPuzzles. Puzzles in, response texts out.

A responder is a plain function

    respond(records: list[dict], num_samples: int) -> list[list[str]]

giving num_samples full assistant responses for each puzzle record (see cello.py, section 1, for the record
format). eval.py scores responders; distill.py uses them as teachers. Build one by name with
make_responder(name, **options):

  random       a seeded random permutation of the candidates: the floor (cell accuracy about 1/N).
  independent  each cell takes its best-scoring type under the expert's marker scores on its own,
               repeats allowed: shows what ignoring the batch costs (a repeat is malformed).
  expert       a marker-gene solver: per-type marker scores learned from train records only
               (fit_expert), an N x N cell-by-candidate score matrix, and one joint optimal assignment
               (Hungarian algorithm) for the whole batch. Its <think> trace walks through the evidence
               the way an annotator does. With temperature > 0 the scores get Gumbel noise, so the
               assignment and the trace vary between samples (rejection sampling has something to reject).
  model        a Hugging Face checkpoint folder through cello's KV-cache sampler (greedy at temperature 0).
  api          any OpenAI-compatible endpoint through api.api_responder (loaded only when asked for).

The random and expert responders key their randomness by (seed, puzzle id, sample index), so a
puzzle gets the same samples whether it is answered alone or in a batch, and a resumed run repeats
nothing differently. The model responder draws from one seeded stream for the whole run: greedy (its
default) is the same either way, but its samples at temperature > 0 depend on the batch size and the
order of the puzzles.

Quick look at the expert's responses:
    python responders.py --train train.jsonl --puzzles test.jsonl --temperature 0.1 --num-samples 2
"""
import argparse
import math
import zlib
from collections import defaultdict

import numpy as np
from scipy.optimize import linear_sum_assignment

# Expert sampling temperature, in the score matrix's per-gene log-odds units. On train puzzles shaped
# like the demo's (N 4-6, M 25, gene dropout 0.3) it keeps 87% of samples fully correct and 97.8% of
# puzzles with one in k = 4 (temperature 0: 95.7%): enough wrong assignments to reject, most accepted.
DEFAULT_TEMPERATURE = 0.1
# Genes a trace line restates per cell, top first. The top 5 already carry most of the signal (the
# expert scores 84% of test cells right from them, 86% from all 25, demo puzzles), and restating them
# in order is a plain copy of the prompt that a small model learns early.
TRACE_GENES = 8


def sample_rng(seed, record, k):
    """A generator keyed by (seed, puzzle id, sample index): the same samples however puzzles are batched."""
    return np.random.default_rng([seed, zlib.crc32(str(record["id"]).encode()), k])


def format_response(think_lines, labels):
    """SPEC.md's response layout: <think>...</think>, a newline, <answer>labels joined by ' | '</answer>."""
    return "<think>\n" + "\n".join(think_lines) + "\n</think>\n<answer>" + " | ".join(labels) + "</answer>"


# ---------------------------------------------------------------------------------------------
# Marker profile learned from train puzzles
# ---------------------------------------------------------------------------------------------

def rank_weight(r):
    """Weight of the gene at rank r (0-based) in a cell's list: w(r) = 1 / log2(r + 2), a DCG-style
    discount (1, 0.63, 0.5, ...): the top genes say most, the tail still counts. It beat linear and
    flat weights on held-out pbmc68k puzzles."""
    return 1.0 / math.log2(r + 2)


def fit_expert(train_records, smoothing=0.1):
    """Per-type marker scores from train puzzles only.

    For type t and gene g, with w(r) the rank weight of g in a cell's list (0 when absent):
        p_t(g)  = (sum of w over cells of type t + a) / (cells of type t + 2a)      a = smoothing
        bg_t(g) = mean of p_u(g) over the other types u != t   (balanced: big types do not dominate)
        score_t(g) = log p_t(g) - log bg_t(g)                      a log-odds "marker" score
    Only genes with score > 0 for t are kept (its markers); others count 0.
    Returns {"types": {label: {gene: score}}, "cells": {label: number of train cells}}.
    """
    mass = defaultdict(lambda: defaultdict(float))  # type -> gene -> summed rank weight
    cells = defaultdict(int)
    for record in train_records:
        for genes, label in zip(record["cells"], record["answer"]):
            cells[label] += 1
            for r, g in enumerate(genes):
                mass[label][g] += rank_weight(r)
    types = sorted(cells)
    vocab = sorted({g for t in types for g in mass[t]})
    # p[t, g]: smoothed rank-weighted rate of gene g in type t's top lists; shape [T, V]
    p = np.array([[(mass[t].get(g, 0.0) + smoothing) / (cells[t] + 2 * smoothing) for g in vocab] for t in types])
    if len(types) > 1:
        background = (p.sum(0, keepdims=True) - p) / (len(types) - 1)  # [T, V]
    else:
        background = np.full_like(p, smoothing / (1 + 2 * smoothing))
    score = np.log(p) - np.log(background)  # [T, V]
    profile = {"types": {}, "cells": dict(cells)}
    for i, t in enumerate(types):
        profile["types"][t] = {vocab[j]: round(float(score[i, j]), 4) for j in np.flatnonzero(score[i] > 0)}
    return profile


def type_markers(profile, label):
    """The learned marker scores of a label ({} for a label never seen in training; case-insensitive match)."""
    types = profile["types"]
    if label in types:
        return types[label]
    lowered = {t.lower(): t for t in types}
    return types.get(lowered.get(label.strip().lower()), {})


def score_matrix(record, profile):
    """S[i, j] = evidence that cell i is candidate j: sum_r w(r) score_j(gene_r) / sum_r w(r).

    A rank-weighted mean of the marker scores over the cell's top genes, so values are in per-gene
    log-odds units whatever M is. Shape [N cells, N candidates].
    """
    markers = [type_markers(profile, c) for c in record["candidates"]]
    S = np.zeros((len(record["cells"]), len(markers)))
    for i, genes in enumerate(record["cells"]):
        w = [rank_weight(r) for r in range(len(genes))]
        total = sum(w) or 1.0
        for j, m in enumerate(markers):
            S[i, j] = sum(wr * m.get(g, 0.0) for wr, g in zip(w, genes)) / total
    return S


# ---------------------------------------------------------------------------------------------
# Expert and independent responses
# ---------------------------------------------------------------------------------------------

def _cell_line(i, record, label):
    """'Cell 3: GNLY, NKG7, CCL5, ... -> CD56+ NK': the cell's TRACE_GENES top genes as listed, then its type."""
    return f"Cell {i + 1}: {', '.join(record['cells'][i][:TRACE_GENES])} -> {record['candidates'][label]}"


def _left_line(record, left):
    """'Left: A; B; C': the candidates not yet given to a cell, in prompt order (';' since labels may hold commas)."""
    return "Left: " + "; ".join(record["candidates"][j] for j in left)


def expert_response(record, profile, rng, temperature=0.0):
    """A well-formed response: the joint optimal assignment and a trace that walks through it.

    S = score_matrix + temperature * Gumbel noise (no noise at temperature 0: deterministic).
    The assignment maximises sum_i S[i, a(i)] over permutations a (linear_sum_assignment).
    The trace goes through the cells in order, the way an annotator eliminates candidates:
        Left: <every candidate>
        Cell 1: <its top TRACE_GENES genes, as in the prompt> -> <the type it gets>
        Left: <the candidates still free>
        Cell 2: ...
    Each cell takes a type from the "Left" line just above it, so every candidate is used once; the
    answer then repeats the cells' types in order. That makes the trace easy to learn for a small
    model: restating a cell's top genes is a copy of its prompt line, the type then follows from
    genes right beside it, it is picked from the short list just above, and uniqueness is written
    down rather than kept in mind. (Earlier traces named each cell's strongest marker genes and kept
    no lists: a small SFT model from scratch copied genes of the wrong cell and repeated labels, and
    only 2-10% of its answers were well formed.)
    rng: a numpy Generator (only used when temperature > 0).
    """
    n = len(record["cells"])
    S = score_matrix(record, profile)
    if temperature > 0:
        S = S + temperature * rng.gumbel(size=S.shape)
    rows, cols = linear_sum_assignment(S, maximize=True)
    assigned = dict(zip(rows.tolist(), cols.tolist()))  # cell -> candidate index
    left = list(range(n))
    lines = []
    for i in range(n):
        lines.append(_left_line(record, left))
        lines.append(_cell_line(i, record, assigned[i]))
        left.remove(assigned[i])
    return format_response(lines, [record["candidates"][assigned[i]] for i in range(n)])


def independent_response(record, profile):
    """Each cell takes its own best candidate (ties to the first); labels may repeat (then malformed)."""
    S = score_matrix(record, profile)
    best = np.argmax(S, axis=1)  # the first best on ties
    n = len(record["cells"])
    lines = [_cell_line(i, record, best[i]) for i in range(n)]
    return format_response(lines, [record["candidates"][best[i]] for i in range(n)])


def random_response(record, rng):
    """A random permutation of the candidates in a well-formed response."""
    labels = [record["candidates"][j] for j in rng.permutation(len(record["candidates"]))]
    return format_response(["Guessing at random."], labels)


# ---------------------------------------------------------------------------------------------
# Model checkpoints through cello's sampler
# ---------------------------------------------------------------------------------------------

def model_responder(path, batch_size=8, max_new_tokens=1024, temperature=0.0, top_p=1.0, device="cpu", seed=0):
    """A respond() that samples a checkpoint folder with cello.sample, batch_size puzzles per call.

    Greedy when temperature is 0. respond.num_tokens holds the response token counts of the last
    call ([puzzle][sample], EOS included), so eval.py can report mean length in tokens.
    """
    import torch

    import cello

    if torch.device(device).type == "cpu":
        cello.keep_freed_memory()
    model = cello.load_model(path, device=device)
    cello.check_fits_context(model.config, path, "cello", max_new_tokens)
    model.eval()
    tokenizer = cello.load_tokenizer(path)
    stop_ids = cello.stop_token_ids(path, tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed)

    def respond(records, num_samples):
        texts, counts = [], []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            prompts = [cello.prompt_ids(tokenizer, r) for r in chunk]
            with torch.no_grad():
                out = cello.sample(model, prompts, num_samples, max_new_tokens, stop_ids, tokenizer.pad_token_id,
                                   temperature=temperature, top_p=top_p, generator=generator)
            for p in range(len(chunk)):  # rows are group-major: prompt p's samples are p*G .. p*G+G-1
                rows = out["responses"][p * num_samples:(p + 1) * num_samples]
                texts.append([cello.response_text(tokenizer, ids, stop_ids) for ids in rows])
                counts.append([len(ids) for ids in rows])
        respond.num_tokens = counts
        return texts

    respond.num_tokens = []
    return respond


# ---------------------------------------------------------------------------------------------
# Building responders by name
# ---------------------------------------------------------------------------------------------

NAMES = ("random", "independent", "expert", "model", "api")


def make_responder(name, train_records=None, temperature=None, seed=0, **options):
    """A respond(records, num_samples) function by name.

    random: seed. independent: train_records. expert: train_records, temperature (default
    DEFAULT_TEMPERATURE; 0 = deterministic), seed. model: path, batch_size, max_new_tokens,
    temperature (default 0 = greedy), top_p, device, seed. api: the keyword arguments of
    api.api_responder (base_url, model, api_key_env, cache_path, ...), temperature passed on.
    Raises ValueError for an unknown name or a missing option.
    """
    if name == "random":
        def respond(records, num_samples):
            return [[random_response(r, sample_rng(seed, r, k)) for k in range(num_samples)] for r in records]
        return respond
    if name in ("independent", "expert"):
        if not train_records:
            raise ValueError(f"the {name} responder needs train records to learn marker scores")
        profile = fit_expert(train_records)
        if name == "independent":
            def respond(records, num_samples):
                return [[independent_response(r, profile)] * num_samples for r in records]
            return respond
        temp = DEFAULT_TEMPERATURE if temperature is None else temperature

        def respond(records, num_samples):
            return [[expert_response(r, profile, sample_rng(seed, r, k), temp) for k in range(num_samples)]
                    for r in records]
        respond.profile = profile
        return respond
    if name == "model":
        if not options.get("path"):
            raise ValueError("the model responder needs path= (a checkpoint folder)")
        return model_responder(temperature=temperature or 0.0, seed=seed, **options)
    if name == "api":
        import api  # imported only when asked for: the offline responders need no httpx

        return api.api_responder(temperature=temperature, **options)
    raise ValueError(f"unknown responder {name!r} (expected one of {', '.join(NAMES)})")


if __name__ == "__main__":
    import cello

    parser = argparse.ArgumentParser(description="Print the expert responder's responses to a few puzzles.",
                                     formatter_class=cello.HelpFormatter)
    parser.add_argument("--train", required=True, help="train puzzles JSONL the expert learns marker scores from")
    parser.add_argument("--puzzles", required=True, help="puzzles JSONL to answer")
    parser.add_argument("--limit", type=int, default=2, help="number of puzzles to show")
    parser.add_argument("--num-samples", type=int, default=1, help="responses per puzzle")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="Gumbel noise scale (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args()
    cello.check_ranges("responders.py", args, {"--limit": "an integer >= 1", "--num-samples": "an integer >= 1",
                                               "--temperature": "a number >= 0", "--seed": "an integer in [0, 2^63)"})
    respond = make_responder("expert", train_records=cello.read_puzzles(args.train, "--train", "responders.py"),
                             temperature=args.temperature, seed=args.seed)
    puzzles = cello.read_puzzles(args.puzzles, "--puzzles", "responders.py")[:args.limit]
    cello.check_unique_ids(puzzles, "--puzzles", args.puzzles, "responders.py")  # samples are seeded by id
    for record, responses in zip(puzzles, respond(puzzles, args.num_samples)):
        for text in responses:
            print(f"# {record['id']}  gold: {' | '.join(record['answer'])}\n{text}\n")
