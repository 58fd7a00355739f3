"""Responders: the expert's learned profile, joint assignment and traces; independent; random; model."""
import math
import os
import random
import subprocess
import sys

import pytest

import cello
import responders
import reward
from conftest import ROOT

TYPES = ["B cell", "CD4-positive, alpha-beta T cell", "Monocyte", "NK cell", "Dendritic", "Platelet"]


def synthetic_records(n_records, seed, split="train", n_range=(3, 6), noise=0.0):
    """Puzzles whose cells carry their type's 3 marker genes among shared housekeeping genes.

    Each type k has markers g{k}a, g{k}b, g{k}c; with probability `noise` a cell's markers are replaced
    by another type's, so the expert is not always right (tests that sampling matters need errors).
    """
    rng = random.Random(seed)
    records = []
    for p in range(n_records):
        n = rng.randint(*n_range)
        types = rng.sample(TYPES, n)
        cells = []
        for t in types:
            k = TYPES.index(t) if rng.random() >= noise else rng.randrange(len(TYPES))
            genes = [f"g{k}a", f"g{k}b", f"g{k}c"] + [f"h{j}" for j in rng.sample(range(20), 7)]
            rng.shuffle(genes)
            cells.append(genes)
        records.append({"id": f"syn/{split}/{seed}/{p}", "source": "synthetic", "donor": "D0", "batch": None,
                        "split": split, "context": "The cell is from a healthy donor.", "cells": cells,
                        "candidates": sorted(types), "answer": types})
    return records


def answer_labels(text, n):
    parsed = reward.parse_answer(text, n)
    assert parsed["valid"], (parsed["error"], text)
    return parsed["labels"]


def test_fit_expert_log_odds_by_hand():
    # Two train cells: X = [A, B], Y = [C, B]. w(0) = 1, w(1) = 1/log2(3); smoothing a = 0.1.
    # p_X(A) = (1 + 0.1) / (1 + 0.2), p_Y(A) = 0.1 / 1.2: score_X(A) = log 11. B is equally common
    # in both types (score 0) so it is no marker of either.
    train = [{"id": "t", "cells": [["A", "B"], ["C", "B"]], "candidates": ["X", "Y"], "answer": ["X", "Y"]}]
    profile = responders.fit_expert(train)
    assert profile["cells"] == {"X": 1, "Y": 1}
    assert profile["types"].keys() == {"X", "Y"}
    assert profile["types"]["X"] == {"A": pytest.approx(math.log(11), abs=1e-4)}
    assert profile["types"]["Y"] == {"C": pytest.approx(math.log(11), abs=1e-4)}
    # Score matrix: a rank-weighted mean. Cell [A, C] -> X: 1 * log 11 / (1 + 1/log2 3).
    record = {"cells": [["A", "C"]], "candidates": ["X", "Y"]}
    S = responders.score_matrix(record, profile)
    w1 = 1 / math.log2(3)
    assert S[0, 0] == pytest.approx(math.log(11) / (1 + w1), abs=1e-4)
    assert S[0, 1] == pytest.approx(w1 * math.log(11) / (1 + w1), abs=1e-4)


def test_fit_expert_background_is_the_mean_over_the_other_types_by_hand():
    # Three types, X with two cells: X = [A], [A]; Y = [B]; Z = [C] (one gene each: w = 1, a = 0.1).
    # p_X(A) = 2.1 / 2.2, p_Y(A) = p_Z(A) = 0.1 / 1.2, so bg_X(A) = 0.1 / 1.2.
    # p_Y(B) = 1.1 / 1.2, p_X(B) = 0.1 / 2.2, p_Z(B) = 0.1 / 1.2: bg_Y(B) = (0.1 / 2.2 + 0.1 / 1.2) / 2.
    train = [{"id": "t1", "cells": [["A"], ["B"]], "candidates": ["X", "Y"], "answer": ["X", "Y"]},
             {"id": "t2", "cells": [["A"], ["C"]], "candidates": ["X", "Z"], "answer": ["X", "Z"]}]
    profile = responders.fit_expert(train)
    assert profile["cells"] == {"X": 2, "Y": 1, "Z": 1}
    assert profile["types"]["X"] == {"A": pytest.approx(math.log((2.1 / 2.2) / (0.1 / 1.2)), abs=1e-4)}
    assert profile["types"]["Y"] == {"B": pytest.approx(math.log((1.1 / 1.2) / ((0.1 / 2.2 + 0.1 / 1.2) / 2)), abs=1e-4)}
    assert profile["types"]["Z"] == {"C": pytest.approx(math.log((1.1 / 1.2) / ((0.1 / 2.2 + 0.1 / 1.2) / 2)), abs=1e-4)}


