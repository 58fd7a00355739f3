"""reward.py: the format rule on each malformation, exact reward values, metrics, and a fuzz test."""
import pytest
from hypothesis import given, settings, strategies as st

import reward

GOLD = ["CD14+ Monocyte", "CD56+ NK", "CD19+ B", "CD34+"]


def resp(answer, think="reasoning", sep="\n"):
    return f"<think>{think}</think>{sep}<answer>{answer}</answer>"


# ---- the format rule: each malformation is -1 with its own reason ----

@pytest.mark.parametrize("text, reason", [
    ("", "empty response"),
    ("   \n ", "empty response"),
    ("<answer>A | B | C | D</answer>", "<think> occurs 0 times"),                       # missing tags
    ("<think>x</think>\n<answer>A | B | C | D", "</answer> occurs 0 times"),
    ("<think>x<think>y</think>\n<answer>A|B|C|D</answer>", "<think> occurs 2 times"),    # repeated tag
    ("<think>x</think>\n<answer>A|B|C|D</answer></answer>", "</answer> occurs 2 times"),
    ("<answer>A|B|C|D</answer>\n<think>x</think>", "tags out of order"),                 # wrong order
    ("</think>x<think>\n<answer>A|B|C|D</answer>", "tags out of order"),
    ("Sure! <think>x</think>\n<answer>A|B|C|D</answer>", "text before <think>"),
    ("x<think>x</think>\n<answer>A|B|C|D</answer>", "text before <think>"),              # one character
    ("<think>x</think>\n<answer>A|B|C|D</answer> Hope this helps", "text after </answer>"),
    ("\n <think>x</think>\n<answer>A|B|C|D</answer>", "text before <think>"),          # whitespace counts
    ("<think>x</think>\n<answer>A|B|C|D</answer>\n", "text after </answer>"),          # SPEC: not even a newline
    ("<think>x</think>\n<answer>A|B|C|D</answer> ", "text after </answer>"),
    ("<think>x</think><answer>A|B|C|D</answer>", "exactly one newline"),                 # missing newline
    ("<think>x</think>\n\n<answer>A|B|C|D</answer>", "exactly one newline"),
    ("<think>x</think> \n<answer>A|B|C|D</answer>", "exactly one newline"),
    (resp("A | B | C"), "3 labels (expected 4)"),                                        # label count
    (resp("A | B | C | D | E"), "5 labels (expected 4)"),
    (resp("A, B, C, D"), "1 labels (expected 4)"),                                       # commas do not split
    (resp("A | B | a | D"), "repeated label"),                                           # repeat (case-insensitive)
    (resp("A | B |  | D"), "empty label"),
    (resp("A | B | C |"), "empty label"),
    (resp("A | B | \n\t | D"), "empty label"),                                           # whitespace only
])
def test_malformed(text, reason):
    parsed = reward.parse_answer(text, 4)
    assert parsed["valid"] is False
    assert reason in parsed["error"]
    assert reward.reward(text, ["A", "B", "C", "D"]) == -1.0


def test_valid_with_a_multiline_think():
    text = "<think>line 1\nline 2 | with a bar</think>\n<answer> A |B|  C | D </answer>"
    parsed = reward.parse_answer(text, 4)
    assert parsed == {"valid": True, "labels": ["A", "B", "C", "D"], "error": None}
    # labels are stripped of any whitespace, not only spaces
    assert reward.parse_answer("<think>x</think>\n<answer>\nA |\tB\n</answer>", 2) == \
        {"valid": True, "labels": ["A", "B"], "error": None}


# ---- exact reward values ----

def test_partial_credit_exact_values():
    assert reward.reward(resp(" | ".join(GOLD)), GOLD) == 1.0
    three = ["CD14+ Monocyte", "CD56+ NK", "CD34+", "CD19+ B"]        # first two right, last two swapped
    assert reward.reward(resp(" | ".join(three)), GOLD) == 0.25      # (2/4 + 0) / 2
    wrong3 = ["CD14+ Monocyte", "CD56+ NK", "CD19+ B", "Dendritic"]   # 3 of 4 right (not a candidate: still valid)
    assert reward.reward(resp(" | ".join(wrong3)), GOLD) == 0.375    # (3/4 + 0) / 2
    none = ["CD56+ NK", "CD14+ Monocyte", "CD34+", "CD19+ B"]
    assert reward.reward(resp(" | ".join(none)), GOLD) == 0.0
    assert reward.reward(resp("a | c | b"), ["a", "b", "c"]) == pytest.approx(1 / 6)


