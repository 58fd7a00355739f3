"""puzzles.py: builder invariants on the bundled file, CELLxGENE-style metadata, bad inputs, import round trip."""
import json
import os
import subprocess
import sys
import warnings
from collections import Counter

import anndata
import numpy as np
import pandas as pd
import pytest

import cello
import puzzles
from conftest import DATA, ROOT

SMALL = ["--cell-type-key", "bulk_labels", "--donor-key", "none", "--context", "The cell is from a human donor.",
         "--n-min", "3", "--n-max", "5", "--genes", "20", "--puzzles-per-group", "12",
         "--val-puzzles-per-group", "3", "--test-puzzles-per-group", "4"]


def build(out_dir, *flags, data=DATA):
    puzzles.main(["build", str(data), "--out-dir", str(out_dir), *flags])
    return {split: cello.read_jsonl(os.path.join(out_dir, f"{split}.jsonl")) for split in puzzles.SPLITS}


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def pbmc():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(DATA)
    raw = adata.raw.X.toarray()
    return adata, raw, {name: i for i, name in enumerate(adata.obs_names)}, list(adata.raw.var_names)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("pbmc")
    return out, build(out, *SMALL)


# ---------------------------------------------------------------------------------------------
# builder invariants on the bundled file
# ---------------------------------------------------------------------------------------------

def test_record_invariants(built, pbmc):
    out, splits = built
    adata, raw, row_of, genes = pbmc
    col_of = {g: j for j, g in enumerate(genes)}
    labels = adata.obs["bulk_labels"].astype(str)
    for split, records in splits.items():
        assert records, split
        for r in records:
            n = len(r["cells"])
            assert 3 <= n <= 5 and r["split"] == split
            assert len(r["answer"]) == len(r["cell_ids"]) == n
            assert len(set(r["answer"])) == n                           # N distinct types
            assert r["candidates"] == sorted(r["answer"])
            assert [labels[c] for c in r["cell_ids"]] == r["answer"]    # the gold answer is each cell's label
            for cell_id, cell_genes in zip(r["cell_ids"], r["cells"]):
                assert len(cell_genes) == 20 and len(set(cell_genes)) == 20
                row = raw[row_of[cell_id]]
                cols = [col_of[g] for g in cell_genes]
                values = row[cols]
                assert np.all(np.diff(values) <= 0)                          # descending expression
                rest = np.delete(row, cols)
                assert rest.max() <= values[-1]                              # nothing left out beats the last one
                for a, b in zip(cols, cols[1:]):                             # ties: lower gene index first
                    if row[a] == row[b]:
                        assert a < b
                tied = set(np.flatnonzero(row == values[-1]).tolist())
                assert all(j in cols for j in tied if j < cols[-1])             # no lower-index tie was passed over
            text = cello.render_user(r)
            assert text.startswith("Context: The cell is from a human donor. \n\nCell 1: ")
    ids = [r["id"] for records in splits.values() for r in records]
    assert len(ids) == len(set(ids))


def test_no_cell_in_two_splits_and_no_repeated_puzzle(built):
    _, splits = built
    cells = {split: {c for r in records for c in r["cell_ids"]} for split, records in splits.items()}
    assert not cells["train"] & cells["test"] and not cells["val"] & cells["test"] and not cells["train"] & cells["val"]
    sets = [frozenset(r["cell_ids"]) for records in splits.values() for r in records]
    assert len(sets) == len(set(sets))



def test_exclude_puzzles_draws_only_new_cell_sets_from_the_same_split(built, tmp_path):
    out, splits = built
    rl = build(tmp_path / "rl", *SMALL, "--exclude-puzzles", str(out / "train.jsonl"))
    sft_sets = {frozenset(r["cell_ids"]) for r in splits["train"]}
    rl_sets = {frozenset(r["cell_ids"]) for r in rl["train"]}
    assert len(rl["train"]) == len(splits["train"]) and not rl_sets & sft_sets
    # the same split (it is made before any puzzle is drawn): no val or test cell in the new train
    # puzzles, and the same test puzzles
    held_out = {c for split in ("val", "test") for r in splits[split] for c in r["cell_ids"]}
    assert not {c for r in rl["train"] for c in r["cell_ids"]} & held_out
    assert rl["test"] == splits["test"]

def test_summary_matches_files(built):
    out, splits = built
    summary = json.load(open(out / "summary.json"))
    assert summary["split_mode"] == "cell" and summary["expression"] == ".raw.X"
    assert summary["gene_symbols"] == "var_names"
    for split, records in splits.items():
        assert summary["splits"][split]["puzzles"] == len(records)
        by_n = {str(n): sum(len(r["cells"]) == n for r in records) for n in (3, 4, 5)}
        assert summary["splits"][split]["by_n"] == {k: v for k, v in by_n.items() if v}
    assert len(splits["train"]) == 3 * 12 and len(splits["val"]) == 3 * 3 and len(splits["test"]) == 3 * 4
    assert sum(summary["splits"][split]["cells"] for split in puzzles.SPLITS) == 700
    assert sorted(os.listdir(out)) == ["summary.json", "test.jsonl", "train.jsonl", "val.jsonl"]   # no temp files left


def test_same_seed_same_files_other_seed_differs(built, tmp_path):
    out, _ = built
    build(tmp_path / "again", *SMALL)
    build(tmp_path / "seed1", *SMALL, "--seed", "1")
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert read(out / name) == read(tmp_path / "again" / name)
        assert read(out / name) != read(tmp_path / "seed1" / name)


def build_augmented(built, out_dir, *flags):
    """A build with a train-only augmentation flag, after checking that the flag changes nothing else:
    val and test files byte for byte, the train puzzles' cells, their order and answers."""
    out, plain = built
    augmented = build(out_dir, *SMALL, *flags)
    for name in ("val.jsonl", "test.jsonl"):
        assert read(out / name) == read(out_dir / name)
    for r, q in zip(augmented["train"], plain["train"], strict=True):
        assert (r["cell_ids"], r["answer"], r["candidates"]) == (q["cell_ids"], q["answer"], q["candidates"])
    return augmented


def test_train_gene_dropout_varies_train_lists_only(built, pbmc, tmp_path):
    """--train-gene-dropout: the same puzzles (cells, order); val and test files unchanged; each train
    cell's list is the top M of its row with some expressed genes dropped, so a cell that appears in
    several train puzzles shows different lists."""
    plain = built[1]
    adata, raw, row_of, genes = pbmc
    col_of = {g: j for j, g in enumerate(genes)}
    dropped = build_augmented(built, tmp_path / "dropout", "--train-gene-dropout", "0.3")
    lists = {}
    for r in dropped["train"]:
        for cell_id, cell_genes in zip(r["cell_ids"], r["cells"]):
            values = raw[row_of[cell_id]][[col_of[g] for g in cell_genes]]
            assert len(cell_genes) == 20 and np.all(np.diff(values) <= 0) and np.all(values > 0)
            lists.setdefault(cell_id, set()).add(tuple(cell_genes))
    repeated = [cell for cell in lists if sum(cell in r["cell_ids"] for r in dropped["train"]) > 1]
    assert repeated and all(len(lists[cell]) > 1 for cell in repeated)
    changed = sum(a != b for r, q in zip(dropped["train"], plain["train"]) for a, b in zip(r["cells"], q["cells"]))
    assert changed >= 0.95 * sum(len(r["cells"]) for r in plain["train"])  # P(top 20 all kept) = 0.7**20


