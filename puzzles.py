"""puzzles.py: build CellPuzzles from an AnnData (.h5ad) file, or import the released CellPuzzles files.

A puzzle is N cells of N distinct cell types from one donor (and experimental batch), each cell shown
as its top M genes, highest first; the candidates are the N types, sorted; the answer is the type of
each cell in cell order (SPEC.md). Records are JSON lines (see cello.py, section 1).

Build (train.jsonl, val.jsonl, test.jsonl and summary.json in --out-dir), e.g. on the bundled data:
    python puzzles.py build data/pbmc68k_reduced.h5ad --out-dir runs/puzzles --cell-type-key bulk_labels \\
        --donor-key none --context "The cell is from a human donor, originating from the peripheral blood. \\
The patient is healthy with no diagnosed disease."
At the paper's scale, from a CELLxGENE file (its obs column names are the defaults):
    python puzzles.py build lung.h5ad --out-dir runs/lung --n-min 8 --n-max 15 --max-puzzles-per-n 40 \\
        --context-sentence "smoking_status=The patient is a {}."
Import a released file (JSONL, or parquet with pyarrow installed) with system_msg/user_msg/assistant_msg:
    python puzzles.py import cellpuzzles_test.jsonl --out runs/released/test.jsonl

How build works:
  1. Cells: those with a cell type and a donor (values such as "unknown", NaN or empty are skipped and
     counted) and at least M genes with expression > 0. Expression comes from layers['counts'], else
     .raw, else X (printed). Gene symbols from var['feature_name'] when present (an "_ENSG..." suffix
     stripped; for .raw without that column, from the main var's for the genes it lists), else var_names.
  2. Groups: cells sharing donor, batch and context sentence; a puzzle never mixes groups.
  3. Split, without leakage: by donor when the file has >= 3 donors (each donor in one split),
     else by cell (each cell in one split, stratified by donor and type), so no test cell is in a
     train or val puzzle. The mode is printed and stored in summary.json. Fractions that leave train
     (or val, when --val-frac > 0, or test) with no donor or cell are an error.
  4. For each split, group and N in [--n-min, --n-max]: up to K puzzles (K = --puzzles-per-group,
     --val-puzzles-per-group or --test-puzzles-per-group). A puzzle takes N random distinct types of
     the group, one random cell of each, in random cell order; a drawn set of cells that already
     made a puzzle is drawn again (at most 20 K tries), so no two puzzles hold the same cells.
     --exclude-puzzles FILE adds FILE's cell sets to those already made: puzzles for RL that the SFT
     data (FILE) never showed together, from the same split (same --seed and split flags). Use the
     new train.jsonl; test.jsonl is the same, val.jsonl may differ (val is drawn after train).
     Groups with fewer than N types are skipped and counted. --max-puzzles-per-n K then keeps at
     most K puzzles of each N in the whole file, as the paper did (40 per N per source file), shared
     among the splits in proportion to what each drew and drawn at random over all groups (without
     it a file with many donors gives K per group).
     Context: --context, else SPEC.md's sentence from the metadata columns that exist (cells whose
     fields are all unknown get "The cell is from an unknown donor."; a file with no such column
     needs --context); then each --context-sentence COLUMN=SENTENCE whose column is known for the
     cell, with {} replaced by its value (the paper's dataset-specific facts, e.g. smoking).
  5. A cell's genes: the M highest values of its row, descending; equal values keep gene order
     (a stable sort, so the lower gene index comes first). Symbols that collide after stripping the
     suffix appear once, at their best rank.
  6. Train-only augmentations (val and test never change): --train-gene-dropout drops expressed genes
     before the top M are taken, afresh in every puzzle; --train-blank-cells gives one cell of a
     share of the puzzles random genes (blank_cells), so its type follows only by elimination.
The defaults (N 4..8, M 50, 130/10/20 puzzles per N per group) give 650 train, 50 val and 100 test
puzzles on the bundled file with the command above. All output files are written under temporary
names and renamed at the end: an error leaves nothing.
"""
import argparse
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections import Counter, defaultdict

import numpy as np
import reward

SPLITS = ("train", "val", "test")
# metadata values that mean "not known"; "<na>" is how pandas' missing value of a nullable column prints
ABSENT = {"", "unknown", "na", "n/a", "nan", "none", "null", "<na>"}
ENSG_SUFFIX = re.compile(r"_ENSG\d+(\.\d+)?$")
# The context sentence's flags and their CELLxGENE obs columns, in the sentence's order (SPEC.md).
CONTEXT_KEYS = {"--sex-key": "sex", "--development-stage-key": "development_stage",
                "--ethnicity-key": "self_reported_ethnicity", "--tissue-key": "tissue", "--disease-key": "disease"}


def fail(message):
    """One clear line on stderr and exit status 1."""
    sys.exit(f"puzzles.py: error: {message}")


def check_file(path, what, expected):
    """fail() unless path is a file (cello.check_file's twin: importing cello would load torch)."""
    if os.path.isdir(path):
        fail(f"{what}: is a folder (expected {expected})")
    if not os.path.isfile(path):
        fail(f"{what}: no such file")