def test_case_and_whitespace_insensitive():
    text = resp("  cd14+ MONOCYTE|cd56+ nk |CD19+ B| cd34+")
    assert reward.reward(text, GOLD) == 1.0
    assert reward.reward(resp(" | ".join(GOLD)), ["  cd14+ monocyte ", "CD56+ NK", "cd19+ b", "CD34+"]) == 1.0
    # case-folded, not just lower-cased: "ß" folds to "ss", so these two labels are one label
    assert reward.reward(resp("Strasse cell | b"), ["STRASSE CELL", "B"]) == 1.0
    assert reward.parse_answer(resp("straße cell | STRASSE cell"), 2)["error"] == "repeated label"
    assert reward.reward(resp("straße cell | b"), ["STRASSE CELL", "B"]) == 1.0  # and in matching the gold


def test_labels_with_commas():
    gold = ["CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell", "B cell"]
    assert reward.reward(resp("CD4-positive, alpha-beta T cell | CD8-positive, alpha-beta T cell | B cell"), gold) == 1.0
    swapped = resp("CD8-positive, alpha-beta T cell | CD4-positive, alpha-beta T cell | B cell")
    assert reward.reward(swapped, gold) == pytest.approx(1 / 6)


def test_lenient_labels_for_malformed():
    assert reward.parse_answer("blah <answer>A | A | B</answer> more", 3)["labels"] == ["A", "A", "B"]
    assert reward.parse_answer("<answer>x</answer><answer> P|Q </answer>", 2)["labels"] == ["P", "Q"]
    assert reward.parse_answer("no answer at all", 2)["labels"] is None
    assert reward.parse_answer("<think></think>\n<answer> </answer>", 2)["labels"] == []
    # an <answer> left open after the last </answer> does not hide the answer before it
    assert reward.parse_answer("<answer>A | B</answer><answer>", 2)["labels"] == ["A", "B"]
    assert reward.score("<answer>A | B</answer><answer>", ["A", "B"])["uniqueness"] == 1.0


def test_score_fields():
    s = reward.score(resp("A | C | B"), ["A", "B", "C"], num_tokens=12)
    assert s == {"n": 3, "valid": True, "correct": 1, "reward": pytest.approx(1 / 6), "exact": False,
                 "uniqueness": 1.0, "num_tokens": 12, "error": None}
    bad = reward.score("<answer>A | a | B</answer>", ["A", "B", "C"])
    assert (bad["valid"], bad["correct"], bad["reward"], bad["exact"]) == (False, 0, -1.0, False)
    assert bad["uniqueness"] == pytest.approx(2 / 3)
    assert reward.score("nothing", ["A", "B"])["uniqueness"] == 0.0
    # uniqueness is over the labels given, not over N: 2 distinct labels for 3 cells is 1.0
    short = reward.score("<answer>A | B</answer>", ["A", "B", "C"])
    assert (short["valid"], short["uniqueness"]) == (False, 1.0)


# ---- metrics on a hand-computed set ----