def test_train_blank_cells_blanks_one_train_cell_per_chosen_puzzle(built, tmp_path):
    """--train-blank-cells: the same puzzles (cells, order, answers); val and test files unchanged; in
    each chosen train puzzle exactly one cell's list is replaced by M distinct genes from the train
    lists; with share 1 every train puzzle is chosen, with 0.5 about half."""
    plain = built[1]
    train_genes = {g for r in plain["train"] for cell in r["cells"] for g in cell}
    for share, low, high in (("1", 1.0, 1.0), ("0.5", 0.3, 0.7)):
        blank = build_augmented(built, tmp_path / share, "--train-blank-cells", share)
        changed = 0
        for r, q in zip(blank["train"], plain["train"]):
            diff = [i for i, (a, b) in enumerate(zip(r["cells"], q["cells"])) if a != b]
            assert len(diff) <= 1
            for i in diff:
                genes = r["cells"][i]
                assert len(genes) == 20 and len(set(genes)) == 20 and set(genes) <= train_genes
            changed += len(diff)
        assert low <= changed / len(plain["train"]) <= high


def test_blank_cells_draws_genes_by_train_frequency():
    """blank_cells draws each gene with probability proportional to the number of lists holding it: a gene
    in 3 of 4 lists is drawn far more often than one in 1 of 4; share 0 changes nothing."""
    records = [{"cells": [["A", "B"], ["A", "C"]]}, {"cells": [["A", "D"], ["E", "F"]]}]
    untouched = json.loads(json.dumps(records))
    assert puzzles.blank_cells(records, 0.0, np.random.default_rng(0)) == [None, None]
    assert records == untouched
    drawn = Counter()
    rng = np.random.default_rng(0)
    for _ in range(2000):
        trial = json.loads(json.dumps(untouched))
        (i, j) = puzzles.blank_cells(trial, 1.0, rng)
        drawn.update(trial[0]["cells"][i] + trial[1]["cells"][j])
    # weights: A 3, B..F 1 each (total 8); two draws without replacement, each from what is left:
    # P(A in a pair) = 1 - (5/8)(4/7) = 0.643, P(B in a pair) = 1/8 + (3/8)(1/5) + (4/8)(1/7) = 0.271
    assert abs(drawn["A"] / 4000 - 0.643) < 0.03 and abs(drawn["B"] / 4000 - 0.271) < 0.03


def test_barcode_suffix_batches(tmp_path):
    splits = build(tmp_path, *SMALL, "--batch-key", "barcode-suffix")
    records = [r for rs in splits.values() for r in rs]
    assert {r["batch"] for r in records} <= {str(k) for k in range(1, 9)} and len({r["batch"] for r in records}) == 8
    for r in records:
        assert all(c.endswith("-" + r["batch"]) for c in r["cell_ids"])   # a puzzle never mixes lanes


def test_max_puzzles_per_n_caps_each_n_in_the_whole_file(built, tmp_path):
    """SPEC's cap is per N per source file. 8 lanes drew 96 / 24 / 32 train / val / test puzzles of
    N = 3, 96 / 21 / 32 of N = 4 and 96 / 15 / 32 of N = 5 (some lanes have too few types for val).
    --max-puzzles-per-n 19 keeps 19 of each N in all, shared as drawn and rounded by largest remainder:
    N = 3: 12 / 3 / 4 exactly; N = 4: 12.24 / 2.68 / 4.08 -> 12 / 3 / 4; N = 5: 12.76 / 1.99 / 4.25 ->
    13 / 2 / 4. With 5, every N gets 3 / 1 / 1 (e.g. 3.16 / 0.79 / 1.05). The kept puzzles are a subset
    of the uncapped draw, over several lanes, numbered afresh."""
    uncapped = build(tmp_path / "all", *SMALL, "--batch-key", "barcode-suffix")
    assert {split: Counter(len(r["cells"]) for r in uncapped[split]) for split in puzzles.SPLITS} == {
        "train": {3: 96, 4: 96, 5: 96}, "val": {3: 24, 4: 21, 5: 15}, "test": {3: 32, 4: 32, 5: 32}}
    expected = {"19": {"train": {3: 12, 4: 12, 5: 13}, "val": {3: 3, 4: 3, 5: 2}, "test": {3: 4, 4: 4, 5: 4}},
                "5": {split: {3: share, 4: share, 5: share} for split, share in (("train", 3), ("val", 1), ("test", 1))}}
    for cap, kept in expected.items():
        capped = build(tmp_path / f"capped{cap}", *SMALL, "--batch-key", "barcode-suffix", "--max-puzzles-per-n", cap)
        for split in puzzles.SPLITS:
            assert Counter(len(r["cells"]) for r in capped[split]) == kept[split]
            everything = {(r["batch"], tuple(r["cell_ids"])) for r in uncapped[split]}
            assert {(r["batch"], tuple(r["cell_ids"])) for r in capped[split]} <= everything
            assert [int(r["id"][-5:]) for r in capped[split]] == list(range(sum(kept[split].values())))
        assert len({r["batch"] for r in capped["train"]}) > 1
        summary = json.load(open(tmp_path / f"capped{cap}" / "summary.json"))
        assert summary["splits"]["train"]["by_n"] == {str(n): count for n, count in kept["train"].items()}
    # a cap above what was drawn changes nothing
    same = build(tmp_path / "same", *SMALL, "--max-puzzles-per-n", "1000")
    assert same == build(tmp_path / "plain", *SMALL)


def test_default_demo_sizes(tmp_path, capsys):
    """The bundled file with the default flags gives the demo's sizes (N 4..8, M 50)."""
    splits = build(tmp_path, "--cell-type-key", "bulk_labels", "--donor-key", "none", "--context", "x.")
    assert [len(splits[s]) for s in puzzles.SPLITS] == [650, 50, 100]
    assert {len(r["cells"]) for r in splits["test"]} == {4, 5, 6, 7, 8}
    assert all(len(g) == 50 for r in splits["test"] for g in r["cells"])
    printed = capsys.readouterr().out
    assert "split: by cell" in printed and "expression: .raw.X" in printed


# ---------------------------------------------------------------------------------------------
# CELLxGENE-style files: metadata context, donor split, counts layer, feature_name
# ---------------------------------------------------------------------------------------------

def write_h5ad(path, X, obs, var_names, feature_name=None, counts=None, raw=None):
    var = pd.DataFrame(index=var_names)
    if feature_name is not None:
        var["feature_name"] = feature_name
    adata = anndata.AnnData(X=X, obs=pd.DataFrame(obs, index=[f"cell{i}" for i in range(len(X))]), var=var)
    if counts is not None:
        adata.layers["counts"] = counts
    if raw is not None:
        adata.raw = anndata.AnnData(X=raw, var=var)
    adata.write_h5ad(path)
    return path