def test_expert_trace_and_conflict_by_hand():
    """Both cells point to X on their own; cell 1 fits X better, so cell 2 gets Y (the joint assignment)."""
    train = [{"id": "t", "cells": [["x1", "x2", "h"], ["y1", "y2", "h"]], "candidates": ["X", "Y"], "answer": ["X", "Y"]}]
    profile = responders.fit_expert(train)
    record = {"id": "p", "cells": [["x1", "x2", "h"], ["x2", "y1", "h"]], "candidates": ["X", "Y"], "answer": ["X", "Y"]}
    text = responders.expert_response(record, profile, None, temperature=0.0)
    assert text == ("<think>\n"
                    "Left: X; Y\n"
                    "Cell 1: x1, x2, h -> X\n"
                    "Left: Y\n"
                    "Cell 2: x2, y1, h -> Y\n"
                    "</think>\n<answer>X | Y</answer>")
    assert reward.reward(text, record["answer"]) == 1.0
    # Ignoring the batch, both cells take X: a repeated label, so the response is malformed (-1).
    independent = responders.independent_response(record, profile)
    assert reward.parse_answer(independent, 2)["labels"] == ["X", "X"]
    assert reward.reward(independent, record["answer"]) == -1.0


def test_expert_trace_restates_top_genes_and_eliminates_candidates():
    """Each 'Cell k' line copies the cell's first TRACE_GENES genes and takes a type from the 'Left'
    line above it; the next 'Left' line is that list minus the type; the answer repeats the types."""
    train = synthetic_records(60, seed=11, noise=0.2)
    test = synthetic_records(20, seed=12, split="test", n_range=(2, 6), noise=0.3)
    respond = responders.make_responder("expert", train_records=train, temperature=0.5)
    for record, texts in zip(test, respond(test, 2)):
        for text in texts:
            lines = text.split("\n")[1:-2]  # between "<think>" and "</think>"
            n = len(record["cells"])
            assert len(lines) == 2 * n
            left, taken = list(record["candidates"]), []
            for k in range(n):
                assert lines[2 * k] == "Left: " + "; ".join(left)
                genes, label = lines[2 * k + 1].removeprefix(f"Cell {k + 1}: ").split(" -> ")
                assert genes.split(", ") == record["cells"][k][:responders.TRACE_GENES]
                assert label in left
                left.remove(label)
                taken.append(label)
            assert answer_labels(text, n) == taken


def test_expert_learns_from_train_only():
    train, test = synthetic_records(60, seed=1), synthetic_records(20, seed=2, split="test")
    respond = responders.make_responder("expert", train_records=train, temperature=0.0)
    assert respond.profile == responders.fit_expert(train)
    before = respond(test, 1)
    # Scrambled gold answers on the test records change nothing: the answer is never read.
    scrambled = [dict(r, answer=list(reversed(r["answer"]))) for r in test]
    assert respond(scrambled, 1) == before
    assert respond.profile == responders.fit_expert(train)  # answering puzzles never updates the profile
    # And the profile does depend on the train labels (so the check above is not vacuous).
    relabelled = [dict(r, answer=list(reversed(r["answer"]))) for r in train]
    assert responders.fit_expert(relabelled) != respond.profile