def test_metrics_hand_computed():
    g3, g4 = ["a", "b", "c"], ["a", "b", "c", "d"]
    scores = [
        reward.score(resp("a | b | c"), g3, num_tokens=10),        # N=3 exact: 3 correct
        reward.score(resp("a | c | b"), g3, num_tokens=20),        # N=3 valid: 1 correct
        reward.score(resp("a | b | c | d"), g4, num_tokens=30),    # N=4 exact: 4 correct
        reward.score("<answer>a | a | a | d</answer>", g4),        # N=4 malformed: 0 correct, uniqueness 2/4
    ]
    m = reward.metrics(scores)
    assert m["count"] == 4
    assert m["cell_accuracy"] == pytest.approx((3 + 1 + 4 + 0) / 14)
    assert m["batch_accuracy"] == 0.5
    assert m["format_validity"] == 0.75
    assert m["uniqueness"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert m["mean_length"] == 20.0                                 # over the 3 responses with a length
    assert m["mean_reward"] == pytest.approx((1 + 1 / 6 + 1 - 1) / 4)
    assert list(m["by_n"]) == [3, 4]
    assert list(reward.metrics(scores[::-1])["by_n"]) == [3, 4]  # by N, whatever the order of the scores
    n3, n4 = m["by_n"][3], m["by_n"][4]
    assert (n3["cell_accuracy"], n3["batch_accuracy"], n3["format_validity"], n3["count"]) == \
        (pytest.approx(4 / 6), 0.5, 1.0, 2)
    assert (n4["cell_accuracy"], n4["batch_accuracy"], n4["format_validity"], n4["uniqueness"]) == \
        (0.5, 0.5, 0.5, 0.75)
    assert n4["mean_length"] == 30.0
    # a response of 0 tokens has a length: it counts in the mean (only a missing length is left out)
    zero = [reward.score(resp("a"), ["a"], num_tokens=0), reward.score(resp("a"), ["a"], num_tokens=10)]
    assert reward.metrics(zero)["mean_length"] == 5.0
    assert reward.format_table({"x": m}).splitlines()[2] == "| x | 57.1% | 50.0% | 75.0% | 87.5% | 20.0 | 4 |"


def test_metrics_empty_and_table():
    m = reward.metrics([])
    assert m["count"] == 0 and m["cell_accuracy"] is None and m["by_n"] == {}
    one = reward.metrics([reward.score(resp("a | b"), ["a", "b"])])
    table = reward.format_table({"random": one, "empty": m})
    lines = table.splitlines()
    assert lines[0].startswith("| | cell-level | batch-level | format validity | uniqueness | mean length")
    assert lines[2] == "| random | 100.0% | 100.0% | 100.0% | 100.0% | - | 1 |"
    assert lines[3] == "| empty | - | - | - | - | - | 0 |"


# ---- fuzz: never raises, reward always in {-1} U [0, 0.5) U {1} ----

PIECES = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "|", " | ", "a", "B",
                          "CD4-positive, alpha-beta T cell", "<think", "answer>", "é", "\u0000", "🧬"])
TEXTS = st.one_of(
    st.text(),
    st.lists(PIECES, max_size=40).map("".join),
    st.lists(st.one_of(PIECES, st.text(max_size=5)), max_size=20).map("".join),
    st.permutations(["<think>", "x", "</think>", "\n", "<answer>", "a | b", "</answer>"]).map("".join),
)


def _check(text, gold):
    r = reward.reward(text, gold)
    assert r == -1.0 or 0.0 <= r < 0.5 or r == 1.0
    s = reward.score(text, gold, num_tokens=len(text))
    assert s["reward"] == r and 0.0 <= s["uniqueness"] <= 1.0
    assert (r == -1.0) == (not s["valid"])
    reward.metrics([s])


@settings(max_examples=400, deadline=None)
@given(TEXTS, st.lists(st.sampled_from(["a", "b", "B", "c", "x y", ""]), min_size=0, max_size=4))
def test_fuzz_never_raises(text, gold):
    _check(text, gold)


@settings(max_examples=100, deadline=None)
@given(st.permutations(["a", "b", "c"]), st.booleans())
def test_fuzz_valid_permutations(labels, upper):
    text = resp(" | ".join(x.upper() if upper else x for x in labels))
    c = sum(x == g for x, g in zip(labels, "abc"))
    assert reward.reward(text, ["a", "b", "c"]) == (c / 3 + (c == 3)) / 2


def test_huge_and_nested_inputs():
    big = "<think>" + "x" * 2_000_000 + "</think>\n<answer>" + " | ".join(["a", "b"]) + "</answer>"
    assert reward.reward(big, ["a", "b"]) == 1.0
    _check("<think>" * 100_000 + "</answer>" * 100_000, ["a"])
    _check("<think><think></think></think>\n<answer><answer>a</answer></answer>", ["a"])
    _check("|" * 1_000_000, ["a", "b"])
    assert reward.reward(None, ["a"]) == -1.0


def test_metrics_by_n_are_in_ascending_n_for_any_ns():
    """Ascending N, also where a set would not iterate in order ({9, 3} iterates 9 first in CPython)."""
    scores = [reward.score("<think>x</think>\n<answer>" + " | ".join(g) + "</answer>", g)
              for g in (list("abcdefghi"), list("abc"))]
    assert list(reward.metrics(scores)["by_n"]) == [3, 9]