def cellxgene_like(path, donors=4, types=5, per_type=3, genes=12, seed=0, **changes):
    """donors x types x per_type cells; counts layer with a distinct order from X; metadata per donor."""
    rng = np.random.default_rng(seed)
    n = donors * types * per_type
    counts = rng.permutation(n * genes).reshape(n, genes).astype(np.float32) + 1   # all distinct, > 0
    obs = {"cell_type": [f"type {t}, subtype" for d in range(donors) for t in range(types) for _ in range(per_type)],
           "donor_id": [f"D{d}" for d in range(donors) for _ in range(types * per_type)],
           "sex": ["female" if d % 2 == 0 else "male" for d in range(donors) for _ in range(types * per_type)],
           "development_stage": ["66-year-old stage"] * n,
           "self_reported_ethnicity": ["unknown" if d % 2 == 0 else "European"
                                       for d in range(donors) for _ in range(types * per_type)],
           "tissue": ["lung"] * n,
           "disease": ["normal" if d % 2 == 0 else "COVID-19" for d in range(donors) for _ in range(types * per_type)]}
    obs.update(changes.pop("obs", {}))
    feature_name = [f"G{j}_ENSG{j:011d}" if j % 3 == 0 else f"G{j}" for j in range(genes)]
    args = dict(X=-counts, obs=obs, var_names=[f"ENSG{j:011d}" for j in range(genes)],
                feature_name=feature_name, counts=counts)
    args.update(changes)
    return write_h5ad(path, **args), counts


def test_raw_without_feature_name_takes_the_symbols_of_the_main_var(tmp_path, capsys):
    """A scanpy-style file: counts in .raw (all 12 genes, var without feature_name), X for the first 10
    genes only, with feature_name. The symbols come from X's var where it lists the gene; the other two
    keep their var_names."""
    path, counts = cellxgene_like(tmp_path / "cxg.h5ad")
    adata = anndata.read_h5ad(path)
    del adata.layers["counts"]
    adata.raw = anndata.AnnData(X=counts, var=pd.DataFrame(index=adata.var_names))  # no feature_name
    adata[:, :10].copy().write_h5ad(tmp_path / "scanpy.h5ad")
    splits = build(tmp_path / "out", "--n-min", "3", "--n-max", "3", "--genes", "12", "--val-frac", "0.25",
                   "--test-frac", "0.25", data=tmp_path / "scanpy.h5ad")
    assert "gene symbols: var['feature_name'] for 10 of 12 genes, else var_names" in capsys.readouterr().out
    genes = {g for records in splits.values() for r in records for cell in r["cells"] for g in cell}
    assert genes == {f"G{j}" for j in range(10)} | {"ENSG00000000010", "ENSG00000000011"}


def test_cellxgene_metadata_donor_split_counts_layer(tmp_path, capsys):
    path, counts = cellxgene_like(tmp_path / "cxg.h5ad")
    splits = build(tmp_path / "out", "--n-min", "3", "--n-max", "5", "--genes", "4", "--puzzles-per-group", "5",
                   "--val-puzzles-per-group", "5", "--test-puzzles-per-group", "5", "--val-frac", "0.25",
                   "--test-frac", "0.25", data=path)
    printed = capsys.readouterr().out
    assert "expression: layers['counts']" in printed and "split: by donor" in printed
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["split_mode"] == "donor" and summary["gene_symbols"] == "var['feature_name']"
    donors = {split: {r["donor"] for r in records} for split, records in splits.items()}
    assert [len(donors[s]) for s in puzzles.SPLITS] == [2, 1, 1] and len(set.union(*donors.values())) == 4
    assert not (donors["train"] & donors["test"]) and not (donors["val"] & donors["test"])
    sentences = {"D0": "The cell is from a female at the 66-year-old stage, originating from the lung. "
                       "The patient is healthy with no diagnosed disease.",
                 "D1": "The cell is from a male at the 66-year-old stage with European background, originating "
                       "from the lung. The patient has been diagnosed with COVID-19."}
    for records in splits.values():
        for r in records:
            assert r["context"] == sentences["D0" if r["donor"] in ("D0", "D2") else "D1"]
            for cell_id, genes in zip(r["cell_ids"], r["cells"]):
                row = counts[int(cell_id[4:])]
                expected = [f"G{j}" for j in np.argsort(-row)[:4]]   # counts are distinct: no ties; suffix stripped
                assert genes == expected


def test_context_sentence():
    assert puzzles.context_sentence("female", "66-year-old stage", None, "lung", "normal") == (
        "The cell is from a female at the 66-year-old stage, originating from the lung. "
        "The patient is healthy with no diagnosed disease.")
    assert puzzles.context_sentence(None, None, None, "blood", None) == "The cell is from, originating from the blood."
    assert puzzles.context_sentence(None, None, None, None, None) is None
    assert [puzzles.present(v) for v in ("unknown", " NA ", float("nan"), "", "male")] == [None, None, None, None, "male"]
    assert puzzles.present(pd.NA) is None   # a nullable column's missing value, which prints as "<NA>"
    # SPEC.md's literal assembly, kept as the released format has it: disease alone gives "from. The ..."
    assert puzzles.context_sentence(None, None, None, None, "COVID-19") == (
        "The cell is from. The patient has been diagnosed with COVID-19.")


def test_context_sentence_flag_adds_known_values_in_order(tmp_path):
    smoking = ["non-smoker" if d == 0 else "unknown" for d in range(4) for _ in range(15)]
    stage = ["stage II" if d < 2 else "" for d in range(4) for _ in range(15)]
    path, _ = cellxgene_like(tmp_path / "f.h5ad", obs={"smoking_status": smoking, "tumor_stage": stage})
    splits = build(tmp_path / "out", *FLAGS, "--val-frac", "0.25", "--test-frac", "0.25",
                   "--context-sentence", "smoking_status=The patient is a {}.",
                   "--context-sentence", "tumor_stage=The tumour is at {}.", data=path)
    base = {0: "The cell is from a female at the 66-year-old stage, originating from the lung. "
               "The patient is healthy with no diagnosed disease.",
            1: "The cell is from a male at the 66-year-old stage with European background, originating "
               "from the lung. The patient has been diagnosed with COVID-19."}
    expected = {"D0": base[0] + " The patient is a non-smoker. The tumour is at stage II.",
                "D1": base[1] + " The tumour is at stage II.", "D2": base[0], "D3": base[1]}
    records = [r for rs in splits.values() for r in rs]
    assert {r["donor"] for r in records} == set(expected)
    assert all(r["context"] == expected[r["donor"]] for r in records)
    # with --context the sentences follow the fixed text
    splits = build(tmp_path / "fixed", *FLAGS, "--val-frac", "0.25", "--test-frac", "0.25", "--context", "Lung.",
                   "--context-sentence", "smoking_status=The patient is a {}.", data=path)
    assert {r["context"] for rs in splits.values() for r in rs} == {"Lung.", "Lung. The patient is a non-smoker."}


@pytest.mark.parametrize("spec, fragment", [
    ("smoking_status", "expected COLUMN=SENTENCE with one {} for the value"),
    ("smoking_status=The patient smokes.", "expected COLUMN=SENTENCE"),
    ("=The patient is a {}.", "expected COLUMN=SENTENCE"),
    ("smoking=The patient is a {}.", "--context-sentence 'smoking': no such obs column"),
])
def test_context_sentence_flag_errors(tmp_path, spec, fragment):
    path, _ = cellxgene_like(tmp_path / "f.h5ad")
    expect_error(tmp_path, path, FLAGS + ["--context-sentence", spec], fragment)