def present(value):
    """A metadata value as a string, or None when it means "not known"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in ABSENT else text


def context_sentence(sex, stage, ethnicity, tissue, disease):
    """SPEC.md's context: "The cell is from" + " a {sex}" + " at the {stage}" + " with {ethnicity}
    background" + ", originating from the {tissue}" + a disease sentence; absent fields (None) are left
    out; None when every field is absent."""
    if not any((sex, stage, ethnicity, tissue, disease)):
        return None
    # SPEC.md's literal rule: with only tissue or disease known this gives "The cell is from, ..." / "from. The ..."
    text = "The cell is from"
    text += f" a {sex}" if sex else ""
    text += f" at the {stage}" if stage else ""
    text += f" with {ethnicity} background" if ethnicity else ""
    text += f", originating from the {tissue}" if tissue else ""
    if disease is None:
        return text + "."
    if disease.lower() == "normal":
        return text + ". The patient is healthy with no diagnosed disease."
    return text + f". The patient has been diagnosed with {disease}."


def top_genes(row, symbols, m):
    """The m genes with the highest values of one cell's row, highest first.

    Order: a stable sort of -row, so equal values keep ascending gene index. Symbols that appear twice
    (collisions after stripping "_ENSG..." suffixes) are kept once, at their best rank.
    """
    genes, seen = [], set()
    for j in np.argsort(-row, kind="stable"):
        if row[j] <= 0 or len(genes) == m:
            break
        if symbols[j] not in seen:
            seen.add(symbols[j])
            genes.append(symbols[j])
    return genes


def split_counts(n, val_frac, test_frac):
    """How many of n items go to (test, val): each rounded half up, train keeps the rest."""
    n_test = min(n, math.floor(n * test_frac + 0.5))
    n_val = min(n - n_test, math.floor(n * val_frac + 0.5))
    return n_test, n_val


def draw_puzzles(pools, n, k, rng, seen):
    """Up to k puzzles of n cells from pools (type -> cell indices), as lists of (cell, type).

    Each puzzle: n distinct types chosen uniformly, one uniform cell of each, shuffled cell order.
    A cell set already in `seen` is rejected; after 20 k tries we stop with what we have.
    """
    types = sorted(pools)
    out = []
    for _ in range(20 * k):
        if len(out) == k:
            break
        chosen = [types[i] for i in rng.choice(len(types), size=n, replace=False)]
        cells = [(int(rng.choice(pools[t])), t) for t in chosen]
        key = frozenset(c for c, _ in cells)
        if key in seen:
            continue
        seen.add(key)
        out.append([cells[i] for i in rng.permutation(n)])
    return out


def cap_per_n(drawn, k, rng):
    """At most k of the drawn puzzles of each N in the whole file (the paper's 40 per N per source
    file), shared among the splits in proportion to how many each drew (rounded by largest
    remainder, so the shares add up to k) and chosen uniformly over all groups within a split (a
    file with many donors would otherwise give K per group); the drawing order is kept.
    drawn: (group key, whose first item is the split; n; puzzle) triples."""
    by_n = defaultdict(lambda: defaultdict(list))  # n -> split -> indices into drawn
    for index, (key, n, _) in enumerate(drawn):
        by_n[n][key[0]].append(index)
    keep = set()
    for splits in by_n.values():
        total = sum(len(indices) for indices in splits.values())
        kept = min(k, total)
        shares = {split: kept * len(indices) / total for split, indices in splits.items()}
        quota = {split: int(share) for split, share in shares.items()}
        by_remainder = sorted(shares, key=lambda split: (quota[split] - shares[split], SPLITS.index(split)))
        for split in by_remainder[:kept - sum(quota.values())]:
            quota[split] += 1
        for split, indices in splits.items():
            keep.update(rng.choice(indices, size=quota[split], replace=False).tolist())
    return [d for index, d in enumerate(drawn) if index in keep]


def blank_cells(records, share, rng):
    """Train-only augmentation: in `share` of the records, one cell (chosen at random) shows M random
    genes instead of its own. The genes are drawn without replacement, each with probability
    proportional to how many cell lists of `records` hold it, so a blank cell looks like an ordinary
    list of common genes and markers of several types, but points to no type. Its type follows only
    by elimination, and the candidate list can only be read from the prompt, not inferred from the
    cells. Changes records in place; returns the index of the blank cell per record (None: untouched).
    """
    counts = Counter(g for r in records for cell in r["cells"] for g in cell)
    genes = sorted(counts)
    weights = np.array([counts[g] for g in genes], dtype=np.float64)
    weights /= weights.sum()
    blanked = []
    for r in records:
        if rng.random() >= share:
            blanked.append(None)
            continue
        i = int(rng.integers(len(r["cells"])))
        picks = rng.choice(len(genes), size=len(r["cells"][i]), replace=False, p=weights)
        r["cells"][i] = [genes[j] for j in picks]
        blanked.append(i)
    return blanked


def excluded_cell_sets(path, barcodes):
    """The cell sets (frozensets of row indices) of the puzzles in a JSONL file built from this input."""
    index = {b: i for i, b in enumerate(barcodes)}
    check_file(path, f"--exclude-puzzles {path}", "a JSONL file of puzzles")
    sets = set()
    for line_no, line in enumerate(read_utf8(path, "--exclude-puzzles ").split("\n"), 1):
        try:
            record = json.loads(line) if line.strip() else {"cell_ids": []}
        except ValueError:
            fail(f"--exclude-puzzles {path} line {line_no}: not valid JSON (a line cut short?)")
        ids = record.get("cell_ids") if isinstance(record, dict) else None
        if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
            fail(f"--exclude-puzzles {path} line {line_no}: expected a puzzle record with a \"cell_ids\" list")
        missing = [c for c in ids if c not in index]
        if missing:
            fail(f"--exclude-puzzles {path} line {line_no}: cell id {missing[0]!r} is not in this input's "
                 "obs names")
        if ids:
            sets.add(frozenset(index[c] for c in ids))
    return sets


def read_utf8(path, what=""):
    """The whole text of a file; a file that is not UTF-8 is one clear line, not a UnicodeDecodeError."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        fail(f"{what}{path}: not UTF-8 text")