@pytest.mark.parametrize("temperature", [0.0, 0.1, 1.0, 10.0])
def test_expert_answers_are_valid_permutations(temperature):
    train = synthetic_records(60, seed=3, noise=0.2)
    test = synthetic_records(40, seed=4, split="test", n_range=(2, 6), noise=0.3)
    test.append(dict(test[0], id="unseen", candidates=sorted(["Never seen", *test[0]["answer"][1:]]),
                     answer=["Never seen", *test[0]["answer"][1:]]))  # a label absent from training
    respond = responders.make_responder("expert", train_records=train, temperature=temperature)
    for record, texts in zip(test, respond(test, 3)):
        for text in texts:
            labels = answer_labels(text, len(record["cells"]))
            assert sorted(labels) == sorted(record["candidates"])
            assert text.startswith("<think>\nLeft: ") and "\n</think>\n<answer>" in text


def test_expert_is_accurate_on_clean_puzzles():
    train, test = synthetic_records(60, seed=5), synthetic_records(30, seed=6, split="test")
    respond = responders.make_responder("expert", train_records=train, temperature=0.0)
    assert all(reward.reward(t[0], r["answer"]) == 1.0 for r, t in zip(test, respond(test, 1)))


def test_temperature_zero_is_deterministic_and_sampling_varies():
    train = synthetic_records(60, seed=7, noise=0.2)
    test = synthetic_records(20, seed=8, split="test", noise=0.3)
    greedy = responders.make_responder("expert", train_records=train, temperature=0.0)(test, 4)
    assert all(len(set(texts)) == 1 for texts in greedy)
    sampler = responders.make_responder("expert", train_records=train, temperature=0.5, seed=0)
    sampled = sampler(test, 4)
    assert sum(len(set(texts)) > 1 for texts in sampled) >= len(test) // 2  # traces differ within a puzzle
    answers = {reward.parse_answer(t, len(r["cells"]))["labels"].__repr__() for r, ts in zip(test, sampled) for t in ts}
    assert len(answers) > len(test)  # and so do assignments, not only the order of the lines
    # Keyed by (seed, puzzle id, sample): the same samples whether puzzles come alone or together.
    assert sampler(test[3:4], 4) == sampled[3:4]
    assert responders.make_responder("expert", train_records=train, temperature=0.5, seed=1)(test, 4) != sampled


def test_independent_repeats_labels_where_expert_does_not():
    train = synthetic_records(60, seed=9, noise=0.2)
    test = synthetic_records(60, seed=10, split="test", noise=0.4)
    independent = responders.make_responder("independent", train_records=train)(test, 2)
    expert = responders.make_responder("expert", train_records=train, temperature=0.0)(test, 1)
    repeats = 0
    for record, texts, exp in zip(test, independent, expert):
        assert texts[0] == texts[1]
        labels = reward.parse_answer(texts[0], len(record["cells"]))["labels"]
        assert len(labels) == len(record["cells"]) and set(labels) <= set(record["candidates"])
        repeats += len(set(labels)) < len(labels)
        assert reward.parse_answer(exp[0], len(record["cells"]))["valid"]
    assert repeats > 0


def test_random_cell_accuracy_near_one_over_n():
    # 2,000 puzzles of N = 5: correct cells per puzzle have mean 1 and variance 1, so the pooled
    # accuracy has standard deviation sqrt(2000) / 10000 = 0.0045; the bound 0.03 is ~6.7 sd.
    rng = random.Random(0)
    records = [{"id": f"r{i}", "cells": [[]] * 5, "candidates": sorted(TYPES[:5]),
                "answer": rng.sample(TYPES[:5], 5)} for i in range(2000)]
    respond = responders.make_responder("random", seed=0)
    texts = respond(records, 1)
    m = reward.metrics([reward.score(t[0], r["answer"]) for r, t in zip(records, texts)])
    assert m["format_validity"] == 1.0 and m["uniqueness"] == 1.0
    assert abs(m["cell_accuracy"] - 1 / 5) < 0.03
    assert respond(records[:50], 1) == texts[:50]  # seeded
    assert len({t[0] for t in texts}) == 120  # keyed by puzzle: all 5! orders come up, not one draw for every puzzle
    assert responders.make_responder("random", seed=1)(records[:50], 1) != texts[:50]