def test_cells_without_donor_are_left_out_not_pooled(tmp_path, capsys):
    """4 real donors plus 40 cells with no donor (NaN, "unknown"): the split is by the 4 donors only, the 40
    cells are in no puzzle and are counted; a missing batch is no batch, not a batch named "nan"."""
    donor_ids = [f"d{d}" if d < 4 else (np.nan if d == 4 else "unknown") for d in range(6) for _ in range(20)]
    lanes = ["L1" if i % 2 else np.nan for i in range(120)]
    path, _ = cellxgene_like(tmp_path / "f.h5ad", donors=6, per_type=4, obs={"donor_id": donor_ids, "lane": lanes})
    splits = build(tmp_path / "out", "--n-min", "3", "--n-max", "4", "--genes", "4", "--val-frac", "0.25",
                   "--test-frac", "0.25", "--batch-key", "lane", "--puzzles-per-group", "5", data=path)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert [summary["splits"][s]["donors"] for s in puzzles.SPLITS] == [["d1", "d3"], ["d0"], ["d2"]]
    assert summary["skipped_cells"]["no donor"] == 40
    assert "'no donor': 40" in capsys.readouterr().out
    records = [r for rs in splits.values() for r in rs]
    assert {r["donor"] for r in records} == {"d0", "d1", "d2", "d3"}
    assert all(int(c[4:]) < 80 for r in records for c in r["cell_ids"])     # no donor-less cell in a puzzle
    assert {r["batch"] for r in records} == {"L1", None}


def test_no_cell_with_a_donor(tmp_path):
    path, _ = cellxgene_like(tmp_path / "f.h5ad", obs={"donor_id": [np.nan] * 60})
    message = expect_error(tmp_path, path, FLAGS)
    assert message == ("puzzles.py: error: --donor-key 'donor_id': no usable cell of " + str(path) + " has a donor "
                       "(every value is missing); pass --donor-key none to treat the file as one donor")


@pytest.mark.parametrize("donors, fracs, expected", [
    (5, ["--val-frac", "0.35", "--test-frac", "0.6"],
     "--val-frac 0.35 and --test-frac 0.6 leave the train split empty: 5 donors go 0 to train, 2 to val, 3 to test"),
    (3, ["--val-frac", "0.1", "--test-frac", "0.6"],
     "--val-frac 0.1 and --test-frac 0.6 leave the val split empty: 3 donors go 1 to train, 0 to val, 2 to test"),
    (2, ["--val-frac", "0.35", "--test-frac", "0.6"],
     "--val-frac 0.35 and --test-frac 0.6 leave the train split empty: 30 cells (split per donor and type) go 0 to "
     "train, 10 to val, 20 to test"),
])
def test_fractions_that_leave_a_split_empty(tmp_path, donors, fracs, expected):
    path, _ = cellxgene_like(tmp_path / "f.h5ad", donors=donors)
    message = expect_error(tmp_path, path, FLAGS + fracs)
    assert message == f"puzzles.py: error: {expected}; choose fractions that leave each split at least one"


def test_no_val_split_asked_for_is_no_error(tmp_path):
    path, _ = cellxgene_like(tmp_path / "f.h5ad", donors=3)
    splits = build(tmp_path / "out", *FLAGS, "--val-frac", "0", "--test-frac", "0.6", data=path)
    assert splits["val"] == [] and splits["train"] and splits["test"]


def test_group_with_too_few_types_is_skipped_and_counted(tmp_path):
    # D3 has only 2 types: every (split, D3, N >= 3) pair is skipped, the rest still builds.
    obs_types = [f"t{t}" for d in range(3) for t in range(5) for _ in range(3)] + ["t0"] * 9 + ["t1"] * 6
    path, _ = cellxgene_like(tmp_path / "f.h5ad", obs={"cell_type": obs_types})
    build(tmp_path / "out", "--n-min", "3", "--n-max", "4", "--genes", "4", "--val-frac", "0.25", "--test-frac", "0.25",
          "--puzzles-per-group", "2", "--val-puzzles-per-group", "2", "--test-puzzles-per-group", "2", data=path)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["skipped_group_n_pairs_with_too_few_types"] == 2


# ---------------------------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, no output files
# ---------------------------------------------------------------------------------------------