def load_h5ad(path):
    import anndata  # imported here so that `import` and --help do not pay for it

    check_file(path, path, "an .h5ad file")
    try:
        with warnings.catch_warnings():  # old files trigger anndata's warnings about moved or old fields
            warnings.simplefilter("ignore")
            return anndata.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many kinds of errors for a file that is not an h5ad
        fail(f"{path}: not a readable .h5ad file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def expression_matrix(adata):
    """(matrix as CSR or dense array, var table, which) from layers['counts'], else .raw, else X."""
    import scipy.sparse

    if "counts" in adata.layers:
        matrix, var, which = adata.layers["counts"], adata.var, "layers['counts']"
    elif adata.raw is not None:
        matrix, var, which = adata.raw.X, adata.raw.var, ".raw.X"
    else:
        matrix, var, which = adata.X, adata.var, "X"
    if matrix is None:
        fail(f"no expression matrix: none of layers['counts'], .raw or X holds one "
             f"(layers: {', '.join(adata.layers) or 'none'})")
    if scipy.sparse.issparse(matrix):
        matrix = scipy.sparse.csr_matrix(matrix)
        values = matrix.data
    else:
        matrix = np.asarray(matrix)
        values = matrix
    if values.dtype.kind not in "biuf":
        fail(f"expression matrix {which} is not numeric (dtype {values.dtype})")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        fail(f"expression matrix {which} holds NaN or infinite values")
    if values.size and values.min() < 0:  # scaled (z-scored) data would rank genes by "above the gene's mean"
        fail(f"expression matrix {which} holds negative values (scaled data?): genes are ranked by expression, "
             "so give a file with counts (or normalised expression) in layers['counts'], .raw or X")
    return matrix, var, which


def check_build_flags(args):
    """fail() on a bad flag, before the input is read; returns --context-sentence as (column, template) pairs."""
    if not args.n_min >= 2:
        fail(f"--n-min must be >= 2 (got {args.n_min})")
    if args.n_max < args.n_min:
        fail(f"--n-max must be >= --n-min (got {args.n_max} < {args.n_min})")
    if args.genes < 1:
        fail(f"--genes must be >= 1 (got {args.genes})")
    if not 0 <= args.train_gene_dropout < 1:
        fail(f"--train-gene-dropout must be in [0, 1) (got {args.train_gene_dropout})")
    if not 0 <= args.train_blank_cells <= 1:
        fail(f"--train-blank-cells must be in [0, 1] (got {args.train_blank_cells})")
    if args.max_puzzles_per_n is not None and args.max_puzzles_per_n < 1:
        fail(f"--max-puzzles-per-n must be >= 1 (got {args.max_puzzles_per_n})")
    extra_sentences = []
    for spec in args.context_sentence or []:
        column_key, _, template = spec.partition("=")
        if not column_key or template.count("{}") != 1:
            fail(f"--context-sentence {spec!r}: expected COLUMN=SENTENCE with one {{}} for the value, "
                 "e.g. 'smoking_status=The patient is a {}.'")
        extra_sentences.append((column_key, template))
    if args.seed < 0:   # numpy's generators take only seeds >= 0
        fail(f"--seed must be >= 0 (got {args.seed})")
    if min(args.puzzles_per_group, args.val_puzzles_per_group, args.test_puzzles_per_group) < 0:
        fail("--puzzles-per-group, --val-puzzles-per-group and --test-puzzles-per-group must be >= 0")
    if max(args.puzzles_per_group, args.val_puzzles_per_group, args.test_puzzles_per_group) > 10 ** 7:
        fail("--puzzles-per-group, --val-puzzles-per-group and --test-puzzles-per-group must be <= 10,000,000 "
             "(each puzzle is drawn and kept in memory)")
    if not (0 <= args.val_frac < 1 and 0 < args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        fail(f"--val-frac and --test-frac must be fractions with val + test < 1 (got {args.val_frac}, {args.test_frac})")
    return extra_sentences


def obs_column(adata, key, flag, path):
    """The values of obs column `key` as a list; fail() naming the flag when the column does not exist."""
    if key not in adata.obs.columns:
        fail(f"{flag} {key!r}: no such obs column in {path}; obs columns are: {', '.join(map(str, adata.obs.columns))}")
    return adata.obs[key].tolist()


def cell_metadata(adata, args, stem, extra_sentences):
    """(cell types, donors, batches, contexts), one value per cell, None where unknown (steps 1 and 4).
    fail() on obs names that are not unique and on a cell type that an answer could not hold."""
    if not adata.obs_names.is_unique:  # records name cells by obs name: a repeated one would be two cells
        repeated = adata.obs_names[adata.obs_names.duplicated()]
        fail(f"{args.input}: obs names are not unique ({len(repeated)} repeated, e.g. {repeated[0]!r}): make them "
             "unique first (adata.obs_names_make_unique())")
    cell_types = [present(v) for v in obs_column(adata, args.cell_type_key, "--cell-type-key", args.input)]
    by_norm = defaultdict(set)  # the reward compares labels stripped and case-insensitively
    for t in set(cell_types) - {None}:
        by_norm[reward.norm_label(t)].add(t)
    piped = sorted(t for t in set(cell_types) - {None} if "|" in t)
    if piped:  # the answer separates labels with '|': such a type could never be answered
        fail(f"--cell-type-key {args.cell_type_key!r}: cell type {piped[0]!r} contains '|', which separates the "
             "answer's labels: rename it in the file first")
    broken = sorted(t for t in set(cell_types) - {None} if "\n" in t or "\r" in t)
    if broken:  # the prompt lists one candidate per line
        fail(f"--cell-type-key {args.cell_type_key!r}: cell type {broken[0]!r} contains a line break, which would "
             "split it over two candidate lines: rename it in the file first")
    clashes = sorted(sorted(names) for names in by_norm.values() if len(names) > 1)
    if clashes:
        fail(f"--cell-type-key {args.cell_type_key!r}: cell types {clashes[0]} differ only in case or surrounding "
             "spaces, which the reward counts as one label: merge them in the file first")
    # A missing donor (NaN, "unknown", ...) is None, never a donor named "nan": such cells are left out later,
    # as pooling them would make puzzles that mix real donors and a fake donor that counts for the split.
    if args.donor_key == "none":
        donors = [stem] * adata.n_obs
    else:
        donors = [present(v) for v in obs_column(adata, args.donor_key, "--donor-key", args.input)]
    if args.batch_key is None:
        batches = [None] * adata.n_obs
    elif args.batch_key == "barcode-suffix":
        batches = []
        for name in adata.obs_names:
            match = re.search(r"-(\d+)$", name)
            if not match:
                fail(f"--batch-key barcode-suffix: obs name {name!r} does not end in -<lane number>")
            batches.append(match.group(1))
    else:  # missing: grouped by donor only
        batches = [present(v) for v in obs_column(adata, args.batch_key, "--batch-key", args.input)]
    return cell_types, donors, batches, cell_contexts(adata, args, extra_sentences)


def cell_contexts(adata, args, extra_sentences):
    """Each cell's context: --context, else SPEC.md's sentence from the metadata columns; then the
    --context-sentence sentences whose column is known for the cell."""
    if args.context is not None:
        contexts = [args.context] * adata.n_obs
    else:
        keys = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in CONTEXT_KEYS}
        if not any(key in adata.obs.columns for key in keys.values()):
            fail(f"{args.input} has none of the context columns ({args.sex_key}, {args.development_stage_key}, "
                 f"{args.ethnicity_key}, {args.tissue_key}, {args.disease_key}): pass --context TEXT")
        fields = []
        for flag, key in keys.items():
            # A missing default column counts as unknown (not every file has every field); a named one must exist
            if key == CONTEXT_KEYS[flag] and key not in adata.obs.columns:
                fields.append([None] * adata.n_obs)
            else:
                fields.append([present(v) for v in obs_column(adata, key, flag, args.input)])
        # Cells whose every field is unknown (e.g. a column of "unknown" only) still get a sentence
        contexts = [context_sentence(*values) or "The cell is from an unknown donor." for values in zip(*fields)]
    for column_key, template in extra_sentences:  # e.g. smoking_status=The patient is a {}.
        values = [present(v) for v in obs_column(adata, column_key, "--context-sentence", args.input)]
        contexts = [c if v is None else f"{c} {template.replace('{}', v)}" for c, v in zip(contexts, values)]
    return contexts


def gene_symbols(adata, var, path, m):
    """(symbol of each matrix column, where the names came from): var['feature_name'] when present, else
    var_names, with any "_ENSG..." suffix stripped. fail() on duplicate names or fewer than m distinct symbols."""
    names = [str(v) for v in (var["feature_name"] if "feature_name" in var.columns else var.index)]
    name_source = "var['feature_name']" if "feature_name" in var.columns else "var_names"
    if "feature_name" not in var.columns and "feature_name" in adata.var.columns:  # .raw.var made without it
        symbol_of = dict(zip(adata.var.index.astype(str), adata.var["feature_name"].astype(str)))
        mapped = sum(name in symbol_of for name in names)
        names = [symbol_of.get(name, name) for name in names]
        name_source = f"var['feature_name'] for {mapped} of {len(names)} genes, else var_names"
    duplicated = [name for name, count in Counter(names).items() if count > 1]
    if duplicated:
        fail(f"duplicate gene names in {name_source} of {path}: {', '.join(duplicated[:5])}")
    symbols = [ENSG_SUFFIX.sub("", name) for name in names]
    distinct = len(set(symbols))  # fewer than the columns when symbols collide after the suffix strip
    if m > distinct:
        fail(f"--genes {m} is more than the {distinct} distinct genes in {path}")
    return symbols, name_source


def expressed_genes(matrix, symbols):
    """How many distinct symbols each cell expresses (> 0): a cell lists each symbol once (top_genes)."""
    distinct = sorted(set(symbols))
    if len(distinct) == len(symbols):
        return np.asarray((matrix > 0).sum(axis=1)).ravel()
    import scipy.sparse  # only for colliding symbols: a [columns, symbols] 0/1 matrix merges their columns
    column_of = {symbol: k for k, symbol in enumerate(distinct)}
    merge = scipy.sparse.csr_matrix((np.ones(len(symbols)), (np.arange(len(symbols)),
                                                             [column_of[x] for x in symbols])))
    return np.asarray(((matrix > 0).astype(np.float32) @ merge > 0).sum(axis=1)).ravel()


def eligible_cells(cell_types, donors, expressed, args):
    """(indices of the cells with a type, a donor and >= --genes expressed genes, why the others were left out)."""
    typed = [i for i in range(len(cell_types)) if cell_types[i] is not None and expressed[i] >= args.genes]
    usable = [i for i in typed if donors[i] is not None]
    if typed and not usable:
        fail(f"--donor-key {args.donor_key!r}: no usable cell of {args.input} has a donor (every value is missing); "
             "pass --donor-key none to treat the file as one donor")
    skipped_cells = {"no cell type": sum(t is None for t in cell_types),
                     f"fewer than {args.genes} expressed genes": sum(int(t is not None and expressed[i] < args.genes)
                                                                     for i, t in enumerate(cell_types)),
                     "no donor": len(typed) - len(usable)}
    return usable, skipped_cells


def assign_splits(usable, donors, cell_types, val_frac, test_frac, rng):
    """The leakage-free split: (mode, split_of, units), split_of[cell index] in SPLITS for each usable cell.

    With >= 3 donors, mode "donor": the donors, sorted and then shuffled by rng, go n_test to test, the next
    n_val to val, the rest to train (split_counts of the donors, but at least 1 to test, and at least 1 to
    val when val_frac > 0 and 2 or more donors are left after test); a cell goes with its donor.
    Else mode "cell": the cells of each (donor, type) stratum, in sorted stratum order, are shuffled by rng
    and go n_test to test, n_val to val, the rest to train (split_counts of the stratum).
    units counts the donors (or cells) of each split.
    """
    donor_names = sorted({donors[i] for i in usable})
    if len(donor_names) >= 3:
        order = [donor_names[i] for i in rng.permutation(len(donor_names))]
        n_test, n_val = split_counts(len(order), val_frac, test_frac)
        n_test = max(n_test, 1)
        n_val = max(n_val, 1) if val_frac > 0 and len(order) - n_test >= 2 else n_val
        donor_split = {d: "test" if r < n_test else "val" if r < n_test + n_val else "train"
                       for r, d in enumerate(order)}
        return "donor", {i: donor_split[donors[i]] for i in usable}, Counter(donor_split.values())
    split_of = {}
    strata = defaultdict(list)
    for i in usable:
        strata[(donors[i], cell_types[i])].append(i)
    for key in sorted(strata):
        cells = [strata[key][j] for j in rng.permutation(len(strata[key]))]
        n_test, n_val = split_counts(len(cells), val_frac, test_frac)
        for r, i in enumerate(cells):
            split_of[i] = "test" if r < n_test else "val" if r < n_test + n_val else "train"
    return "cell", split_of, Counter(split_of.values())


def check_split(mode, units, n_donors, args):
    """fail() when the fractions leave a split with no donor or cell (train, test, and val when --val-frac > 0);
    else print the split mode."""
    # Rounding can leave train (or a val/test split that was asked for) without a donor or cell even with valid
    # fractions (5 donors, 0.35 and 0.6): fail before anything is written rather than write an empty split.
    empty = [s for s in SPLITS if not units[s] and (s != "val" or args.val_frac > 0)]
    if n_donors and empty:  # no donor: no usable cell, which build reports later
        unit = "donors" if mode == "donor" else "cells (split per donor and type)"
        fail(f"--val-frac {args.val_frac} and --test-frac {args.test_frac} leave the {empty[0]} split empty: "
             f"{sum(units.values())} {unit} go {units['train']} to train, {units['val']} to val, {units['test']} "
             "to test; choose fractions that leave each split at least one")
    print(f"split: by {mode} ({n_donors} donor{'s' if n_donors != 1 else ''}; "
          + ("each donor in one split)" if mode == "donor" else "each cell in one split, stratified by donor and type)"))


def draw_all(groups, args, rng, seen):
    """(every group's puzzles for each N in [--n-min, --n-max], as (group key, n, puzzle) in drawing order,
    capped by --max-puzzles-per-n; how many (group, N) pairs were skipped for having fewer than N types)."""
    per_group = {"train": args.puzzles_per_group, "val": args.val_puzzles_per_group,
                 "test": args.test_puzzles_per_group}
    skipped_group_ns = 0
    drawn = []   # (group key, n, puzzle), in drawing order
    for key in sorted(groups):
        types = len(groups[key])
        skipped_group_ns += max(0, args.n_max - max(types, args.n_min - 1))  # the Ns above its number of types
        for n in range(args.n_min, min(args.n_max, types) + 1):  # (a loop to a huge --n-max would never end)
            drawn += [(key, n, puzzle) for puzzle in draw_puzzles(groups[key], n, per_group[key[0]], rng, seen)]
    if args.max_puzzles_per_n is not None:  # own generator: without the flag the files stay the same
        drawn = cap_per_n(drawn, args.max_puzzles_per_n, np.random.default_rng([args.seed, 3]))
    return drawn, skipped_group_ns


def make_records(drawn, groups, matrix, symbols, barcodes, stem, args):
    """The puzzle records of each split (cello.py, section 1), in drawing order; each cell is its top
    --genes genes, after --train-gene-dropout for train."""
    context_ids = {c: k for k, c in enumerate(sorted({key[3] for key in groups}))}
    dense_rows = {}
    # its own generator, so that the puzzles (cells, order) are the same whatever --train-gene-dropout is
    dropout_rng = np.random.default_rng([args.seed, 1])
    records = {split: [] for split in SPLITS}
    for key, n, puzzle in drawn:
        split, donor, batch, context = key
        cells = []
        for i, _ in puzzle:
            if i not in dense_rows:
                row = matrix[i].toarray().ravel() if hasattr(matrix, "toarray") else np.asarray(matrix[i]).ravel()
                dense_rows[i] = row.astype(np.float64)
            row = dense_rows[i]
            if split == "train" and args.train_gene_dropout > 0:
                row = np.where(dropout_rng.random(row.shape) < args.train_gene_dropout, 0.0, row)
            cells.append(top_genes(row, symbols, args.genes))
        answer = [t for _, t in puzzle]
        group = "/".join(x for x in (donor, batch, f"c{context_ids[context]}" if len(context_ids) > 1 else "") if x)
        records[split].append({
            "id": f"{stem}/{split}/{group}/n{n}/{len(records[split]):05d}",
            "source": os.path.basename(args.input),
            "donor": donor,
            "batch": batch or None,
            "split": split,
            "context": context,
            "cells": cells,
            "candidates": sorted(answer),
            "answer": answer,
            "cell_ids": [barcodes[i] for i, _ in puzzle],
        })
    return records


def summarize(args, mode, which, name_source, records, split_of, donors, skipped_group_ns, skipped_cells):
    """summary.json: where the data came from, how it was split, and what each split holds."""
    return {
        "source": os.path.basename(args.input),
        "split_mode": mode,
        "expression": which,
        "gene_symbols": name_source,
        "cell_type_key": args.cell_type_key,
        "splits": {split: {"puzzles": len(records[split]),
                           "by_n": dict(sorted(Counter(len(r["cells"]) for r in records[split]).items())),
                           "cells": sum(s == split for s in split_of.values()),
                           "donors": sorted({donors[i] for i, s in split_of.items() if s == split})}
                   for split in SPLITS},
        "skipped_group_n_pairs_with_too_few_types": skipped_group_ns,
        "skipped_cells": skipped_cells,
        "args": vars(args),
    }


def write_outputs(out_dir, records, summary):
    """Write {split}.jsonl and summary.json to out_dir, all or nothing, and print what they hold."""
    make_dir(out_dir, "--out-dir")
    outputs = {f"{split}.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[split])
               for split in SPLITS}
    outputs["summary.json"] = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    write_all_atomic(out_dir, outputs)
    for split in SPLITS:
        s = summary["splits"][split]
        print(f"{split}: {s['puzzles']} puzzles {s['by_n']} from {s['cells']} cells")
    print(f"skipped: {summary['skipped_group_n_pairs_with_too_few_types']} group/N pairs with too few types; "
          f"cells: {summary['skipped_cells']}")
    print(f"wrote {', '.join(outputs)} to {out_dir}")


def build(args):
    """Build train/val/test puzzles from args.input in args.out_dir, in the module docstring's steps."""
    extra_sentences = check_build_flags(args)
    adata = load_h5ad(args.input)
    stem = os.path.splitext(os.path.basename(args.input))[0]

    # 1. Cells: type, donor, batch and context; gene symbols and expressed genes; the eligible ones.
    cell_types, donors, batches, contexts = cell_metadata(adata, args, stem, extra_sentences)
    matrix, var, which = expression_matrix(adata)
    symbols, name_source = gene_symbols(adata, var, args.input, args.genes)
    expressed = expressed_genes(matrix, symbols)
    print(f"expression: {which} ({matrix.shape[0]} cells x {matrix.shape[1]} genes), gene symbols: {name_source}")
    usable, skipped_cells = eligible_cells(cell_types, donors, expressed, args)

    # 3. Split, without leakage; done before step 2, as a group's key starts with its split.
    rng = np.random.default_rng(args.seed)  # the split, then the puzzles' draws
    mode, split_of, units = assign_splits(usable, donors, cell_types, args.val_frac, args.test_frac, rng)
    check_split(mode, units, len({donors[i] for i in usable}), args)

    # 2. Groups: cells sharing split, donor, batch and context, by type.
    groups = defaultdict(lambda: defaultdict(list))   # (split, donor, batch, context) -> type -> cells
    for i in usable:
        groups[(split_of[i], donors[i], batches[i] or "", contexts[i])][cell_types[i]].append(i)

    # 4. Puzzles, 5. their records (each cell's top genes), 6. the train-only augmentations.
    barcodes = [str(v) for v in adata.obs_names]
    seen = excluded_cell_sets(args.exclude_puzzles, barcodes) if args.exclude_puzzles else set()
    drawn, skipped_group_ns = draw_all(groups, args, rng, seen)
    records = make_records(drawn, groups, matrix, symbols, barcodes, stem, args)
    if args.train_blank_cells > 0:  # own generator: the puzzles stay the same whatever the share
        blank_cells(records["train"], args.train_blank_cells, np.random.default_rng([args.seed, 2]))
    total = sum(len(r) for r in records.values())
    if total == 0 and not usable:
        fail(f"no usable cell in {args.input}: a cell needs a cell type, a donor and at least --genes {args.genes} "
             f"expressed genes (cells left out: {skipped_cells})")
    if total == 0:
        fail(f"no puzzle could be built: every group has fewer than --n-min {args.n_min} cell types "
             f"({skipped_group_ns} group/N pairs skipped; cells left out: {skipped_cells})")

    write_outputs(args.out_dir, records,
                  summarize(args, mode, which, name_source, records, split_of, donors, skipped_group_ns, skipped_cells))


def make_dir(path, flag):
    """Create a folder (and its parents), or fail with one line saying why not. (cello.make_out_dir's
    twin: importing cello would load torch, which `build` does without.)"""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"{flag} {path}: cannot create the folder ({e.strerror})")
    try:  # an existing read-only folder would fail only at the first write, after the work
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        fail(f"{flag} {path}: cannot write in the folder ({e.strerror})")