def test_make_responder_bad_input():
    with pytest.raises(ValueError, match="unknown responder 'oracle'"):
        responders.make_responder("oracle")
    with pytest.raises(ValueError, match="needs train records"):
        responders.make_responder("expert")
    with pytest.raises(ValueError, match="needs path"):
        responders.make_responder("model")


def test_model_responder_tiny_checkpoint(tmp_path):
    import torch

    torch.set_num_threads(1)
    train = synthetic_records(8, seed=11)
    expert = responders.make_responder("expert", train_records=train, temperature=0.0)
    sft = [dict(r, response=t[0]) for r, t in zip(train, expert(train, 1))]
    fresh = cello.prepare_model("tiny", str(tmp_path), sft)
    # a fresh tiny model repeats one token after every prompt; random weights (std 0.3) make the three
    # greedy responses differ, and giving EOS the embedding row of token 422 (one the model emits)
    # makes one of them stop early, so the stop tokens and the decoding of the stop token matter too
    model, tokenizer = cello.load_model(fresh), cello.load_tokenizer(fresh)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        embedding = model.model.embed_tokens.weight
        embedding[[tokenizer.eos_token_id, 422]] = embedding[[422, tokenizer.eos_token_id]]
    path = str(tmp_path / "random")
    cello.save_checkpoint(path, model, tokenizer)
    respond = responders.make_responder("model", path=path, batch_size=2, max_new_tokens=12, temperature=0.0)
    texts = respond(train[:3], 2)
    # the reference: cello.sample's greedy response to each prompt alone, decoded without its stop token
    model, tokenizer = cello.load_model(path), cello.load_tokenizer(path)
    stop_ids = cello.stop_token_ids(path, tokenizer)
    greedy = []
    for record in train[:3]:
        with torch.no_grad():
            out = cello.sample(model, [cello.prompt_ids(tokenizer, record)], 1, 12, stop_ids, tokenizer.pad_token_id,
                               temperature=0.0)
        greedy.append(out["responses"][0])
    expected = [tokenizer.decode(ids[:-1] if ids[-1] in stop_ids else ids) for ids in greedy]
    assert len(set(expected)) == 3  # the puzzles' responses differ, so a mix-up of rows would show
    assert [len(ids) for ids in greedy] == [12, 12, 8] and greedy[2][-1] in stop_ids  # the third stopped
    assert texts == [[e, e] for e in expected]  # greedy: both samples equal, in the puzzles' order
    assert respond.num_tokens == [[12, 12], [12, 12], [8, 8]]  # EOS counted
    assert respond(train[:3], 2) == texts  # greedy is deterministic across calls
    one_by_one = responders.make_responder("model", path=path, batch_size=1, max_new_tokens=12, temperature=0.0)
    assert one_by_one(train[:3], 2) == texts  # batching changes nothing
    # sampling reaches the sampler with its top-p and seed: a tiny nucleus is greedy, a seed repeats
    sampled = lambda **kw: responders.make_responder("model", path=path, max_new_tokens=12, temperature=1.0,
                                                     **kw)(train[:3], 2)
    assert sampled(top_p=1e-6, seed=5) == texts
    draw = sampled(seed=0)
    assert draw != texts and sampled(seed=0) == draw and sampled(seed=1) != draw


@pytest.mark.parametrize("flag, value, message", [("--limit", "-1", "expected an integer >= 1, got -1"),
                                                  ("--num-samples", "0", "expected an integer >= 1, got 0"),
                                                  ("--temperature", "-1", "expected a number >= 0, got -1.0"),
                                                  ("--seed", "-1", "expected an integer in [0, 2^63), got -1")])