def expect_error(tmp_path, data, flags, *fragments):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        puzzles.main(["build", str(data), "--out-dir", str(out), *flags])
    message = str(e.value.code)
    assert message.startswith("puzzles.py: error: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert not out.exists() or os.listdir(out) == []
    return message


FLAGS = ["--n-min", "3", "--n-max", "4", "--genes", "4"]


def test_missing_file(tmp_path):
    expect_error(tmp_path, tmp_path / "nope.h5ad", FLAGS, "nope.h5ad: no such file")



def test_exclude_puzzles_errors(tmp_path):
    expect_error(tmp_path, DATA, SMALL + ["--exclude-puzzles", str(tmp_path / "none.jsonl")],
                 "--exclude-puzzles", "none.jsonl: no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"cell_ids": ["AAAGCCTGGCTAAC-1"]}\n{"id": "no cells"}\n')
    expect_error(tmp_path, DATA, SMALL + ["--exclude-puzzles", str(bad)], "bad.jsonl line 2", '"cell_ids"')
    bad.write_text('{"cell_ids": ["AAAGCCTGGCTAAC-1"]}\n{"cell_ids": ["AAAG')  # cut short by a crash
    expect_error(tmp_path, DATA, SMALL + ["--exclude-puzzles", str(bad)], "bad.jsonl line 2: not valid JSON")
    bad.write_text('{"cell_ids": ["NOT-A-BARCODE"]}\n')
    expect_error(tmp_path, DATA, SMALL + ["--exclude-puzzles", str(bad)], "line 1", "'NOT-A-BARCODE' is not in")
    bad.write_bytes(b'{"cell_ids": ["\xff"]}\n')
    message = expect_error(tmp_path, DATA, SMALL + ["--exclude-puzzles", str(bad)])
    assert message == f"puzzles.py: error: --exclude-puzzles {bad}: not UTF-8 text"

def test_not_an_h5ad(tmp_path):
    path = tmp_path / "text.h5ad"
    path.write_text("cell,type\n")
    expect_error(tmp_path, path, FLAGS, "text.h5ad: not a readable .h5ad file")


def test_cell_types_that_differ_only_in_case_are_refused(tmp_path):
    """"T cell" and "t cell" would be two candidates that the reward counts as one label."""
    types = [f"type {t}, subtype" for d in range(4) for t in range(5) for _ in range(3)]  # cellxgene_like's
    types[-1] = "TYPE 4, subtype"
    path, _ = cellxgene_like(tmp_path / "f.h5ad", obs={"cell_type": types})
    expect_error(tmp_path, path, FLAGS, "--cell-type-key 'cell_type': cell types ['TYPE 4, subtype', 'type 4, subtype']",
                 "differ only in case or surrounding spaces")


def test_a_cell_type_holding_the_answer_separator_is_refused(tmp_path):
    types = [f"type {t}, subtype" for d in range(4) for t in range(5) for _ in range(3)]
    types[:3] = ["Monocyte | CD14+"] * 3
    path, _ = cellxgene_like(tmp_path / "f.h5ad", obs={"cell_type": types})
    expect_error(tmp_path, path, FLAGS, "--cell-type-key 'cell_type': cell type 'Monocyte | CD14+' contains '|'")


def test_a_cell_type_holding_a_line_break_is_refused(tmp_path):
    """The prompt lists one candidate per line: "T cell\nactivated" would read as two candidates."""
    types = [f"type {t}, subtype" for d in range(4) for t in range(5) for _ in range(3)]
    types[:3] = ["T cell\nactivated"] * 3
    path, _ = cellxgene_like(tmp_path / "f.h5ad", obs={"cell_type": types})
    expect_error(tmp_path, path, FLAGS,
                 "--cell-type-key 'cell_type': cell type 'T cell\\nactivated' contains a line break")


def test_repeated_obs_names_are_refused(tmp_path):
    """Records name cells by obs name (cell_ids): two cells of one name would defeat --exclude-puzzles."""
    path, _ = cellxgene_like(tmp_path / "f.h5ad")
    adata = anndata.read_h5ad(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about the repeats we are making on purpose
        names = list(adata.obs_names)
        names[6] = names[0]
        adata.obs_names = names
        adata.write_h5ad(path)
    expect_error(tmp_path, path, FLAGS, "f.h5ad: obs names are not unique (1 repeated, e.g. 'cell0')",
                 "obs_names_make_unique")


def test_context_columns_that_are_all_unknown_give_the_unknown_donor_sentence(tmp_path):
    n = 4 * 5 * 3
    unknown = {key: ["unknown"] * n for key in puzzles.CONTEXT_KEYS.values()}
    path, _ = cellxgene_like(tmp_path / "f.h5ad", obs=unknown)
    splits = build(tmp_path / "out", *FLAGS, "--puzzles-per-group", "2", data=path)
    assert {r["context"] for records in splits.values() for r in records} == {"The cell is from an unknown donor."}


def test_missing_obs_key_lists_keys(tmp_path):
    path, _ = cellxgene_like(tmp_path / "f.h5ad")
    expect_error(tmp_path, path, FLAGS + ["--cell-type-key", "celltype"],
                 "--cell-type-key 'celltype': no such obs column", "obs columns are: cell_type, donor_id, sex")
    expect_error(tmp_path, DATA, SMALL[:2] + ["--context", "x."], "--donor-key 'donor_id'", "bulk_labels, n_genes")


def test_nan_matrix(tmp_path):
    path, counts = cellxgene_like(tmp_path / "f.h5ad")
    counts[3, 2] = np.nan
    write_h5ad(path, X=counts, obs=anndata.read_h5ad(path).obs, var_names=[f"g{j}" for j in range(counts.shape[1])])
    expect_error(tmp_path, path, FLAGS, "expression matrix X holds NaN")


def test_scaled_matrix(tmp_path):
    """Negative values are z-scores, not expression: ranking them would list the genes above their mean."""
    path, counts = cellxgene_like(tmp_path / "f.h5ad")
    write_h5ad(path, X=-counts, obs=anndata.read_h5ad(path).obs, var_names=[f"g{j}" for j in range(counts.shape[1])])
    expect_error(tmp_path, path, FLAGS, "expression matrix X holds negative values (scaled data?)")


def test_a_context_column_named_on_the_command_line_must_exist(tmp_path):
    """A misspelt --tissue-key would silently drop the tissue from every prompt; an absent default is fine."""
    path, _ = cellxgene_like(tmp_path / "f.h5ad")
    expect_error(tmp_path, path, FLAGS + ["--tissue-key", "tisue"], "--tissue-key 'tisue': no such obs column",
                 "obs columns are: cell_type, donor_id, sex")


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as e:
        puzzles.main(["build", str(DATA), "--out-dir", str(tmp_path / "taken"), *SMALL])
    assert str(e.value.code) == f"puzzles.py: error: --out-dir {tmp_path / 'taken'}: cannot create the folder (File exists)"


def test_no_expression_matrix(tmp_path):
    path, _ = cellxgene_like(tmp_path / "f.h5ad")
    adata = anndata.read_h5ad(path)
    anndata.AnnData(obs=adata.obs, var=adata.var).write_h5ad(path)  # obs and var only: X is None, no layers
    expect_error(tmp_path, path, FLAGS, "no expression matrix: none of layers['counts'], .raw or X holds one (layers: none)")


def test_non_numeric_matrix(tmp_path):
    path, counts = cellxgene_like(tmp_path / "f.h5ad")
    text = counts.astype(int).astype(str).astype(object)
    write_h5ad(path, X=text, obs=anndata.read_h5ad(path).obs, var_names=[f"g{j}" for j in range(counts.shape[1])])
    expect_error(tmp_path, path, FLAGS, "expression matrix X is not numeric")


def test_duplicate_gene_names(tmp_path):
    genes = 12
    path, _ = cellxgene_like(tmp_path / "f.h5ad", feature_name=["G1"] * 2 + [f"G{j}" for j in range(2, genes)])
    expect_error(tmp_path, path, FLAGS, "duplicate gene names in var['feature_name']", "G1")


def test_no_puzzle_at_all(tmp_path):
    path, _ = cellxgene_like(tmp_path / "f.h5ad")
    expect_error(tmp_path, path, ["--n-min", "6", "--n-max", "8", "--genes", "4"], "no puzzle could be built")
    # no cell shows 12 expressed genes (all genes but the first are zero): the cells are the cause, not --n-min
    path, counts = cellxgene_like(tmp_path / "g.h5ad")
    counts[:, 1:] = 0
    cellxgene_like(tmp_path / "g.h5ad", counts=counts, X=counts)
    expect_error(tmp_path, path, ["--genes", "2"], "no usable cell in", "at least --genes 2 expressed genes",
                 "'fewer than 2 expressed genes': 60")


@pytest.mark.parametrize("flags, fragment", [
    (["--n-min", "1"], "--n-min must be >= 2"),
    (["--n-min", "5", "--n-max", "4"], "--n-max must be >= --n-min"),
    (["--genes", "0"], "--genes must be >= 1"),
    (["--train-gene-dropout", "1"], "--train-gene-dropout must be in [0, 1)"),
    (["--train-blank-cells", "1.5"], "--train-blank-cells must be in [0, 1]"),
    (["--genes", "13"], "--genes 13 is more than the 12 distinct genes"),
    (["--test-frac", "0"], "--val-frac and --test-frac"),
    (["--test-puzzles-per-group", "-1"], "must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0 (got -1)"),
    (["--max-puzzles-per-n", "0"], "--max-puzzles-per-n must be >= 1 (got 0)"),
])
def test_out_of_range(tmp_path, flags, fragment):
    path, _ = cellxgene_like(tmp_path / "f.h5ad")
    expect_error(tmp_path, path, ["--n-min", "3", "--n-max", "4", "--genes", "4", *flags], fragment)


def test_barcode_suffix_missing(tmp_path):
    path, _ = cellxgene_like(tmp_path / "f.h5ad")
    expect_error(tmp_path, path, FLAGS + ["--batch-key", "barcode-suffix"], "'cell0' does not end in -<lane number>")


def test_no_context_metadata(tmp_path):
    expect_error(tmp_path, DATA, SMALL[:4], "has none of the context columns", "pass --context")


def test_command_line_exit_code(tmp_path):
    """The real process: status 1 and the one line on stderr, nothing on stdout."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "puzzles.py"), "build", str(tmp_path / "x.h5ad"),
                             "--out-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"puzzles.py: error: {tmp_path / 'x.h5ad'}: no such file"
    assert not (tmp_path / "out").exists()
    (tmp_path / "x.h5ad").mkdir()  # a folder where the file should be: said so, not "no such file"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "puzzles.py"), "build", str(tmp_path / "x.h5ad"),
                             "--out-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.strip() == f"puzzles.py: error: {tmp_path / 'x.h5ad'}: is a folder (expected an .h5ad file)"


# ---------------------------------------------------------------------------------------------
# import: released records round-trip byte for byte
# ---------------------------------------------------------------------------------------------

def released(cells, candidates, answer, context="The cell is from a female at the 66-year-old stage, originating "
             "from the lung. The patient is healthy with no diagnosed disease.", sep=" \n\n", tail="",
             system=None, think="Cell 1 shows ..."):
    user = ("Context: " + context + sep + "\n".join(f"Cell {i + 1}: " + ", ".join(g) for i, g in enumerate(cells))
            + "\n\nMatch the cells above to one of the following cell types:\n" + "\n".join(candidates) + tail)
    return {"system_msg": system or cello.SYSTEM_TEMPLATE.format(n=len(cells)), "user_msg": user,
            "assistant_msg": f"<think>{think}</think>\n<answer>{' | '.join(answer)}</answer>"}


COMMA = ["CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell", "B cell"]
CELLS = [["CD8A", "CD8B", "GZMK"], ["MS4A1", "CD79A", "IGHM"], ["CD4", "IL7R", "LTB"]]
ROWS = [
    released(CELLS, sorted(COMMA), [COMMA[1], COMMA[2], COMMA[0]]),
    released(CELLS, sorted(COMMA), [COMMA[1], COMMA[2], COMMA[0]], sep="\n\n"),                 # no space
    released(CELLS, sorted(COMMA), [COMMA[1], COMMA[2], COMMA[0]], tail="\n"),                  # trailing newline
    released(CELLS[:2], ["B cell", "T cell"], ["t cell", "B CELL"], system="Custom system.\n"),  # case differs
]


def run_import(tmp_path, rows, name="cellpuzzles_test.jsonl", *flags):
    src = tmp_path / name
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    puzzles.main(["import", str(src), "--out", str(tmp_path / "out.jsonl"), *flags])
    return cello.read_jsonl(tmp_path / "out.jsonl")


def test_import_round_trip(tmp_path):
    records = run_import(tmp_path, ROWS)
    assert len(records) == 4
    for row, r in zip(ROWS, records):
        assert cello.render_user(r) == row["user_msg"]
        assert cello.render_system(r) == row["system_msg"]
        assert r["response"] == row["assistant_msg"] and r["split"] == "test"
    assert records[0]["cells"] == CELLS and records[0]["candidates"] == sorted(COMMA)
    assert records[0]["answer"] == [COMMA[1], COMMA[2], COMMA[0]]
    assert records[0]["context"].endswith("no diagnosed disease.") and "layout" not in records[0]
    assert records[1]["layout"] == {"context_sep": "\n\n"}
    assert records[2]["layout"] == {"tail": "\n"}
    assert records[3]["layout"] == {"system": "Custom system.\n"} and records[3]["answer"] == ["T cell", "B cell"]


def test_import_of_built_records(built, tmp_path):
    """Built puzzles rendered to the released layout import back to the same content."""
    _, splits = built
    rows = [{"system_msg": cello.render_system(r), "user_msg": cello.render_user(r),
             "assistant_msg": "<answer>" + " | ".join(r["answer"]) + "</answer>"} for r in splits["val"]]
    records = run_import(tmp_path, rows, "reasoning.jsonl")
    for r, back in zip(splits["val"], records):
        assert (back["context"], back["cells"], back["candidates"], back["answer"]) == \
            (r["context"], r["cells"], r["candidates"], r["answer"])
        assert "layout" not in back and back["split"] == "train"


def test_import_split_from_the_file_name_is_a_whole_word(tmp_path):
    assert run_import(tmp_path, ROWS[:1], "test-00000-of-00001.jsonl")[0]["split"] == "test"
    assert run_import(tmp_path, ROWS[:1], "cellpuzzles_train_latest.jsonl")[0]["split"] == "train"


def test_import_empty_system_message_round_trips(tmp_path):
    row = dict(ROWS[0], system_msg="")
    record = run_import(tmp_path, [row])[0]
    assert record["layout"] == {"system": ""} and cello.render_system(record) == ""


def test_import_bare_answer_and_split_flag(tmp_path):
    row = dict(ROWS[0], assistant_msg="CD8-positive, alpha-beta T cell | B cell | CD4-positive, alpha-beta T cell")
    records = run_import(tmp_path, [row], "x.jsonl", "--split", "val")
    assert records[0]["answer"] == [COMMA[1], COMMA[2], COMMA[0]] and records[0]["split"] == "val"


@pytest.mark.parametrize("change, fragment", [
    ({"user_msg": "Hello"}, "does not start with 'Context: '"),
    ({"assistant_msg": "<answer>B cell</answer>"}, "1 answer labels, expected 3"),
    ({"assistant_msg": "<answer>B cell | NK cell | T cell</answer>"}, "do not use every candidate exactly once"),
    ({"assistant_msg": "<answer>B cell | B cell | " + COMMA[0] + "</answer>"}, "do not use every candidate exactly once"),
    ({"user_msg": ROWS[0]["user_msg"].replace(sorted(COMMA)[1], "B CELL ")}, "repeat a cell type"),
    ({"user_msg": ROWS[0]["user_msg"].replace("Cell 2: ", "Cell 7: ")}, "cell line 2 does not start with 'Cell 2: '"),
    ({"user_msg": ROWS[0]["user_msg"] + "\nExtra"}, "3 cells but 4 candidates"),
    # an <answer> left open (a response cut short) is no answer; it is not read as a bare "a | b | c" answer
    ({"assistant_msg": "<think>x</think>\n<answer>B cell | " + COMMA[0]}, "0 answer labels, expected 3"),
    ({"system_msg": None}, "expected string fields"),
])
def test_import_errors_name_the_line(tmp_path, change, fragment):
    rows = [ROWS[0], ROWS[1], dict(ROWS[0], **change)]
    with pytest.raises(SystemExit) as e:
        run_import(tmp_path, rows)
    message = str(e.value.code)
    assert message.startswith(f"puzzles.py: error: {tmp_path / 'cellpuzzles_test.jsonl'}:3: ") and fragment in message
    assert not (tmp_path / "out.jsonl").exists()


def test_import_not_utf8(tmp_path):
    src = tmp_path / "cellpuzzles_test.jsonl"
    src.write_bytes(json.dumps(ROWS[0]).encode("utf-8") + b"\n" + json.dumps(ROWS[1]).encode("latin-1")[:-2] + b"\xe9\"}\n")
    with pytest.raises(SystemExit) as e:
        puzzles.main(["import", str(src), "--out", str(tmp_path / "out.jsonl")])
    assert str(e.value.code) == f"puzzles.py: error: {src}: not UTF-8 text"
    assert not (tmp_path / "out.jsonl").exists()


def test_import_out_that_is_a_folder(tmp_path):
    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(SystemExit) as e:
        run_import(tmp_path, ROWS)
    assert str(e.value.code) == (f"puzzles.py: error: --out {tmp_path / 'out.jsonl'}: is a folder "
                                 "(expected the path of the JSONL file to write)")
    assert sorted(os.listdir(tmp_path)) == ["cellpuzzles_test.jsonl", "out.jsonl"]  # no temporary file left


@pytest.mark.parametrize("out", ["new/", ""])
def test_import_out_that_names_no_file(tmp_path, monkeypatch, out):
    """A trailing slash or an empty --out names a folder: one line, nothing written."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "cellpuzzles_test.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(SystemExit) as e:
        puzzles.main(["import", str(src), "--out", out])
    assert str(e.value.code) == f"puzzles.py: error: --out {out!r}: names no file (expected the path of the JSONL file to write)"
    assert os.listdir(tmp_path) == ["cellpuzzles_test.jsonl"]


def test_import_a_parquet_file_that_is_not_parquet(tmp_path, monkeypatch):
    """A git-lfs pointer cloned without LFS, or a file cut short: the reader's error in one line."""
    import pandas

    def unreadable(path):
        raise ValueError("Parquet magic bytes not found in footer.\nEither the file is corrupted or this is not a parquet file.")

    monkeypatch.setattr(pandas, "read_parquet", unreadable)
    src = tmp_path / "test-00000-of-00001.parquet"
    src.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(SystemExit) as e:
        puzzles.main(["import", str(src), "--out", str(tmp_path / "out.jsonl")])
    assert str(e.value.code) == (f"puzzles.py: error: {src}: not a readable parquet file (ValueError: Parquet magic "
                                 "bytes not found in footer. Either the file is corrupted or this is not a parquet file.)")


def test_import_json_array(tmp_path):
    src = tmp_path / "released.json"
    src.write_text(json.dumps(ROWS))
    puzzles.main(["import", str(src), "--out", str(tmp_path / "out.jsonl")])
    records = cello.read_jsonl(tmp_path / "out.jsonl")
    assert [cello.render_user(r) for r in records] == [row["user_msg"] for row in ROWS]


def test_import_parquet(tmp_path):
    """Parquet through pandas: round-trips with pyarrow installed, else one clear line about pyarrow."""
    src = tmp_path / "test-00000-of-00001.parquet"
    try:
        pd.DataFrame(ROWS).to_parquet(src)
    except ImportError:
        src.write_bytes(b"PAR1")
        with pytest.raises(SystemExit) as e:
            puzzles.main(["import", str(src), "--out", str(tmp_path / "out.jsonl")])
        assert "reading parquet needs pyarrow" in str(e.value.code)
        return
    puzzles.main(["import", str(src), "--out", str(tmp_path / "out.jsonl")])
    records = cello.read_jsonl(tmp_path / "out.jsonl")
    assert [cello.render_user(r) for r in records] == [row["user_msg"] for row in ROWS]


def test_a_huge_n_max_is_capped_at_the_groups_types_not_looped_to(tmp_path):
    """--n-max 10**20 once never finished (a loop over every N); no group has more than 10 types here."""
    flags = ["--cell-type-key", "bulk_labels", "--donor-key", "none", "--context", "X.", "--n-min", "9",
             "--genes", "5", "--puzzles-per-group", "2", "--val-puzzles-per-group", "1", "--test-puzzles-per-group", "1"]
    huge = build(tmp_path / "huge", *flags, "--n-max", str(10 ** 20))
    ten = build(tmp_path / "ten", *flags, "--n-max", "10")
    assert huge == ten and {len(r["cells"]) for r in huge["train"]} == {9, 10}
    skipped = json.load(open(tmp_path / "huge" / "summary.json"))["skipped_group_n_pairs_with_too_few_types"]
    assert skipped == json.load(open(tmp_path / "ten" / "summary.json"))["skipped_group_n_pairs_with_too_few_types"] \
        + 3 * (10 ** 20 - 10)  # each split's one group, for every N from 11 on
    expect_error(tmp_path, DATA, SMALL + ["--puzzles-per-group", str(10 ** 20)], "must be <= 10,000,000")


# ---- found by mutation testing: absent values, suffixes, gene ranking, splits, candidate order, import layout ----

def test_present_treats_none_null_and_n_slash_a_as_absent():
    """Every value in SPEC.md's "absent" list (and its spellings) counts as not known."""
    assert [puzzles.present(v) for v in ("None", "none", "NULL", "n/a", "<NA>")] == [None] * 5


def test_ensg_suffix_with_a_version_is_stripped():
    """A feature_name such as 'MT-CO1_ENSG00000198804.2' gives the symbol 'MT-CO1'."""
    assert puzzles.ENSG_SUFFIX.sub("", "MT-CO1_ENSG00000198804.2") == "MT-CO1"


def test_disease_normal_is_healthy_whatever_its_case():
    """'Normal' (capitalised) gives the healthy sentence, as the code's case-insensitive test intends."""
    assert puzzles.context_sentence(None, None, None, "lung", "Normal") == (
        "The cell is from, originating from the lung. The patient is healthy with no diagnosed disease.")


def test_top_genes_never_lists_an_unexpressed_gene():
    """A row with fewer than m expressed genes lists only those (zeros are no genes)."""
    assert puzzles.top_genes(np.array([3.0, 0.0, 1.0]), ["A", "B", "C"], 3) == ["A", "C"]


def test_top_genes_lists_a_colliding_symbol_once_at_its_best_rank():
    """Two columns whose symbols collide after the suffix strip appear once, and the next gene fills the slot."""
    assert puzzles.top_genes(np.array([1.0, 5.0, 4.0, 3.0]), ["X", "A", "A", "B"], 3) == ["A", "B", "X"]


def test_split_counts_round_half_up():
    """split_counts rounds half up (0.5 -> 1, 2.5 -> 3), not to even as round() does."""
    assert puzzles.split_counts(5, 0.1, 0.1) == (1, 1)
    assert puzzles.split_counts(10, 0.0, 0.25) == (3, 0)


def test_assign_splits_by_hand():
    """By cell (1 donor): each (donor, type) stratum split on its own; by donor (3 donors): whole donors, with
    at least one test donor, and one val donor when --val-frac > 0 leaves two after test."""
    rng = np.random.default_rng(0)
    # 1 donor; type A: cells 0-4, split_counts(5, .2, .2) = (1, 1); type B: cells 5-6, (0, 0); cell 7 not usable
    types = ["A"] * 5 + ["B"] * 3
    mode, split_of, units = puzzles.assign_splits(list(range(7)), ["d"] * 8, types, 0.2, 0.2, rng)
    assert mode == "cell" and sorted(split_of) == list(range(7))
    assert units == {"train": 5, "val": 1, "test": 1}
    assert [split_of[i] for i in (5, 6)] == ["train", "train"]
    # 3 donors of 3 cells: split_counts(3, .01, .01) = (0, 0), raised to 1 test and 1 val donor (0 val at 0)
    donors = [f"d{i % 3}" for i in range(9)]
    for val_frac, expected in ((0.01, {"train": 1, "val": 1, "test": 1}), (0.0, {"train": 2, "test": 1})):
        mode, split_of, units = puzzles.assign_splits(list(range(9)), donors, ["A"] * 9, val_frac, 0.01, rng)
        assert mode == "donor" and units == expected
        assert all(split_of[i] == split_of[i % 3] for i in range(9))  # a donor's cells share its split


def test_a_small_test_fraction_still_gets_one_test_donor(tmp_path):
    """4 donors with --test-frac 0.1 (0.4 donors) still give one test donor rather than an error."""
    path, _ = cellxgene_like(tmp_path / "f.h5ad", donors=4)
    build(tmp_path / "out", *FLAGS, "--val-frac", "0.25", "--test-frac", "0.1", data=path)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert [len(summary["splits"][s]["donors"]) for s in puzzles.SPLITS] == [2, 1, 1]


def test_counts_layer_wins_over_raw(tmp_path):
    """With both layers['counts'] and .raw present, genes are ranked by layers['counts'] (docstring order)."""
    path, counts = cellxgene_like(tmp_path / "f.h5ad", raw=np.ascontiguousarray(cellxgene_like(
        tmp_path / "g.h5ad", seed=1)[1]))
    build(tmp_path / "out", *FLAGS, "--val-frac", "0.25", "--test-frac", "0.25", data=path)
    assert json.load(open(tmp_path / "out" / "summary.json"))["expression"] == "layers['counts']"


def test_a_cell_with_exactly_m_expressed_genes_is_usable(tmp_path):
    """'at least M genes with expression > 0': a cell with exactly M expressed genes makes puzzles."""
    path, _ = cellxgene_like(tmp_path / "f.h5ad")  # 12 genes, all expressed in every cell
    splits = build(tmp_path / "out", "--n-min", "3", "--n-max", "4", "--genes", "12", "--val-frac", "0.25",
                   "--test-frac", "0.25", data=path)
    assert splits["train"] and all(len(g) == 12 for r in splits["train"] for g in r["cells"])


def test_candidates_are_in_python_default_string_order(tmp_path):
    """SPEC.md: candidates sorted by Python's default order, so 'B cell' comes before 'alpha cell'."""
    names = ["B cell", "alpha cell", "T cell", "beta cell", "NK cell"]
    types = [names[t] for d in range(4) for t in range(5) for _ in range(3)]
    path, _ = cellxgene_like(tmp_path / "f.h5ad", obs={"cell_type": types})
    splits = build(tmp_path / "out", *FLAGS, "--val-frac", "0.25", "--test-frac", "0.25", data=path)
    records = [r for rs in splits.values() for r in rs]
    assert all(r["candidates"] == sorted(r["answer"]) for r in records)
    both = [r for r in records if {"B cell", "alpha cell"} <= set(r["candidates"])]
    assert both and all(r["candidates"].index("B cell") < r["candidates"].index("alpha cell") for r in both)


def test_import_keeps_a_context_that_starts_with_a_space(tmp_path):
    """'Context:  X' (two spaces) imports with the space in the context and renders back byte for byte."""
    row = released(CELLS, sorted(COMMA), [COMMA[1], COMMA[2], COMMA[0]], context=" The cell is from a donor.")
    record = run_import(tmp_path, [row])[0]
    assert record["context"] == " The cell is from a donor." and cello.render_user(record) == row["user_msg"]


def test_import_tail_of_spaces_is_layout_not_part_of_the_last_candidate(tmp_path):
    """A user_msg ending in ' \\n' keeps the candidates clean and stores ' \\n' as its tail."""
    row = released(CELLS, sorted(COMMA), [COMMA[1], COMMA[2], COMMA[0]], tail=" \n")
    record = run_import(tmp_path, [row])[0]
    assert record["candidates"] == sorted(COMMA) and record["layout"] == {"tail": " \n"}


def test_a_cell_needs_m_distinct_expressed_symbols(tmp_path):
    """Columns whose symbols collide after the suffix strip count once: a cell with 12 expressed columns
    but 11 distinct symbols cannot show --genes 12 genes, so it is left out (it was kept, with 11)."""
    names = ["G0", "G0_ENSG00000000001"] + [f"G{j}" for j in range(2, 13)]  # 13 columns, 12 symbols
    counts = np.arange(1, 60 * 13 + 1, dtype=np.float32).reshape(60, 13)  # distinct, all > 0
    type0 = [d * 15 + k for d in range(4) for k in range(3)]  # the cells of "type 0, subtype"
    counts[type0, 12] = 0
    path, _ = cellxgene_like(tmp_path / "f.h5ad", genes=13, feature_name=names, counts=counts, X=-counts)
    splits = build(tmp_path / "out", "--n-min", "3", "--n-max", "4", "--genes", "12", "--val-frac", "0.25",
                   "--test-frac", "0.25", data=path)
    records = [r for rs in splits.values() for r in rs]
    assert records and all(len(g) == 12 for r in records for g in r["cells"])
    assert all("type 0, subtype" not in r["answer"] for r in records)
    with pytest.raises(SystemExit) as stop:
        build(tmp_path / "out2", "--genes", "13", data=path)
    assert stop.value.code == f"puzzles.py: error: --genes 13 is more than the 12 distinct genes in {path}"


# ---- found by mutation testing (round 2): the dropout rate, record and import ids, which cell is blank,
# ---- a whole stratum to test, an <answer> left open ----

def test_train_gene_dropout_drops_its_share_of_genes(built, tmp_path):
    """Each of a cell's plain top M genes survives --train-gene-dropout 0.3 with probability 0.7, and a
    survivor stays in the new top M: 0.7 of the plain lists' genes are in the dropout lists."""
    plain = built[1]["train"]
    dropped = build(tmp_path / "d", *SMALL, "--train-gene-dropout", "0.3")["train"]
    kept = [len(set(a) & set(b)) / len(b) for r, q in zip(dropped, plain) for a, b in zip(r["cells"], q["cells"])]
    assert abs(sum(kept) / len(kept) - 0.7) < 0.05


def test_record_ids_name_the_split_group_n_and_index(built):
    """One context in the file: no context part in the group (c0, c1, ... only tell contexts apart)."""
    for split, records in built[1].items():
        assert [r["id"] for r in records] == [f"pbmc68k_reduced/{split}/pbmc68k_reduced/n{len(r['cells'])}/{i:05d}"
                                              for i, r in enumerate(records)]


def test_blank_cells_can_blank_any_cell_of_a_puzzle():
    records = [{"cells": [["A", "B"], ["C", "D"], ["E", "F"]]} for _ in range(60)]
    assert set(puzzles.blank_cells(records, 1.0, np.random.default_rng(0))) == {0, 1, 2}


def test_import_ids_are_the_file_stem_and_line_number(tmp_path):
    src = tmp_path / "cellpuzzles_test.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")  # a blank line 2
    puzzles.main(["import", str(src), "--out", str(tmp_path / "out.jsonl")])
    assert [r["id"] for r in cello.read_jsonl(tmp_path / "out.jsonl")] == ["cellpuzzles_test/000001",
                                                                          "cellpuzzles_test/000003"]
    src = tmp_path / "released.json"  # a JSON array: the rows are numbered from 1 too
    src.write_text(json.dumps(ROWS[:2]))
    puzzles.main(["import", str(src), "--out", str(tmp_path / "out.jsonl")])
    assert [r["id"] for r in cello.read_jsonl(tmp_path / "out.jsonl")] == ["released/000001", "released/000002"]


def test_split_counts_may_send_a_whole_stratum_to_test():
    """Rounded half up and capped at n only: 2 x 0.75 = 1.5 gives 2 test items, 1 x 0.5 gives 1."""
    assert puzzles.split_counts(2, 0.0, 0.75) == (2, 0)
    assert puzzles.split_counts(1, 0.5, 0.5) == (1, 0)


def test_draw_puzzles_gives_up_after_20_k_tries():
    """Two types of one cell each make a single distinct puzzle: asked for 3, draw_puzzles returns it
    once, after exactly 20 * 3 = 60 tries (each try draws its N types once)."""
    class Counting:
        def __init__(self):
            self.rng, self.tries = np.random.default_rng(0), 0

        def choice(self, a, size=None, replace=True):
            self.tries += size is not None  # the types of a try (a cell is drawn without size)
            return self.rng.choice(a, size=size, replace=replace)

        def permutation(self, n):
            return self.rng.permutation(n)

    rng = Counting()
    out = puzzles.draw_puzzles({"a": [0], "b": [1]}, 2, 3, rng, set())
    assert len(out) == 1 and sorted(out[0]) == [(0, "a"), (1, "b")]
    assert rng.tries == 60


def test_import_split_from_the_file_name_ignores_case(tmp_path):
    assert run_import(tmp_path, ROWS[:1], "CellPuzzles_TEST.jsonl")[0]["split"] == "test"