def write_all_atomic(out_dir, outputs):
    """Write every file to a temporary name first, then rename them all: an error leaves no output."""
    # fixed names (one build per folder), so a rerun overwrites what a killed build left behind
    tmp = {name: os.path.join(out_dir, f".{name}.tmp") for name in outputs}
    try:
        for name, text in outputs.items():
            with open(tmp[name], "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # on disk before the new name points at it
        for name in outputs:
            os.replace(tmp[name], os.path.join(out_dir, name))
    finally:  # whatever failed, no temporary file stays behind (after the renames none is left)
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)


# ---------------------------------------------------------------------------------------------
# import: released CellPuzzles records -> puzzle records
# ---------------------------------------------------------------------------------------------

def parse_released(system_msg, user_msg, assistant_msg):
    """One released record -> (context, cells, candidates, answer, layout); raises ValueError saying why.

    user_msg is "Context: " + context + sep + "Cell 1: g, g, ..." lines + MATCH_LINE + candidates
    (one per line) + tail, where sep is whitespace ending in a newline (" \\n\\n" in most records) and
    tail is trailing whitespace. The answer is the lenient '|' parse of assistant_msg's last
    <answer>...</answer> (reward.parse_answer), or of the whole text when it has no tags. Answer labels
    match candidates case-insensitively and take the candidate's spelling.
    """
    import cello  # imported here so that `build` does not load torch
    if not user_msg.startswith("Context: "):
        raise ValueError("user_msg does not start with 'Context: '")
    start = user_msg.find("\nCell 1: ")
    end = user_msg.find(cello.MATCH_LINE)
    if start < 0 or end < start:
        raise ValueError("user_msg has no 'Cell 1: ' line followed by the 'Match the cells above' line")
    head = user_msg[len("Context: "):start + 1]
    context = head.rstrip()
    cell_lines = user_msg[start + 1:end].split("\n")
    cells = []
    for k, line in enumerate(cell_lines):
        prefix = f"Cell {k + 1}: "
        if not line.startswith(prefix):
            raise ValueError(f"cell line {k + 1} does not start with {prefix!r}")
        cells.append(line[len(prefix):].split(", "))
    rest = user_msg[end + len(cello.MATCH_LINE):]
    body = rest.rstrip()
    candidates = body.split("\n")
    if len(candidates) != len(cells):
        raise ValueError(f"{len(cells)} cells but {len(candidates)} candidates")
    labels = reward.parse_answer(assistant_msg, len(cells))["labels"]
    if labels is None and "<answer>" not in assistant_msg:
        labels = [part.strip() for part in assistant_msg.split("|")]
    if not labels or len(labels) != len(cells):
        raise ValueError(f"assistant_msg has {len(labels or [])} answer labels, expected {len(cells)}")
    by_name = {reward.norm_label(c): c for c in candidates}
    if len(by_name) != len(candidates):
        raise ValueError(f"candidates {candidates} repeat a cell type")
    if sorted(reward.norm_label(label) for label in labels) != sorted(by_name):
        raise ValueError(f"answer labels {labels} do not use every candidate exactly once")
    answer = [by_name[reward.norm_label(label)] for label in labels]
    layout = {}
    if head[len(context):] != cello.CONTEXT_SEP:
        layout["context_sep"] = head[len(context):]
    if rest[len(body):]:
        layout["tail"] = rest[len(body):]
    if system_msg != cello.SYSTEM_TEMPLATE.format(n=len(cells)):
        layout["system"] = system_msg
    return context, cells, candidates, answer, layout