def test_cli_numeric_flag_out_of_range(flag, value, message):
    """--limit -1 once printed all puzzles but the last, silently."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "responders.py"), "--train", "x.jsonl", "--puzzles",
                             "y.jsonl", flag, value], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == f"responders.py: error: {flag}: {message}"


def test_cli_duplicate_ids_are_refused(tmp_path):
    """The expert's samples are seeded by puzzle id: two puzzles of one id would get the same noise."""
    records = synthetic_records(2, seed=1)
    path = tmp_path / "p.jsonl"
    cello.write_jsonl_atomic(str(path), [records[0], {**records[1], "id": records[0]["id"]}])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "responders.py"), "--train", str(path), "--puzzles",
                             str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"responders.py: error: --puzzles {path}: duplicate id")


# ---- found by mutation testing: the one-type background, noise scale, trace genes, ties, defaults ----

def test_fit_expert_with_one_type_scores_against_a_type_that_lacks_the_gene():
    """One train type: its gene's score is log 11, as against one other type of one cell without it."""
    profile = responders.fit_expert([{"id": "t", "cells": [["A"]], "candidates": ["X"], "answer": ["X"]}])
    assert profile["types"]["X"] == {"A": pytest.approx(math.log(11), abs=1e-4)}


def test_gumbel_noise_is_scaled_by_the_temperature():
    """A tiny temperature adds tiny noise: the samples' answers are the greedy ones."""
    train = synthetic_records(60, seed=7, noise=0.2)
    test = synthetic_records(20, seed=8, split="test", noise=0.3)
    greedy = responders.make_responder("expert", train_records=train, temperature=0.0)(test, 1)
    tiny = responders.make_responder("expert", train_records=train, temperature=1e-7)(test, 4)
    assert all(set(texts) == {g[0]} for g, texts in zip(greedy, tiny))


def test_expert_trace_line_restates_exactly_the_top_eight_genes():
    """The trace's 'Cell k:' line copies the cell's first 8 genes (TRACE_GENES), not 7 or all 10."""
    genes = [f"g{i}" for i in range(10)]
    record = {"id": "p", "cells": [genes, ["y"]], "candidates": ["X", "Y"], "answer": ["X", "Y"]}
    profile = {"types": {"X": {"g0": 1.0}, "Y": {"y": 1.0}}, "cells": {"X": 1, "Y": 1}}
    text = responders.expert_response(record, profile, None, temperature=0.0)
    assert "\nCell 1: g0, g1, g2, g3, g4, g5, g6, g7 -> X\n" in text


def test_independent_breaks_ties_to_the_first_candidate():
    """Cells with no marker evidence (all scores 0) take the first candidate, as the docstring says."""
    profile = {"types": {"X": {"a": 1.0}, "Y": {"b": 1.0}}, "cells": {"X": 1, "Y": 1}}
    record = {"id": "p", "cells": [["h1"], ["h2"]], "candidates": ["X", "Y"], "answer": ["X", "Y"]}
    assert responders.independent_response(record, profile).endswith("<answer>X | X</answer>")


def test_expert_default_temperature_is_default_temperature():
    """make_responder('expert') without a temperature samples at DEFAULT_TEMPERATURE, not greedily."""
    train = synthetic_records(60, seed=7, noise=0.2)
    test = synthetic_records(20, seed=8, split="test", noise=0.3)
    default = responders.make_responder("expert", train_records=train)(test, 4)
    explicit = responders.make_responder("expert", train_records=train,
                                         temperature=responders.DEFAULT_TEMPERATURE)(test, 4)
    greedy = responders.make_responder("expert", train_records=train, temperature=0.0)(test, 4)
    assert default == explicit and default != greedy


def test_type_markers_match_labels_case_insensitively_and_stripped():
    """A candidate 'b cell ' finds the markers learned for 'B cell'."""
    profile = {"types": {"B cell": {"MS4A1": 1.0}}, "cells": {"B cell": 1}}
    assert responders.type_markers(profile, "b cell ") == {"MS4A1": 1.0}
