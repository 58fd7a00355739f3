"""cello: what every stage shares, and the one-command demo.

Sections, top to bottom:
  1. Prompt rendering: a puzzle record -> the exact SPEC.md system and user messages.
  2. Tokenizer and model: presets built on the puzzle text, loading, token ids with a loss mask.
  3. Sampling and log-probabilities: batched KV-cache sampling, chunked per-token log-probs.
  4. Distributed setup and checkpoints: torchrun, FSDP2, Hugging Face folders, resume state.
  5. The demo: the whole pipeline on the bundled data.

Run the whole pipeline on the bundled data (2-core CPU, under 15 minutes):
    python cello.py demo
"""
import json
import os

# ---------------------------------------------------------------------------------------------
# 1. Prompt rendering
# ---------------------------------------------------------------------------------------------
# A puzzle record (one JSON line of a puzzles file) holds:
#   id, source, donor, batch, split, context (str), cells (N lists of genes, highest first),
#   candidates (N labels, in prompt order), answer (N gold labels, in cell order),
#   optionally layout {"context_sep", "tail", "system"} for imported records that deviate from the
#   standard layout, and response (an accepted assistant text) in SFT files.

SYSTEM_TEMPLATE = (
    "You are an expert assistant specialized in cell type annotation. You will be given a batch of "
    "{n} cells from the same donor, where each cell represents a unique cell type. For each cell, the "
    "top expressed genes are provided in descending order of expression. Using both the gene "
    "expression data and donor information, determine the correct cell type for each cell. You will "
    "also receive a list of {n} candidate cell types, and each candidate must be assigned to exactly "
    "one cell. Ensure that you consider all cells and candidate types together, rather than "
    "annotating each cell individually. Include your detailed reasoning within <think> and </think> "
    "tags, and provide your final answer within <answer> and </answer> tags. The final answer should "
    "be a single string listing the assigned cell types in order, separated by ' | '."
)
CONTEXT_SEP = " \n\n"  # the space is an artefact of the released data, kept on purpose (SPEC.md)
MATCH_LINE = "\n\nMatch the cells above to one of the following cell types:\n"


def render_system(record):
    """The system message for a puzzle: SPEC.md's text with N filled in."""
    layout = record.get("layout") or {}
    return layout.get("system") or SYSTEM_TEMPLATE.format(n=len(record["cells"]))


def render_user(record):
    """The user message: context, one line per cell, then the candidates (SPEC.md layout)."""
    layout = record.get("layout") or {}
    cell_lines = "\n".join(f"Cell {i + 1}: " + ", ".join(genes) for i, genes in enumerate(record["cells"]))
    return ("Context: " + record["context"] + layout.get("context_sep", CONTEXT_SEP) + cell_lines
            + MATCH_LINE + "\n".join(record["candidates"]) + layout.get("tail", ""))


def render_messages(record, response=None):
    """Chat messages for a record; with a response, the assistant turn is appended."""
    messages = [{"role": "system", "content": render_system(record)},
                {"role": "user", "content": render_user(record)}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def read_jsonl(path):
    """All JSON objects of a JSONL file, one per non-empty line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl_atomic(path, rows):
    """Write rows as JSONL to a temporary name, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# 2. Tokenizer and model
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 3. Sampling and log-probabilities
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 4. Distributed setup and checkpoints
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 5. The demo
# ---------------------------------------------------------------------------------------------