def read_released(path):
    """Rows of a released file as (row number, dict): JSONL (or a JSON array), or parquet via pandas."""
    check_file(path, path, "a released CellPuzzles file: JSONL, JSON or parquet")
    if path.endswith(".parquet"):
        import pandas

        try:
            frame = pandas.read_parquet(path)
        except ImportError:
            fail(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it to JSONL")
        except Exception as e:  # not parquet: cut short, empty, or a git-lfs pointer cloned without LFS
            fail(f"{path}: not a readable parquet file ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        return list(enumerate(frame.to_dict("records"), start=1))
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            fail(f"{path}: not valid JSON ({e})")
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                fail(f"{path}:{number}: not valid JSON ({e})")
    return rows


def import_released(args):
    import cello  # the renderer checks each record; imported here so that `build` does not load torch

    rows = read_released(args.input)
    # "test" as a word of the file name (cellpuzzles_test.jsonl, test-00000-of-00001.parquet), not "latest"
    split = args.split or ("test" if re.search(r"(?<![a-z])test(?![a-z])", os.path.basename(args.input).lower())
                           else "train")
    stem = os.path.splitext(os.path.basename(args.input))[0]
    records = []
    for number, row in rows:
        where = f"{args.input}:{number}"
        fields = ("system_msg", "user_msg", "assistant_msg")
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
            fail(f"{where}: expected string fields system_msg, user_msg and assistant_msg")
        try:
            context, cells, candidates, answer, layout = parse_released(*(row[k] for k in fields))
        except ValueError as e:
            fail(f"{where}: cannot parse the record: {e}")
        record = {"id": f"{stem}/{number:06d}", "source": os.path.basename(args.input), "donor": None,
                  "batch": None, "split": split, "context": context, "cells": cells,
                  "candidates": candidates, "answer": answer}
        if layout:
            record["layout"] = layout
        record["response"] = row["assistant_msg"]
        if cello.render_user(record) != row["user_msg"] or cello.render_system(record) != row["system_msg"]:
            fail(f"{where}: the record does not render back to its user_msg/system_msg exactly")
        records.append(record)
    if not records:
        fail(f"{args.input}: no records")
    if os.path.isdir(args.out):
        fail(f"--out {args.out}: is a folder (expected the path of the JSONL file to write)")
    if not os.path.basename(args.out):  # "new/" or ""
        fail(f"--out {args.out!r}: names no file (expected the path of the JSONL file to write)")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    make_dir(out_dir, "--out")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_all_atomic(out_dir, {os.path.basename(args.out): text})
    by_n = dict(sorted(Counter(len(r["cells"]) for r in records).items()))
    print(f"imported {len(records)} records as split {split!r}: {by_n} "
          f"by N; {sum('layout' in r for r in records)} keep a non-standard layout; wrote {args.out}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the docstring's layout; show a flag's default unless it is None or the help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="puzzles.py",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build puzzles from an .h5ad file", description=__doc__,
                       formatter_class=HelpFormatter)
    g = b.add_argument_group("input and output")
    g.add_argument("input", help="AnnData .h5ad file")
    g.add_argument("--out-dir", required=True, help="folder for train.jsonl, val.jsonl, test.jsonl, summary.json")
    g = b.add_argument_group("obs columns (CELLxGENE names by default)")
    g.add_argument("--cell-type-key", default="cell_type", help="obs column of cell type labels")
    g.add_argument("--donor-key", default="donor_id", help="obs column of donors; 'none': one donor named after the file")
    g.add_argument("--batch-key", default=None,
                   help="obs column of experimental batches (default: none); "
                        "'barcode-suffix': the -N lane suffix of obs_names")
    for flag, default in CONTEXT_KEYS.items():
        g.add_argument(flag, default=default, help="obs column for the context sentence (default: %(default)s, "
                                                   "used when present; a column you name must exist)")
    g.add_argument("--context", default=None, help="context sentence for every puzzle (for files without metadata); "
                                                   "overrides the context columns")
    g.add_argument("--context-sentence", action="append", metavar="COLUMN=SENTENCE",
                   help="an extra sentence after the context, from an obs column, where the cell's value is known; "
                        "{} stands for the value, e.g. 'smoking_status=The patient is a {}.' (repeatable, in order)")
    g = b.add_argument_group("puzzles")
    g.add_argument("--n-min", type=int, default=4, help="fewest cells (= cell types) per puzzle, >= 2")
    g.add_argument("--n-max", type=int, default=8, help="most cells per puzzle")
    g.add_argument("--genes", type=int, default=50, help="M: top genes shown per cell")
    g.add_argument("--puzzles-per-group", type=int, default=130,
                   help="train puzzles per N per group (group = donor, batch and context within a split); "
                        "fewer when the group cannot make that many distinct puzzles")
    g.add_argument("--train-gene-dropout", type=float, default=0.0,
                   help="train puzzles only: drop each expressed gene of a cell with this probability before "
                        "taking its top M, afresh in every puzzle (scRNA-seq dropout as augmentation: a cell "
                        "seen in many puzzles never shows the same list, so a model must read it, not recall it)")
    g.add_argument("--train-blank-cells", type=float, default=0.0,
                   help="train puzzles only: share of puzzles in which one random cell shows random genes "
                        "(weighted by how common they are in train lists) instead of its own: no evidence, "
                        "so its type comes by elimination and the candidates must be read from the prompt")
    g.add_argument("--exclude-puzzles", default=None,
                   help="puzzles JSONL built from this input (e.g. the SFT's train.jsonl): never draw one of its "
                        "cell sets again (RL puzzles the SFT never saw)")
    g.add_argument("--max-puzzles-per-n", type=int, default=None,
                   help="at most this many puzzles of each N in the whole file (the paper: 40 per N per source "
                        "file), shared among the splits as they were drawn, chosen at random over all groups "
                        "(default: no cap)")
    g.add_argument("--val-puzzles-per-group", type=int, default=10, help="as --puzzles-per-group, for val")
    g.add_argument("--test-puzzles-per-group", type=int, default=20, help="as --puzzles-per-group, for test")
    g = b.add_argument_group("splits and randomness")
    g.add_argument("--val-frac", type=float, default=0.1,
                   help="share of donors (>= 3 donors) or of each type's cells for val")
    g.add_argument("--test-frac", type=float, default=0.2, help="share of donors or of each type's cells for test")
    g.add_argument("--seed", type=int, default=0, help="random seed: same seed and flags give identical files")

    i = sub.add_parser("import", help="import released CellPuzzles records (system_msg, user_msg, assistant_msg)",
                       formatter_class=HelpFormatter)
    i.add_argument("input", help="released file: JSONL (or a JSON array), or .parquet (needs pyarrow)")
    i.add_argument("--out", required=True, help="output puzzles JSONL")
    i.add_argument("--split", choices=SPLITS, default=None,
                   help="split stored in the records (default: test when the file name says test, else train)")

    args = parser.parse_args(argv)
    build(args) if args.command == "build" else import_released(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the outputs are renamed into place only at the end: nothing half-written
        fail("interrupted; nothing was written: run the same command again")
