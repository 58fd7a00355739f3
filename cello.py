"""cello: what every stage shares, and the one-command demo.

Sections, top to bottom:
  1. Prompt rendering and files: a puzzle record -> the exact SPEC.md system and user messages;
     reading checked puzzle files, atomic writes.
  2. Tokenizer and model: presets built on the puzzle text, loading, token ids with a loss mask.
  3. Sampling and log-probabilities: batched KV-cache sampling, chunked per-token log-probs.
  4. Distributed setup, training helpers and checkpoints: torchrun, FSDP2, the learning-rate
     schedule, Hugging Face folders, resume state.
  5. The demo: the whole pipeline on the bundled data.

Run the whole pipeline on the bundled data (2-core CPU: 12-14 minutes in most hours, ~17 in the slowest seen):
    python cello.py demo
"""
import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface

import reward

# Older 5.x releases name the models' cache argument past_key_values: the sampler's and the
# shared-prompt path's caches would be ignored, and fail far from the cause (seen on a GPU machine
# with 5.17). So say it here.
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 24):
    raise ImportError(f"cello needs transformers >= 5.24 (requirements.txt), found {transformers.__version__}: "
                      f"pip install 'transformers>=5.24,<6'")

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
    return layout["system"] if "system" in layout else SYSTEM_TEMPLATE.format(n=len(record["cells"]))


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


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path, skip_broken=False):
    """All JSON objects of a JSONL file, one per non-empty line. skip_broken: leave out lines that do
    not parse (a line cut short by a crash mid-write, in files that are appended to as a run goes)."""
    rows = []
    with open(path, encoding="utf-8", errors="replace" if skip_broken else "strict") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if not skip_broken:
                    raise
    return rows


def check_file(path, script, flag, expected):
    """Exit with one line unless path is a file: "no such file", or "is a folder (expected ...)"."""
    if os.path.isdir(path):
        sys.exit(f"{script}: error: {flag} {path}: is a folder (expected {expected})")
    if not os.path.isfile(path):
        sys.exit(f"{script}: error: {flag} {path}: no such file")


def read_puzzles(path, flag, script, need_response=False):
    """The puzzle records of a JSONL file, checked. Bad input exits with one line naming the script,
    the flag or file and line, and what was expected: a missing file, a line that is not JSON, a
    record without a "response" string (when need_response: SFT files), without id / context /
    cells / candidates / answer, with a context that is not a string, cells that are not lists of
    gene strings, candidates or answer that are not lists of strings, whose cells, candidates and
    answer differ in length, an id that is not a non-empty string, no cells, an empty candidate or one
    holding "|", repeated candidates, or an answer that is not a permutation of the candidates."""
    def fail(where, what):
        sys.exit(f"{script}: error: {where}: {what}")

    check_file(path, script, flag, "a JSONL file of puzzle records")
    with open(path, "rb") as f:
        data = f.read()
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        fail(f"{flag} {path}", "not a UTF-8 text file (expected JSONL puzzle records)")
    records = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            fail(where, f"not valid JSON ({e.msg})")
        if not isinstance(record, dict):
            fail(where, "expected a JSON object (a puzzle record)")
        if need_response and not (isinstance(record.get("response"), str) and record["response"].strip()):
            fail(where, 'record has no "response" text (expected puzzle records with an accepted '
                        'response, as distill.py writes)')
        missing = [key for key in ("id", "context", "cells", "candidates", "answer") if key not in record]
        if missing:
            fail(where, f"lacks field(s) {', '.join(missing)}")
        if not isinstance(record["context"], str):
            fail(where, '"context" must be a string')
        if not is_str_list(record["candidates"]) or not is_str_list(record["answer"]):
            fail(where, '"candidates" and "answer" must be lists of strings')
        if not isinstance(record["cells"], list) or not all(is_str_list(c) for c in record["cells"]):
            fail(where, '"cells" must be a list of gene lists (lists of strings)')
        if not len(record["cells"]) == len(record["candidates"]) == len(record["answer"]):
            fail(where, "cells, candidates and answer must have the same length")
        if not isinstance(record["id"], str) or not record["id"]:
            fail(where, '"id" must be a non-empty string')
        if not record["cells"]:
            fail(where, "a puzzle needs at least one cell")
        # Rewards match labels stripped and case-insensitively; a gold answer that is not a permutation
        # of distinct candidates could never be matched by a well-formed response.
        candidates = [reward.norm_label(c) for c in record["candidates"]]
        if any("|" in c or not c for c in candidates):  # '|' separates the answer's labels (SPEC.md)
            fail(where, '"candidates" must be non-empty labels without "|" (the answer\'s separator)')
        if len(set(candidates)) != len(candidates):
            fail(where, '"candidates" must be distinct (compared stripped, case-insensitively)')
        if sorted(reward.norm_label(a) for a in record["answer"]) != sorted(candidates):
            fail(where, '"answer" must use every candidate exactly once (a permutation of "candidates")')
        records.append(record)
    if not records:
        fail(f"{flag} {path}", "no records")
    return records


# What a numeric flag expects -> its test (NaN fails every number range, infinity all but "inf: no limit").
RANGES = {
    "an integer >= 2": lambda v: v >= 2,
    "an integer >= 1": lambda v: v >= 1,
    "an integer >= 0": lambda v: v >= 0,
    "an integer in [0, 2^63)": lambda v: 0 <= v < 2**63,  # seeds: torch's generators take 64 bits
    "a number >= 0": lambda v: 0 <= v < math.inf,
    "a number > 0": lambda v: 0 < v < math.inf,
    "a number > 0 (inf: no limit)": lambda v: v > 0,
    "a number >= 0 (inf: no limit)": lambda v: v >= 0,
    "a number in (0, 1]": lambda v: 0 < v <= 1,
    "a number in [0, 1]": lambda v: 0 <= v <= 1,
    "a number in [0, 1)": lambda v: 0 <= v < 1,
}


def check_ranges(script, args, expected):
    """Exit with one line naming the first flag out of its range, e.g. "eval.py: error: --top-p:
    expected a number in (0, 1], got 1.5". expected: {flag: a RANGES key}; a flag left at None (unset)
    is not checked."""
    for flag, what in expected.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not RANGES[what](value):
            sys.exit(f"{script}: error: {flag}: expected {what}, got {value}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help for the scripts: the description's own layout, and each flag's default unless it is None
    or its help already says it. (puzzles.py has a twin: it must not import torch.)"""

    def _get_help_string(self, action):
        if any(action.default is skip for skip in (None, argparse.SUPPRESS, False)) or "default" in (action.help or ""):
            return action.help
        return action.help + " (default: %(default)s)"


def check_unique_ids(records, flag, path, script):
    """Exit with one line on a repeated puzzle id: ids key the results (pass@k) and the API cache."""
    seen = set()
    for r in records:
        if r["id"] in seen:
            sys.exit(f"{script}: error: {flag} {path}: duplicate id {r['id']!r} (each puzzle needs its own id)")
        seen.add(r["id"])


_created_out_dirs = []  # (the folder, the topmost folder this process created for it), for a failed run
_out_dir_locks = {}  # folder -> the open .lock file this process holds (flock), until it exits


def make_out_dir(path, script):
    """Create the output folder (and its parents), or exit with one line saying why not (say, a file of
    that name exists, or another run is using it). A folder created here is removed again if the run
    then fails before it holds any work (remove_unused_out_dirs), so bad input found late still leaves
    no folder behind. Every rank calls it; rank 0 locks the folder for the run."""
    topmost_new = None
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        topmost_new, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        sys.exit(f"{script}: error: --out-dir {path}: cannot create the folder ({e.strerror})")
    try:  # an existing read-only folder would fail only at the first write, after the work
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        sys.exit(f"{script}: error: --out-dir {path}: cannot write in the folder ({e.strerror})")
    if topmost_new is not None:
        _created_out_dirs.append((os.path.abspath(path), topmost_new))
    exit_together(_lock_out_dir(path, script) if get_rank() == 0 else None)


def _lock_out_dir(path, script):
    """Take OUT_DIR/.lock (an exclusive flock, released when the process ends, even by a kill); returns
    None, or the one-line error when another run holds it: two runs in one folder would mix their
    checkpoints and metrics."""
    key = os.path.realpath(path)
    if key in _out_dir_locks:  # this process took it already (a test that runs main() twice)
        return None
    lock = open(os.path.join(path, ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return f"{script}: error: --out-dir {path}: another run is using it (it holds {path}/.lock); wait for it, or choose another --out-dir"
    _out_dir_locks[key] = lock
    return None


def release_out_dirs():
    """Let go of the folders this process locked (a process's end does it too)."""
    for lock in _out_dir_locks.values():
        lock.close()
    _out_dir_locks.clear()


def exit_together(problem):
    """Exit with rank 0's one-line problem on every rank (None: go on). Under torchrun a rank that
    exited alone would leave the others waiting on it, then failing with a traceback."""
    if dist.is_initialized():
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        sys.exit(problem)


def remove_unused_out_dirs():
    """After a failed run: remove each folder make_out_dir created that holds nothing, or only preset
    models built by this run (<preset>-init: rebuilt in seconds from the same data and seed), and the
    parents created with it. A folder with anything else (a checkpoint, metrics, an API cache) is kept."""
    rebuilt = {f"{name}-init" for name in PRESETS} | {".lock"}
    for path, topmost_new in _created_out_dirs:
        if not os.path.isdir(path) or not set(os.listdir(path)) <= rebuilt:
            continue
        shutil.rmtree(path, ignore_errors=True)
        while path != topmost_new and not os.path.exists(path):  # the parents, while empty
            path = os.path.dirname(path)
            with contextlib.suppress(OSError):
                os.rmdir(path)


def check_device(device, script):
    """The device to use: device (None: default_device()), or exit with one line unless it is cpu or a
    cuda device this machine and torch build have."""
    device = device or default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        sys.exit(f"{script}: error: --device: expected cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: error: --device {device}: no CUDA device here (or a CPU-only torch build)")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        sys.exit(f"{script}: error: --device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def is_str_list(value):
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def write_text_atomic(path, text):
    """Write text to a temporary name, then rename: a crash never leaves half a file."""
    # A fixed name (one writer per file: rank 0 of one job), so a rerun overwrites what a killed
    # write left; a pid in the name would leave it for good.
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # UTF-8 whatever the locale: the readers expect it
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the text on disk before the new name points at it
        os.replace(tmp, path)
    finally:  # whatever failed, no temporary file stays behind
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path, obj):
    """One JSON object (indent 2), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path, rows, durable=False):
    """Append rows to a file as JSON lines. durable: flushed and fsync'd before returning, for work a
    kill must not lose (eval's partial rows, paid API answers)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        if durable:
            f.flush()
            os.fsync(f.fileno())


def end_torn_line(path):
    """End the file's last line with a newline when a kill cut it short, so that the next appended line
    starts a line of its own (the torn one is skipped by its reader)."""
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def write_jsonl_atomic(path, rows):
    """Rows as JSON lines, written atomically."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------
# 2. Tokenizer and model
# ---------------------------------------------------------------------------------------------
# Our own small models are ordinary Hugging Face folders (config.json, model.safetensors, tokenizer
# files, generation_config.json), so every script loads them exactly as it loads Qwen2.5-7B.

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"  # Qwen2.5's names
# Qwen2.5's ChatML layout (without its tool-calling branches); <|im_end|> closes each turn and is EOS.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Pre-tokenizer split: a word (letters, digits and the . _ - that gene symbols use, with its leading
# space or ", ") stays one piece, so BPE can learn " HLA-DRB1" and ", HLA-DRB1" as one token each:
# a gene list costs one token per gene instead of two, which makes prompts a third shorter.
# Punctuation runs and whitespace are pieces of their own. Every character falls in one alternative.
PRETOKEN_PATTERN = r"(?:, | )?[A-Za-z0-9][A-Za-z0-9._\-]*| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
# Text every tokenizer learns from besides the records, so the answer format has tokens of its own.
FORMAT_TEXT = "<think>\n</think>\n<answer> | </answer>"

PRESETS = {
    # tests: about 0.15M parameters (with a 1,024-token vocabulary), trains in seconds
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
    # the CPU demo: about 1.1M parameters on the demo's data (0.3M of them the tied embedding: its
    # tokenizer stops at ~2,300 of the 4,096 tokens allowed). Narrow, so that SFT gets
    # many steps on 2 cores: hidden 128 for 1,200 steps reached val loss 0.63 and 43% well-formed test
    # answers where hidden 256 for 500 steps (the same minutes) reached 0.83 and 22%
    "small": dict(vocab_size=4096, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
}


def record_texts(records):
    """The texts a tokenizer learns from: each record's system and user messages, and its response."""
    for record in records:
        yield render_system(record)
        yield render_user(record)
        if record.get("response"):
            yield record["response"]


def train_tokenizer(records, vocab_size):
    """A byte-level BPE tokenizer trained on the puzzle text, wrapped for transformers.

    Byte level (every byte is a base token, the decoder maps tokens back to bytes) makes
    decode(encode(text)) == text exactly for any text; nothing normalises or strips spaces.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    records = list(records)
    tok.train_from_iterator([FORMAT_TEXT, *record_texts(records)], trainer=trainer)
    # Each cell type of the records becomes one token, wherever it stands (candidate list, reasoning,
    # answer): copying a label is then one step instead of 3-7 tokens whose split depends on the
    # neighbouring characters (" T" vs " T."). single_word: never matched inside a longer word.
    labels = sorted({label for r in records for label in (*r["candidates"], *r["answer"])})
    tok.add_tokens([AddedToken(label, normalized=False, single_word=True) for label in labels])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD_TOKEN,
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=PRESETS["small"]["max_position_embeddings"])


def save_tokenizer(tokenizer, path):
    """tokenizer.save_pretrained, naming transformers 5's generic fast class by its older name
    (PreTrainedTokenizerFast) so that older transformers, and vLLM with them, load the folder too."""
    tokenizer.save_pretrained(path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)


def build_model(preset, out_dir, records, seed=0):
    """Train a tokenizer on the records and write a freshly initialised Llama-style model folder.

    The folder is written under a temporary name and renamed into place; returns out_dir.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        sys.exit(f"cello: error: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    records = list(records)
    if not records:
        sys.exit(f"cello: error: preset {preset!r} needs puzzle records to train its tokenizer; got none")
    tokenizer = train_tokenizer(records, PRESETS[preset]["vocab_size"])
    special = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(**{**PRESETS[preset], "vocab_size": len(tokenizer)}, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, **special)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special)
    tmp = f"{out_dir}.tmp"  # a fixed name: a rerun clears what a killed build left (only rank 0 builds)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def is_model_folder(path):
    """True when path is a Hugging Face model folder (it holds a config.json)."""
    return os.path.isfile(os.path.join(path, "config.json"))


def check_model_name(name_or_path, script, flag="--model"):
    """Exit with one line unless name_or_path is a preset or a Hugging Face folder (before any output is made)."""
    if name_or_path not in PRESETS and not is_model_folder(name_or_path):
        sys.exit(f"{script}: error: {flag} {name_or_path!r}: neither a preset ({', '.join(PRESETS)}) nor a Hugging "
                 "Face model folder (no config.json)")


def prepare_model(name_or_path, work_dir, records, seed=0):
    """A preset name builds a fresh model folder work_dir/<preset>-init from the records (the
    tokenizer learns their text) and returns its path; an existing HF folder is returned unchanged.

    Under torchrun (after setup_distributed) rank 0 builds while the other ranks wait.
    """
    if name_or_path in PRESETS:
        out_dir = os.path.join(work_dir, f"{name_or_path}-init")
        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(work_dir, exist_ok=True)
            build_model(name_or_path, out_dir, records, seed)
        if dist.is_initialized():
            dist.barrier()
        return out_dir
    check_model_name(name_or_path, "cello", "model")
    return name_or_path


def load_model(path, device="cpu"):
    """A causal LM from a local Hugging Face folder (never the hub), in float32 (the master weights:
    bf16 compute comes from autocast or FSDP2's mixed precision), with PyTorch's sdpa attention."""
    from transformers import AutoModelForCausalLM

    if not is_model_folder(path):
        sys.exit(f"cello: error: {path!r} is not a Hugging Face model folder (no config.json)")
    try:
        # use_kernels=False: transformers >= 5.25 swaps in kernels from the hub by default (on a GPU, at
        # .train()): offline that crashes, online it runs code that cello's sampler and log-probs were
        # never checked against
        model, loading = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                              local_files_only=True, use_kernels=False,
                                                              output_loading_info=True)
    except Exception as e:  # no weights file, a config transformers cannot read, a truncated safetensors file, ...
        sys.exit(f"cello: error: cannot load the model in {path!r} ({type(e).__name__}: "
                 f"{' '.join(str(e).split())[:300]})")
    missing = sorted(loading["missing_keys"])
    if missing:  # from_pretrained initialises them at random and goes on: a renamed or cut checkpoint
        sys.exit(f"cello: error: the weights in {path!r} do not fit its config.json: {len(missing)} weight(s) "
                 f"missing, e.g. {missing[0]} (unexpected in the file: {len(loading['unexpected_keys'])})")
    unsupported = unsupported_features(model.config)
    if unsupported:  # else the sampler and the log-probs would silently compute another distribution
        sys.exit(f"cello: error: the model in {path!r} uses {unsupported}, which cello's sampler and "
                 "log-probs do not implement")
    return model.to(device)


def check_fits_context(config, path, script, max_new_tokens, max_prompt_tokens=None):
    """Exit with one line when max_new_tokens (plus max_prompt_tokens, when given) is more than the
    model's context, config.max_position_embeddings: positions past it are untrained (garbage at best),
    and a typo such as --max-new-tokens 100000000000 would fail on a huge allocation instead."""
    context = getattr(config, "max_position_embeddings", None)
    need = max_new_tokens + (max_prompt_tokens or 0)
    if context is None or need <= context:
        return
    flags = f"--max-new-tokens {max_new_tokens}"
    if max_prompt_tokens is not None:
        flags = f"--max-prompt-tokens {max_prompt_tokens} + {flags} = {need} tokens"
    sys.exit(f"{script}: error: {flags} is more than the model's context of {context} tokens "
             f"(max_position_embeddings in {os.path.join(path, 'config.json')})")


def unsupported_features(config):
    """What of a model's config cello's own attention (_shared_prefix_attention) and log-prob head
    (_chunk_logprobs) leave out, as text ('' when nothing): sliding-window attention (Mistral v0.1,
    Phi-3-4k; Qwen2.5 has it switched off) and logit soft-capping (Gemma 2)."""
    found = []
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) is not None or "sliding_attention" in layer_types:
        found.append(f"sliding-window attention (sliding_window {getattr(config, 'sliding_window', None)})")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            found.append(f"{name} {getattr(config, name)}")
    return ", ".join(found)


def is_model_file(name):
    """Whether a file of a model folder is read by from_pretrained: config, weights, tokenizer."""
    return (name.endswith((".safetensors", ".bin", ".index.json")) or name.startswith(("tokenizer", "vocab", "merges"))
            or name in ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
                        "chat_template.jinja", "chat_template.json"))


def model_fingerprint(path):
    """A short hash of a model folder's content (config, tokenizer, weights), the same wherever the
    folder lies: small files whole, large ones (weights) by size and their first and last MiB, which
    differ between any two trainings or seeds. Cheap for a 7B folder (it reads ~2 MiB per shard).
    Only the model's own files count (not an eval's predictions.jsonl and summary.json written
    beside them), so using a folder does not change its identity."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if os.path.isfile(file) and is_model_file(name):
            h.update(f"{name}\0".encode())
            _hash_file(h, file)
    return h.hexdigest()[:16]


def file_fingerprint(path):
    """A short hash of one file's content (size, first and last MiB; whole when small), e.g. a run's
    data, so that --resume can tell the same data in a moved file from other data."""
    h = hashlib.sha256()
    _hash_file(h, path)
    return h.hexdigest()[:16]


def _hash_file(h, path):
    """Feed a file's size and content (whole up to 2 MiB, else its first and last MiB) to the hash h."""
    size = os.path.getsize(path)
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= 2 << 20:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())


def load_tokenizer(path):
    """The tokenizer of a local Hugging Face folder; it must have a chat template and an EOS token.

    Its EOS token ends every response: SFT trains it, the sampler stops at it (GRPO and eval alike).
    A tokenizer without a pad token (Llama-3's) pads with EOS: padding is masked by position
    everywhere, so its id never matters.
    """
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        sys.exit(f"cello: error: {path!r} is not a Hugging Face folder with a tokenizer (no tokenizer_config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # tokenizer.json missing, broken or cut short, ...
        sys.exit(f"cello: error: cannot load the tokenizer in {path!r} ({type(e).__name__}: "
                 f"{' '.join(str(e).split())[:300]})")
    if tokenizer.chat_template is None or tokenizer.eos_token_id is None:
        sys.exit(f"cello: error: the tokenizer in {path!r} needs a chat template and an EOS token")
    try:  # some templates refuse a system message (Gemma-1-it, Mistral-Instruct-v0.2): say so before any work
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      tokenize=False, add_generation_prompt=True)
    except Exception as e:
        sys.exit(f"cello: error: the chat template in {path!r} refuses cello's prompt (a system message, then "
                 f"a user message): {' '.join(str(e).split())[:200]}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(path, tokenizer):
    """The token ids that end a response of the model in folder path: the tokenizer's EOS (what SFT
    trains) and every EOS its generation_config.json lists, as generate() stops at each of them
    (Qwen2.5-Instruct lists <|im_end|> and <|endoftext|>; a sampler that stopped at the first only
    would run a response that emits the second on to the token budget)."""
    ids = {tokenizer.eos_token_id}
    config = os.path.join(path, "generation_config.json")
    if os.path.isfile(config):
        try:
            listed = read_json(config).get("eos_token_id")
        except (ValueError, AttributeError):  # not JSON, or not a JSON object
            sys.exit(f"cello: error: {config} is not a JSON object (a copy cut short?)")
        ids.update([listed] if isinstance(listed, int) else listed or [])
    return sorted(ids)


def response_text(tokenizer, response, stop_ids):
    """The text reward.py scores: the sampled tokens as they are, without the stop token that ended
    them. Special tokens inside stay in the text (skip_special_tokens=True would delete them, so a
    policy that emitted e.g. a pad token mid-answer would be scored on a cleaned-up answer it never
    wrote); reward.py then finds the format broken."""
    if response and response[-1] in stop_ids:
        response = response[:-1]
    return tokenizer.decode(response, skip_special_tokens=False)


def prompt_ids(tokenizer, record):
    """Token ids of the chat-formatted prompt, ending with the assistant turn's opening."""
    text = tokenizer.apply_chat_template(render_messages(record), tokenize=False, add_generation_prompt=True)
    # the template already holds every special token; adding a BOS here would double Llama-style ones
    return tokenizer.encode(text, add_special_tokens=False)


def example_ids(tokenizer, record, response):
    """(ids, loss_mask) of prompt + response + EOS, the sequence the sampler produces.

    loss_mask is 0 on the prompt and 1 on every response token and on the EOS (so the model learns
    to stop).
    """
    prompt = prompt_ids(tokenizer, record)
    answer = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


# ---------------------------------------------------------------------------------------------
# 3. Sampling and log-probabilities
# ---------------------------------------------------------------------------------------------
# Token lists go in and out; padded tensors exist only inside these functions (but the reference
# helpers at the end of the section). Rows are group-major
# everywhere: prompt p's G samples (or responses) are rows p*G .. p*G+G-1.


def _device_of(model):
    return next(model.parameters()).device


def right_pad(rows, fill=0, dtype=torch.long):
    """Lists of numbers -> (values [B, W] of dtype, `fill` after each row's end; real [B, W] bool, True
    on the rows' own entries). W is the longest row's length, at least 1."""
    width = max([len(r) for r in rows] + [1])
    values = torch.full((len(rows), width), fill, dtype=dtype)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, :len(r)] = torch.tensor(r, dtype=dtype)
        real[i, :len(r)] = True
    return values, real


@contextlib.contextmanager
def gathered_weights(model):
    """Under FSDP2, all-gather every sharded weight once for a whole rollout instead of per decode step.

    Every FSDP module is unsharded and told not to reshard after its forward; at the end each is
    resharded and put back to FSDP2's defaults (decoder layers reshard after forward, the root does
    not), which is what cello.shard_model sets up. A no-op for an ordinary (unsharded) model.
    """
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp_modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)


def _next_token(logits, temperature, top_p, generator):
    """Pick one token per row. logits [b, V] float32 -> tokens [b], their log-probs [b].

    The log-prob is log softmax(logits / T)[token], the distribution GRPO's ratio must use (top-p only
    restricts which tokens can be drawn; it does not renormalise the log-probs). T = 0 is greedy
    (argmax) and its log-probs are under T = 1.
    """
    if temperature == 0:
        logp = logits.log_softmax(-1)
        tokens = logits.argmax(-1)
    else:
        logp = (logits / temperature).log_softmax(-1)
        probs = logp.exp()
        if top_p < 1.0:
            # nucleus: keep the most likely tokens until their mass reaches top_p (always the first)
            sorted_probs, order = probs.sort(-1, descending=True)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        # inverse CDF: the first token whose cumulative probability reaches u, u uniform in (0, total].
        # One random number per row (torch.multinomial draws one per vocabulary entry: 1.6 ms of a
        # 20 ms decode step on CPU); a zero-probability token never comes first, as its cdf equals its
        # predecessor's. In float64: float32 resolves the cdf and u only to ~6e-8, so behind the
        # first tokens' mass every token less likely than that would be drawn with probability 0 (at
        # Qwen's 152k vocabulary 4k-100k tokens, a total-variation error of ~1e-3 per token against the
        # log-probs returned here, which GRPO's ratio takes as the sampling distribution).
        cdf = probs.double().cumsum(-1)  # [b, V]
        if not torch.isfinite(cdf[:, -1]).all():  # else searchsorted returns V: an index past the vocabulary
            raise ValueError("cello.sample: the model's logits are not finite (diverged weights?)")
        u = (1 - torch.rand((len(probs), 1), generator=generator, device=probs.device, dtype=torch.float64))
        u = u * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u)[:, 0]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling, shared_prefix, **kwargs):
    """Decode-step attention over a prompt shared by a group of rows, plus each row's own tokens.

    Row r (of P * G, group-major) belongs to prompt r // G. For each head, with q the row's query:
        scores = [q . Kprompt_j * scaling + bias_j  for the prompt's slots j] ++ [q . Kown_t * scaling]
        out = softmax(scores) @ [Vprompt ; Vown]
    the same numbers as attention over the row's own copy of prompt + response, but each prompt's
    keys and values are read once per step for its G rows (one batched matmul per group), not G times.
    shared_prefix: {"keys_t": per layer [P, kv_heads, d, W] (left-padded prompts' keys, transposed and
    contiguous: twice as fast a matmul on CPU as a transposed view), "values": per layer [P, kv_heads, W, d],
    "bias": [P, 1, 1, W] (0 on real slots, -inf on padding), "group": G, "live": [R] rows still
    decoding (of P * G), "length": response tokens so far}. query [R, H, 1, d]; key/value: the rows'
    own cache [R, kv_heads, >= length, d]. Returns ([R, 1, H, d], None) as Hugging Face's attention
    functions do. attention_mask is unused: the bias and "length" are the whole mask.
    """
    prefix_keys_t = shared_prefix["keys_t"][module.layer_idx]  # [P, kv_heads, d, W]
    prefix_values = shared_prefix["values"][module.layer_idx]  # [P, kv_heads, W, d]
    prompts, kv_heads, _, width = prefix_keys_t.shape
    group, live, length = shared_prefix["group"], shared_prefix["live"], shared_prefix["length"]
    rows, heads = query.shape[:2]
    per_kv = heads // kv_heads  # grouped-query attention: query heads per key/value head

    def to_groups(x):  # [P * G, H, n] -> [P, kv_heads, G * per_kv, n]: one matmul per prompt and kv head
        x = x.view(prompts, group, kv_heads, per_kv, -1).transpose(1, 2)
        return x.reshape(prompts, kv_heads, group * per_kv, -1)

    def to_rows(x):  # the inverse: [P, kv_heads, G * per_kv, n] -> [P * G, H, n]
        return x.view(prompts, kv_heads, group, per_kv, -1).transpose(1, 2).reshape(prompts * group, heads, -1)

    all_live = rows == prompts * group  # no row has finished yet: no scatter into the P * G layout needed

    def scatter(x):  # [R, H, n] -> [P * G, H, n]; finished rows get zeros (cheap, and keep the layout)
        if all_live:
            return x
        full = x.new_zeros((prompts * group, *x.shape[1:]))
        full[live] = x
        return full

    def gather(x):  # [P * G, H, n] -> [R, H, n]
        return x if all_live else x[live]

    query = query * scaling  # [R, H, 1, d]: scaling the query is cheaper than scaling the scores
    prefix_scores = to_groups(scatter(query[:, :, 0])) @ prefix_keys_t  # [P, kv_heads, G * per_kv, W]
    prefix_scores = gather(to_rows(prefix_scores.float() + shared_prefix["bias"]))  # [R, H, W]
    own_keys, own_values = key[:, :, :length], value[:, :, :length]  # [R, kv_heads, length, d]
    if per_kv > 1:
        own_keys, own_values = own_keys.repeat_interleave(per_kv, 1), own_values.repeat_interleave(per_kv, 1)
    own_scores = (query @ own_keys.transpose(-1, -2))[:, :, 0].float()  # [R, H, length]
    probs = torch.cat([prefix_scores, own_scores], -1).softmax(-1).to(query.dtype)  # [R, H, W + length]
    out = gather(to_rows(to_groups(scatter(probs[..., :width])) @ prefix_values))  # [R, H, d]
    out = out + (probs[..., None, width:] @ own_values)[:, :, 0]
    return out[:, None], None


# Registered by name so that the model's own attention layers call it during decoding (sample sets
# config._attn_implementation for the decode loop only); it builds its own mask, so the model makes none.
AttentionInterface.register("cello_shared_prefix", _shared_prefix_attention)
AttentionMaskInterface.register("cello_shared_prefix", lambda **kwargs: None)


def _prefill_prompts(model, prompts, num_samples, device):
    """Run each prompt once; returns (the logits of each prompt's last position [P, V] float32, the
    shared-prefix dict _shared_prefix_attention reads: every prompt's keys and values, left-padded)."""
    # Prefill each prompt once, alone: no padding mask, so attention takes its fast causal path
    # and does no work on padding (25% faster than one left-padded batch on CPU, bench_core.py).
    # Logits only for the last position.
    last_logits, prompt_caches = [], []
    for prompt in prompts:
        prompt_caches.append(DynamicCache(config=model.config))
        out = model(input_ids=torch.tensor([prompt], device=device), cache=prompt_caches[-1], use_cache=True,
                    logits_to_keep=1)
        last_logits.append(out.logits[0, -1].float())
    # Keep each prompt's keys and values once, left-padded to the longest: [P, kv_heads, width, head_dim]
    # per layer (keys stored transposed). Decoding attends to them through _shared_prefix_attention,
    # which reads each group's prompt once per step for all its G rows instead of G copies of it.
    width = max(len(p) for p in prompts)
    prefix_keys, prefix_values = [], []
    for layer_idx in range(len(prompt_caches[0].layers)):
        for states, padded in (("keys", prefix_keys), ("values", prefix_values)):
            first = getattr(prompt_caches[0].layers[layer_idx], states)  # [1, kv_heads, n, head_dim]
            full = first.new_zeros((len(prompts), first.shape[1], width, first.shape[3]))
            for i, prompt_cache in enumerate(prompt_caches):
                full[i, :, width - len(prompts[i]):] = getattr(prompt_cache.layers[layer_idx], states)[0]
            padded.append(full.transpose(-1, -2).contiguous() if states == "keys" else full)
    padding = torch.tensor([[True] * (width - len(p)) + [False] * len(p) for p in prompts], device=device)
    shared = {"keys_t": prefix_keys, "values": prefix_values, "group": num_samples,
              "bias": torch.zeros(padding.shape, device=device).masked_fill(padding, float("-inf"))[:, None, None]}
    return torch.stack(last_logits), shared


@torch.no_grad()
def sample(model, prompts, num_samples, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0,
           generator=None):
    """Sample num_samples responses per prompt with a KV cache; each prompt is prefilled once, and its
    keys and values are read once per decode step for all its samples (_shared_prefix_attention).

    prompts: P token lists (any lengths, left-padded inside). Returns dict(responses, logprobs,
    finished), each a list of R = P * num_samples rows, group-major. A response stops after the first
    token of stop_ids (one id or a list, e.g. stop_token_ids(path, tokenizer); the token is kept and
    finished=True), or after max_new_tokens tokens (finished=False); it never holds padding.
    logprobs[r][t] = log softmax(logits / temperature)[token] (under T = 1 for greedy, temperature=0).
    generator: a torch.Generator on the model's device for reproducible sampling.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")
    if num_samples < 1 or max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sample: bad num_samples={num_samples}, max_new_tokens={max_new_tokens}, "
                         f"temperature={temperature} or top_p={top_p}")
    device = _device_of(model)
    stop_ids = torch.tensor(stop_ids, device=device).view(-1)
    rows = len(prompts) * num_samples
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    if max_new_tokens == 0:
        return {"responses": [[] for _ in range(rows)], "logprobs": [[] for _ in range(rows)],
                "finished": [False] * rows}
    with gathered_weights(model):
        last_logits, shared = _prefill_prompts(model, prompts, num_samples, device)  # [P, V], the prompts' cache
        # The responses' own keys and values: a preallocated cache written in place (a DynamicCache
        # would torch.cat every layer's cache at every step, which took 70% of decoding on CPU).
        cache = StaticCache(config=model.config, max_cache_len=max(1, max_new_tokens - 1))
        logits = last_logits.repeat_interleave(num_samples, 0)  # [R, V]
        next_pos = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(num_samples, 0)  # [R]
        live = torch.arange(rows, device=device)  # output row of each row still decoding
        attention = model.config._attn_implementation
        model.config._attn_implementation = "cello_shared_prefix"
        try:
            for step in range(max_new_tokens):
                token, logprob = _next_token(logits, temperature, top_p, generator)
                tokens[live, step] = token
                logprobs[live, step] = logprob
                lengths[live] = step + 1
                stop = torch.isin(token, stop_ids)
                if step == max_new_tokens - 1:
                    finished[live[stop]] = True
                    break
                if stop.any():  # drop finished rows from the batch (and their cache) rather than decode padding
                    finished[live[stop]] = True
                    keep = (~stop).nonzero()[:, 0]
                    if len(keep) == 0:
                        break
                    live, token, next_pos = live[keep], token[keep], next_pos[keep]
                    for layer in cache.layers:
                        if layer.is_initialized:  # the cache allocates itself at the first forward
                            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
                shared["live"], shared["length"] = live, step + 1
                out = model(input_ids=token[:, None], position_ids=next_pos[:, None], cache=cache, use_cache=True,
                            shared_prefix=shared)
                logits = out.logits[:, -1].float()
                next_pos = next_pos + 1
        finally:
            model.config._attn_implementation = attention
    lengths = lengths.tolist()
    return {"responses": [t[:n] for t, n in zip(tokens.tolist(), lengths)],
            "logprobs": [lp[:n] for lp, n in zip(logprobs.tolist(), lengths)],
            "finished": finished.tolist()}


def _final_hidden(model, use_cache=False, **inputs):
    """The final (normed) hidden states [B, T, H] of a causal LM, without its [B, T, V] logits.

    The model runs through its own forward (so FSDP2's hooks gather and free the weights as usual);
    logits_to_keep=[] makes it project no position, and a hook catches the decoder's output.
    use_cache=True with cache=... fills (and attends to) that cache.
    """
    caught = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, out: caught.append(out.last_hidden_state))
    try:
        model(**inputs, use_cache=use_cache, logits_to_keep=torch.zeros(0, dtype=torch.long, device=_device_of(model)))
    finally:
        hook.remove()
    return caught[0]


def _chunk_logprobs(lm_head, hidden, targets, temperature):
    """hidden [n, H], targets [n] -> log softmax(lm_head(hidden) / T)[target], as [n] float32."""
    logits = lm_head(hidden).float()  # [n, V]: the only place logits exist
    if temperature != 1.0:  # a pass over [n, V] saved at T = 1 (SFT, and GRPO's default)
        logits = logits / temperature
    # log_softmax's fused kernel, forward and backward: an SFT step 3-7% faster on this CPU than
    # the target's logit minus logsumexp (two passes each way; BENCHMARKS.md)
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def _logprobs_of(model, hidden, targets, temperature, chunk_size):
    """log-probs of targets [n] from the hidden states [n, H] that predict them, chunk_size rows at a time.

    Only one chunk's [chunk_size, V] float32 logits exist at once; with grad enabled each chunk is
    checkpointed, so backward recomputes its logits instead of keeping all of them.
    chunk_size=None: as many rows as keep a chunk's float32 logits under 2**25 values (128 MB).
    """
    lm_head = model.get_output_embeddings()
    chunk_size = chunk_size or max(1, 2 ** 25 // lm_head.out_features)
    temperature = temperature or 1.0  # greedy (T = 0) log-probs are under T = 1, as in sample
    pieces = []
    for start in range(0, len(targets), chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, lm_head, h, t, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(lm_head, h, t, temperature))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


class _PrefixLayer(DynamicLayer):
    """A cache layer holding a fixed prefix (or none) that returns prefix + the keys and values of the
    forward now running, without appending them for good.

    Activation checkpointing replays each decoder layer's forward in backward, cache update included:
    DynamicLayer would append the same keys a second time and the replay would attend to them twice.
    Here a replay gets exactly the keys and values of the first run (keys [b, kv_heads, n, d]).
    """

    def __init__(self, keys=None, values=None):
        super().__init__()
        self.prefix_keys, self.prefix_values = keys, values
        if keys is not None:  # the mask is built from get_seq_length(): the prefix's length
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.prefix_keys is None:
            keys, values = key_states, value_states
        else:
            keys = torch.cat([self.prefix_keys, key_states], -2)
            values = torch.cat([self.prefix_values, value_states], -2)
        if not self.is_initialized:
            # Only a prefix-less layer's first run is kept (the prompt's keys, read back by the caller). A
            # replay's keys are not: they would hold its recomputed graph alive until the cache dies.
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True
        return keys, values


def _prefix_cache(model, prefixes=None):
    """A DynamicCache of _PrefixLayer layers: prefixes is a list of (keys, values) per layer, or None."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_PrefixLayer(*(prefixes[i] if prefixes else (None, None)))
                    for i in range(model.config.num_hidden_layers)]
    return cache


def _backward_later(tensors):
    """Detached copies of tensors (leaves that require grad) for the rest of the forward. Once a
    backward has computed all their gradients, a hook runs backward from tensors with those gradients:
    a pass over the graph that made them, started from inside the first (as reentrant checkpointing
    does)."""
    copies = [t.detach().requires_grad_() for t in tensors]

    def backward_the_rest(grads):
        pairs = [(t, g) for t, g in zip(tensors, grads) if g is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])

    torch.autograd.graph.register_multi_grad_hook(copies, backward_the_rest)
    return copies


def _shared_prompt_hidden(model, prompt, responses, device):
    """Hidden states [n, H] that predict the tokens of G responses to one prompt, the prompt run once.

    The prompt runs alone (causal, no mask: attention's fast path); its keys and values, expanded to G
    rows, are the cache of one forward of the G responses (right-padded to the longest, a padding
    mask). Attention then costs n^2/2 + G*L*(n + L) for prompt length n and response length L, not
    the (n + G*L)^2 of one packed row, and backward sends every response's gradient through the
    expanded keys and values into the prompt's single forward. Rows of the result: response by
    response, token by token; the prompt's last hidden state predicts each response's first token.
    Both forwards always run (even for empty responses): FSDP2 ranks must make the same calls.
    The caches are _PrefixLayer ones, so activation checkpointing may replay either forward.
    Backward runs in two passes: the responses' pass ends at detached copies of what they read from
    the prompt (its last hidden state, its keys and values per layer), and once all their gradients
    are in, a hook runs the prompt's pass from them (_backward_later). In one pass, autograd would sum
    a weight's contributions from both forwards before accumulating, so the responses' would wait for
    the prompt's backward to reach the layer: a second copy of the decoder's weight gradients
    (unsharded under FSDP2; 12.2 GiB at 7B, BENCHMARKS.md). In two, each pass accumulates at once.
    Groups in one call share the responses' pass (grpo.py's --micro-batch 1 has one group per call).
    Under FSDP2 the responses' pass must be the outer one: its layers' backward hooks queue FSDP2's
    end-of-backward work on it, so the nested prompt passes never trigger it (BENCHMARKS.md).
    """
    group, n = len(responses), len(prompt)
    prompt_cache = _prefix_cache(model)
    prompt_hidden = _final_hidden(model, use_cache=True, cache=prompt_cache,
                                  input_ids=torch.tensor([prompt], device=device))  # [1, n, H]
    reads = [prompt_hidden[:, -1:]] + [t for layer in prompt_cache.layers for t in (layer.keys, layer.values)]
    if reads[0].requires_grad:
        reads = _backward_later(reads)
    last_hidden, kv = reads[0], reads[1:]
    # expand: G views of the prompt's keys and values [1 -> G, kv_heads, n, d]; their gradients sum back
    cache = _prefix_cache(model, [(kv[2 * i].expand(group, -1, -1, -1), kv[2 * i + 1].expand(group, -1, -1, -1))
                                  for i in range(len(prompt_cache.layers))])
    ids, real = right_pad(responses)  # [G, L]
    ids, real, width = ids.to(device), real.to(device), ids.shape[1]
    attention = torch.cat([torch.ones((group, n), dtype=torch.long, device=device), real.long()], 1)  # [G, n + L]
    positions = torch.arange(n, n + width, device=device)[None].expand(group, -1)
    hidden = _final_hidden(model, use_cache=True, cache=cache, input_ids=ids, attention_mask=attention,
                           position_ids=positions)  # [G, L, H]
    predictors = torch.cat([last_hidden.expand(group, -1, -1), hidden[:, :-1]], 1)  # [G, L, H]
    return predictors[real]


def response_logprobs(model, prompts, responses, temperature=1.0, shared_prompt=True, chunk_size=None,
                      target_masks=None):
    """Log-probs of each response's tokens given its prompt, with gradients to the parameters.

    prompts: P token lists; responses: R = P * G token lists, group-major (response r belongs to prompt
    r // G). Returns (logprobs [R, L], mask [R, L]) float32, L = longest response:
    logprobs[r, t] = log softmax(logits / T)[responses[r][t]] given prompt + responses[r][:t], 0 where
    mask is 0. shared_prompt=True runs each prompt once and its G responses in one batch on the
    prompt's keys and values (_shared_prompt_hidden), which carry the gradients of all G responses.
    shared_prompt=False is the per-sequence reference (prompt + response per row). Logits are computed
    only at response positions, in chunks. Take gradients with .backward(): the shared prompt's share
    arrives in a second backward pass that accumulates into .grad, which torch.autograd.grad(loss,
    params) would not return.
    target_masks: optional R lists of 0/1, one per response token: log-probs only where 1 (0 elsewhere,
    and the returned mask is 1 only there); the output projection runs on those tokens alone. SFT
    passes the prompt's tail as the "response" with its loss mask (sft.summed_response_nll).
    """
    if not prompts or not responses or len(responses) % len(prompts) or any(len(p) == 0 for p in prompts):
        raise ValueError(f"response_logprobs: need P non-empty prompts and a multiple of P responses, "
                         f"got {len(prompts)} prompts and {len(responses)} responses")
    if target_masks is not None and [len(m) for m in target_masks] != [len(r) for r in responses]:
        raise ValueError("response_logprobs: target_masks must hold one 0/1 per response token")
    group = len(responses) // len(prompts)
    device = _device_of(model)
    lengths = torch.tensor([len(r) for r in responses], device=device)
    width = max(1, int(lengths.max()))
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [R, L]
    targets = torch.tensor([t for r in responses for t in r], dtype=torch.long, device=device)
    if shared_prompt:
        predicting = torch.cat([_shared_prompt_hidden(model, p, responses[i * group:(i + 1) * group], device)
                                for i, p in enumerate(prompts)])
    else:
        seqs = [prompts[r // group] + responses[r] for r in range(len(responses))]
        ids, real = right_pad(seqs)
        hidden = _final_hidden(model, input_ids=ids.to(device), attention_mask=real.long().to(device))
        # response token t of row r sits at len(prompt) + t; the hidden state one before predicts it
        rows = torch.arange(len(seqs), device=device).repeat_interleave(lengths)  # [N] row of each token
        t = torch.arange(len(targets), device=device) - (lengths.cumsum(0) - lengths)[rows]  # [N] index in response
        prompt_lengths = torch.tensor([len(prompts[r // group]) for r in range(len(responses))], device=device)
        predictors = prompt_lengths[rows] - 1 + t
        predicting = hidden[rows, predictors]
    if target_masks is not None:
        wanted = torch.tensor([bool(m) for r in target_masks for m in r], dtype=torch.bool, device=device)  # [N]
        mask = torch.zeros_like(mask).masked_scatter(mask, wanted)
        if len(wanted) and not wanted.any():  # the head still runs on one token (dropped below), so that every FSDP2
            wanted[0] = True  # rank makes the same calls
        predicting, targets = predicting[wanted], targets[wanted]
    values = _logprobs_of(model, predicting, targets, temperature, chunk_size)
    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_scatter(mask, values)
    return logprobs, mask.float()


# Reference helpers, for tests, check_gpu.py and bench_core.py only: padded batches as Hugging Face's
# generate() takes them, and per-token log-probs of padded rows (the chunked head checked against a
# naive one). The pipeline itself uses sample and response_logprobs above.

def left_pad(seqs, pad_id, device):
    """Left-pad token lists -> ids [B, T], attention mask [B, T] (1 on real tokens), positions [B, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # every real token at its unpadded position
    return ids.to(device), mask.to(device), positions.to(device)


def token_logprobs(model, input_ids, attention_mask, temperature=1.0, chunk_size=None):
    """Per-token log-probs: out[b, t] = log softmax(logits[b, t] / T)[input_ids[b, t + 1]].

    input_ids, attention_mask: [B, T] (left or right padding). Returns [B, T - 1] float32, 0 where
    token t or t + 1 is padding (a left-padded row's first token has no context to be predicted from).
    The [B, T, V] float32 logits never exist: only chunks of positions do.
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = _final_hidden(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    real = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()  # [B, T-1]: real token after a real one
    values = _logprobs_of(model, hidden[:, :-1][real], input_ids[:, 1:][real], temperature, chunk_size)
    return torch.zeros(real.shape, dtype=torch.float32, device=values.device).masked_scatter(real, values)


# ---------------------------------------------------------------------------------------------
# 4. Distributed setup, training helpers and checkpoints
# ---------------------------------------------------------------------------------------------
# One code path for 1 process and for torchrun: without torchrun every helper here is a no-op or
# its single-process case. Checkpoints are Hugging Face folders (from_pretrained and vLLM load them)
# plus the resume state: resume.pt (step, data position, scheduler, RNG of every rank) and
# optimizer.pt (kept apart so that only rank 0 ever holds the full optimizer state in memory).


def keep_freed_memory():
    """On CPU: ask glibc's malloc to keep freed memory for the next tensor instead of handing it back.

    By default glibc maps blocks over its mmap threshold (128 KB at start, raised to the largest one
    freed so far) straight from the kernel and unmaps them when freed, and trims free memory off the
    top of its heap. Each step's tensors (their sizes vary with the batch's lengths) then arrive as
    fresh pages that the kernel faults in and zeroes again: ~40,000 faults per demo GRPO step, ~8,000
    per SFT step. Kept, both steps run ~5% faster on this project's machine (BENCHMARKS.md), with
    bit-identical results. A no-op where the C library is not glibc. Returns whether glibc took all
    three settings.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(-3, 32 << 20) == 1,    # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
                mallopt(-1, 1 << 30) == 1,     # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap, not trim it
                mallopt(-2, 256 << 20) == 1])  # M_TOP_PAD: grow the heap 256 MiB at a time, not page by page


def default_device():
    """"cuda" when this machine has a GPU (and torch a CUDA build), else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_distributed():
    """Start the process group under torchrun (RANK / WORLD_SIZE set): nccl on this rank's GPU, gloo
    on CPU (where freed memory is kept first: keep_freed_memory). Returns (rank, world_size, device);
    a plain run is (0, 1, cuda or cpu)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        keep_freed_memory()
    if world_size == 1:
        return 0, 1, torch.device(default_device())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world_size, device


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs):
    """print on rank 0 only (every process of a torchrun job would print the same line)."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce(values):
    """Sum of a float, or of a list of floats elementwise, over all ranks; the values themselves when
    single process. Every rank must call it."""
    single = not isinstance(values, (list, tuple))
    if not dist.is_initialized():
        return float(values) if single else [float(v) for v in values]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([values] if single else list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() if single else t.tolist()


def all_gather_list(items):
    """A Python list concatenated over ranks, rank 0's items first; the list itself when single
    process. Every rank must call it."""
    if not dist.is_initialized():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def clip_grad_norm(parameters, max_norm):
    """Clip the global gradient norm to max_norm (over all ranks' shards under FSDP2); returns the
    norm before clipping as a float."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2


def lr_factor(step, warmup_steps, total_steps, min_lr_ratio=1.0):
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup: (step + 1) / warmup_steps for step < warmup_steps; then cosine decay
    min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2 with p = (step - warmup_steps) /
    max(1, total_steps - warmup_steps - 1), from 1 at the first step after warmup to min_lr_ratio at
    the last step (a single step after warmup runs at the peak). min_lr_ratio 1: constant after
    warmup (GRPO's schedule).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def keep_metrics_until(path, step):
    """Rank 0 at the start of a run: metrics.jsonl keeps the rows of steps <= step (those of the
    checkpoint a resumed run starts from; none for a fresh run, step 0 aside). Rows written after that
    checkpoint are dropped, because the resumed run writes them again."""
    if get_rank() == 0:
        old = read_jsonl(path, skip_broken=True) if step > 0 and os.path.exists(path) else []
        write_jsonl_atomic(path, [row for row in old if row["step"] <= step])


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def run_script(main, script, how_to_continue):
    """Run a script's main(). Ctrl-C ends it with one line that says how to continue instead of a
    traceback; a failed run removes the out-dir it created if it holds no work yet; a torchrun rank
    then ends as exit_after_torchrun says."""
    _created_out_dirs.clear()  # only this main()'s folders
    try:
        main()
    except KeyboardInterrupt:
        remove_unused_out_dirs()
        sys.exit(f"{script}: interrupted; {how_to_continue}")
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (None, 0)):
            remove_unused_out_dirs()
        raise
    exit_after_torchrun()


def refuse_torchrun(script):
    """Exit with one line under torchrun with several processes, for a script that runs in one: each
    process would do the whole job and write the same files."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit(f"{script}: error: it runs in one process: start it with python, not torchrun")


def exit_after_torchrun():
    """End a torchrun rank (WORLD_SIZE > 1) without interpreter teardown, once its work is saved and
    the process group destroyed: on CPU a gloo worker thread can still be alive then, and in ~1 run in
    8 on a loaded 2-core machine it aborted the finished rank ("terminate called without an active
    exception", SIGABRT), so torchrun reported a failure. A plain run returns normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def shard_model(model, device, bf16=False, activation_checkpointing=False):
    """FSDP2: fully_shard each decoder layer, then the root, over a 1-D mesh of all ranks. Returns model.

    bf16: parameters are gathered and computed in bfloat16 while the sharded master weights and the
    gradient reduction stay float32 (MixedPrecisionPolicy). Without a process group (a plain run, or
    torchrun with one process) there is nothing to shard and bf16 is ignored (the scripts autocast).
    activation_checkpointing: recompute each decoder layer in backward instead of storing its
    activations (Hugging Face's gradient checkpointing; it acts in train() mode only).
    Layers reshard after their forward (memory); the root does not, since its parameters (embedding,
    final norm, head) are needed again at once (cello.gathered_weights relies on this setup).
    Create the optimizer after this call: sharding replaces the parameters with DTensor ones.
    """
    # e.g. {"LlamaDecoderLayer"}, {"Qwen2DecoderLayer"}
    layer_classes = tuple(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in layers:
            # Hugging Face drops the cache of a checkpointed layer (a replay would write it twice);
            # the caches that carry gradients here (_shared_prompt_hidden's) are replay-safe, so keep them
            layer._can_checkpoint_with_cache = True
    if not dist.is_initialized():
        return model
    if not layers:
        raise ValueError(f"shard_model: found no decoder layers ({layer_classes}) in {type(model).__name__}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the mesh names the model's device type (cuda under nccl, cpu under gloo) rather than leaving
    # FSDP2 to guess it: a CPU mesh on a machine with GPUs would otherwise move the model to CUDA
    mesh = init_device_mesh(device.type, (get_world_size(),))
    mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                 else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def bf16_autocast(model, bf16):
    """The context for a --bf16 forward: autocast to bfloat16 for an unsharded model (float32 weights
    and optimizer); under FSDP2 (cello.shard_model) the sharding policy casts instead, so it is off."""
    on = bf16 and not isinstance(model, FSDPModule)
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=on)


def rng_states():
    """The random number generator states this process draws from (python, numpy, torch, cuda)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():  # a machine with fewer GPUs than the saving one: theirs only
        for device, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def _tied_weight_names(model):
    """(output embedding weight name, input embedding weight name) when the two are tied, else None."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    names = {id(module): name for name, module in model.named_modules()}
    return names[id(model.get_output_embeddings())] + ".weight", names[id(model.get_input_embeddings())] + ".weight"


def _read_weights(folder):
    """The full state dict of a Hugging Face folder's safetensors file(s), on CPU."""
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(folder, "model.safetensors"))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for name in files for k, v in load_file(os.path.join(folder, name)).items()}


def is_checkpoint_complete(out_dir):
    """A checkpoint folder exists only once whole (renamed into place last), so config.json marks it."""
    return is_model_folder(out_dir)


def save_checkpoint(out_dir, model, tokenizer, optimizer=None, scheduler=None, state=None):
    """Write out_dir as a Hugging Face folder (config, model.safetensors, tokenizer, generation config)
    and, when an optimizer, scheduler or state is given, the resume state (resume.pt, optimizer.pt).

    Works for sharded (FSDP2) and plain models; every rank must call it. The full state dicts are
    gathered to rank 0's CPU, which writes everything into out_dir + ".tmp" and then renames it into
    place, so a crash never leaves a half-written folder under out_dir. An older checkpoint there is
    replaced (it survives as out_dir + ".old" if a crash hits between the renames and its deletion;
    checkpoint_to_resume resumes from it when out_dir is missing). out_dir
    belongs to the checkpoint: a non-empty folder that is not a checkpoint is refused, not deleted.
    """
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_checkpoint_complete(out_dir):
        raise ValueError(f"save_checkpoint: {out_dir} holds files but no checkpoint (no config.json); "
                         "refusing to replace it: give the checkpoint a folder of its own")
    # full_state_dict + cpu_offload: rank 0 gets every tensor on CPU, the other ranks empty dicts
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    rngs = all_gather_list([rng_states()])  # every rank's generators, so each one resumes its own stream
    if get_rank() == 0:
        tmp, old = out_dir + ".tmp", out_dir + ".old"
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier crash
        os.makedirs(tmp)
        try:
            tied = _tied_weight_names(model)
            if tied:
                weights.pop(tied[0])  # safetensors stores a tensor once; from_pretrained re-ties the head
            for name, tensor in weights.items():  # a gathered shard padded by FSDP2 is a view: own it
                if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                    weights[name] = tensor.clone()
            save_torch_state_dict(weights, tmp, max_shard_size="5GB")  # model.safetensors, or shards + index
            model.config.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
            save_tokenizer(tokenizer, tmp)
            if optimizer is not None or scheduler is not None or state is not None:
                if optimizer_state is not None:
                    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
                torch.save({"state": state or {}, "scheduler": scheduler.state_dict() if scheduler else None,
                            "rng": rngs, "world_size": get_world_size()}, os.path.join(tmp, "resume.pt"))
            _fsync_folder(tmp)  # on disk before the rename, so a power cut cannot leave empty files behind it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # A kill between any two of these lines leaves a whole checkpoint (last or last.old) in place:
        # the previous one is set aside only once the new one is written, and dropped only once the
        # new one has its name (when a resume started from last.old there is no last to set aside).
        if os.path.exists(out_dir):
            _remove_folder(old)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _fsync_folder(os.path.dirname(os.path.abspath(out_dir)), files=False)  # the renames themselves
        _remove_folder(old)
    if dist.is_initialized():
        dist.barrier()  # nobody reads the checkpoint before it is in place


def _fsync_folder(path, files=True):
    """Flush path's files (when files) and then the folder's own entries to disk."""
    if files:
        for name in os.listdir(path):
            if not os.path.isfile(os.path.join(path, name)):
                continue
            with open(os.path.join(path, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_folder(path):
    """Delete a folder by renaming it first: a kill mid-delete never leaves a half folder under a
    checkpoint's name."""
    trash = path + ".trash"
    shutil.rmtree(trash, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def checkpoint_to_resume(run_dir, resume, script):
    """The checkpoint a run in run_dir continues from: RUN_DIR/last for --resume, None for a fresh run.

    --resume takes last/, or last.old when a crash between save_checkpoint's two renames left only
    that. A fresh run refuses a run_dir that holds an earlier run's checkpoint: a later --resume would
    otherwise continue the earlier run's weights under the new flags without a word. One-line errors.
    """
    last = os.path.join(run_dir, "last")
    if resume:
        for folder in (last, last + ".old"):
            if os.path.isfile(os.path.join(folder, "resume.pt")) and is_checkpoint_complete(folder):
                return folder
        if os.path.isdir(last):  # not written by save_checkpoint (its rename is atomic): copied or edited by hand
            sys.exit(f"{script}: error: --resume: {last} is incomplete (it needs config.json, the weights and "
                     "resume.pt): restore it from a copy, or start afresh in another --out-dir")
        sys.exit(f"{script}: error: --resume: no checkpoint {last} to resume from")
    for name in ("last", "last.old"):
        if os.path.exists(os.path.join(run_dir, name)):
            sys.exit(f"{script}: error: --out-dir {run_dir} holds an earlier run's checkpoint ({name}/): pass "
                     f"--resume to continue that run, or choose another --out-dir")
    if os.path.exists(os.path.join(run_dir, "final")):  # a run from before the last step was checkpointed too
        sys.exit(f"{script}: error: --out-dir {run_dir} holds an earlier run's final model (final/) and no "
                 "checkpoint to resume from: choose another --out-dir")
    return None


def _unpickle(path):
    """Our own resume.pt / optimizer.pt (RNG states need pickle)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _read_checkpoint_part(read, path, what=None, rank0_only=False):
    """read(path) for a part of a resume checkpoint; a file cut short or damaged (torch's, safetensors'
    or the OS's error) is a one-line error naming `what` (default: the path), not a traceback.
    rank0_only: rank 0 reads, the other ranks get {} (rank 0 broadcasts what it read); a damaged file
    then stops every rank with rank 0's line, as the others would otherwise wait in the broadcast for a
    rank that has exited."""
    result, problem = {}, None
    if not rank0_only or get_rank() == 0:
        try:
            result = read(path)
        except Exception as e:
            problem = (f"cello: error: cannot read {what or path} ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]}): the checkpoint is damaged; resume from an intact copy "
                       "or start afresh")
    if rank0_only:
        exit_together(problem)
    elif problem:
        sys.exit(problem)
    return result


def load_resume(out_dir, model, optimizer=None, scheduler=None, expect=None):
    """Restore a save_checkpoint folder into model (weights), optimizer, scheduler and this rank's RNG;
    returns the saved state dict (e.g. {"step": ..., ...}). Works for sharded and plain models; every
    rank must call it. Rank 0 reads the weights and optimizer state and broadcasts them to the shards.
    expect: {key: value} the saved state must hold (say, the script and the --model of the run), so
    that a checkpoint of another run is a one-line error, not a traceback or a silent mix.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = os.path.join(out_dir, "resume.pt")
    if not os.path.isfile(path) or not is_checkpoint_complete(out_dir):
        sys.exit(f"cello: error: {out_dir} is not a resumable checkpoint (needs config.json and resume.pt)")
    resume = _read_checkpoint_part(_unpickle, path)
    for key, value in (expect or {}).items():  # (a checkpoint older than these keys is not checked)
        if key in resume["state"] and resume["state"][key] != value:
            sys.exit(f"cello: error: --resume: {out_dir} was saved with {key} {resume['state'][key]}, "
                     f"this run has {value}: resume with the run's own flags, or start afresh in another --out-dir")
    rank, sharded = get_rank(), dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    weights = _read_checkpoint_part(_read_weights, out_dir, f"the weights in {out_dir}", rank0_only=sharded)
    tied = _tied_weight_names(model)
    if tied and weights:
        weights[tied[0]] = weights[tied[1]]
    try:
        set_model_state_dict(model, weights, options=options)
    except RuntimeError as e:  # another architecture: "size mismatch for ...", "Missing key(s) ..."
        sys.exit(f"cello: error: --resume: the weights in {out_dir} do not fit this model ({str(e).splitlines()[0]})")
    if optimizer is not None:
        optimizer_path = os.path.join(out_dir, "optimizer.pt")
        if not os.path.isfile(optimizer_path):
            sys.exit(f"cello: error: {out_dir} has no optimizer state (optimizer.pt)")
        optimizer_state = _read_checkpoint_part(_unpickle, optimizer_path, rank0_only=sharded)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    if scheduler is not None and resume["scheduler"] is not None:
        scheduler.load_state_dict(resume["scheduler"])
        # The saved rate came from the saving run's schedule; this run's may differ (a run continued past
        # its end has a new total), so the next step takes its rate from this run's schedule.
        for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
    rngs = resume["rng"]  # with another number of ranks, each takes rank 0's streams
    set_rng_states(rngs[rank] if len(rngs) == get_world_size() else rngs[0])
    return resume["state"]


# ---------------------------------------------------------------------------------------------
# 5. The demo
# ---------------------------------------------------------------------------------------------
# `python cello.py demo` runs each stage's own script, exactly as a user would type it, so the demo
# is also an end-to-end test of the command lines. A stage whose output already exists is skipped:
# a demo killed half-way continues where it stopped when started again.

# The demo's puzzles are smaller than the paper's (N 8-15, M 50) so that SFT from scratch and GRPO
# fit 15 minutes on 2 CPU cores: N 4-6 cells of M 25 genes give ~330-400-token prompts (N 4-8 of 50
# genes: ~560).
DEMO_N, DEMO_GENES = (4, 6), 25
DEMO_CONTEXT = ("The cell is from a human donor, originating from the peripheral blood. "
                "The patient is healthy with no diagnosed disease.")


def demo_stages(out, data, sft_steps, cooldown_steps, grpo_steps):
    """The demo's stages: (name, script and arguments, the file whose existence means 'done')."""
    def resume_flag(run_dir):  # a training stage killed after a checkpoint continues from it
        return ["--resume"] if any(os.path.exists(os.path.join(run_dir, n)) for n in ("last", "last.old")) else []

    puzzles = os.path.join(out, "puzzles")
    train, val, test = (os.path.join(puzzles, f"{s}.jsonl") for s in ("train", "val", "test"))
    return [
        ("build puzzles", ["puzzles.py", "build", data, "--out-dir", puzzles, "--cell-type-key", "bulk_labels",
                           "--donor-key", "none", "--context", DEMO_CONTEXT, "--n-min", str(DEMO_N[0]),
                           "--n-max", str(DEMO_N[1]), "--genes", str(DEMO_GENES),
                           # 4,500 train puzzles from ~490 train cells, each list with dropout: every cell is
                           # in ~45 puzzles and never shows the same list, so the model must read the
                           # prompt rather than recall the cell (without dropout it recalled)
                           "--puzzles-per-group", "1500", "--train-gene-dropout", "0.3"],
         os.path.join(puzzles, "summary.json")),
        ("distill from the expert", ["distill.py", "--puzzles", train, "--train", train, "--teacher", "expert",
                                     "--samples", "4", "--out-dir", f"{out}/distill", "--yes"],
         f"{out}/distill/sft.jsonl"),
        # sft.py's and grpo.py's defaults are the demo's recipe. SFT: the model starts to copy prompt lines
        # (val loss ~0.55 -> ~0.30) in steps 1,200-1,500, and only while the learning rate is still high,
        # so it stays constant after warmup (EXPERIMENTS.md: "What moved the SFT row"). A checkpoint every 100
        # steps (0.2 s each); a val loss every 300 (~2 s each: every 100 took 0.5 min of the stage).
        ("SFT the small model", ["sft.py", "--data", f"{out}/distill/sft.jsonl", "--model", "small",
                                 "--out-dir", f"{out}/sft", "--max-steps", str(sft_steps), "--eval-every", "300",
                                 *resume_flag(f"{out}/sft")],
         f"{out}/sft/final/config.json"),
        # Then a second run from that model at a third of the rate: the high rate gets the copy transition
        # started, a lower one settles it (val loss 0.30 -> 0.07 in 300 steps, test validity 40% -> 65%;
        # 600 steps reach 0.04 and 70% but cost 1.8 minutes more; EXPERIMENTS.md: "Self-distillation, and
        # what more SFT steps at a lower rate do", and "The demo within 15 minutes").
        ("SFT at a third of the rate", ["sft.py", "--data", f"{out}/distill/sft.jsonl", "--model", f"{out}/sft/final",
                                        "--out-dir", f"{out}/sft-cool", "--max-steps", str(cooldown_steps),
                                        "--lr", "1e-3", "--eval-every", "300", *resume_flag(f"{out}/sft-cool")],
         f"{out}/sft-cool/final/config.json"),
        # GRPO: 4 puzzles x 8 samples, lr 1e-4; expert-style responses are 123, 158 and 196 tokens for
        # N = 4, 5, 6: a 240-token budget. 50 steps (~2 minutes): from the lower-rate SFT model test
        # batch-level accuracy goes 28.3% -> 31.7% / 35.0% / 36.7% after 50 / 75 / 100 steps, validity
        # 65.0% -> 71.7% / 71.7% / 76.7%; 100 steps would take the demo past 15 minutes (EXPERIMENTS.md:
        # "The demo within 15 minutes")
        ("GRPO from the SFT model", ["grpo.py", "--model", f"{out}/sft-cool/final", "--train", train, "--val", val,
                                     "--out-dir", f"{out}/grpo", "--steps", str(grpo_steps),
                                     *resume_flag(f"{out}/grpo")],
         f"{out}/grpo/final/config.json"),
        ("evaluate the baselines", ["eval.py", "--puzzles", test, "--train", train, "--responder", "random",
                                    "independent", "expert", "--out-dir", f"{out}/eval/baselines"],
         f"{out}/eval/baselines/summary.json"),
        ("evaluate SFT", ["eval.py", "--puzzles", test, "--responder", "model", "--model-path", f"{out}/sft-cool/final",
                          "--max-new-tokens", "300", "--out-dir", f"{out}/eval/sft"], f"{out}/eval/sft/summary.json"),
        ("evaluate SFT+GRPO", ["eval.py", "--puzzles", test, "--responder", "model", "--model-path",
                               f"{out}/grpo/final", "--max-new-tokens", "300", "--out-dir", f"{out}/eval/grpo"],
         f"{out}/eval/grpo/summary.json"),
    ]


def plot_grpo(metrics_path, png_path):
    """Reward and accuracy over GRPO steps (training rollouts, and greedy val where evaluated)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt
    every = read_jsonl(metrics_path)
    rows = [r for r in every if "reward_mean" in r]  # training steps (step 0 is the evaluation before training)
    steps = [r["step"] for r in rows]

    def trailing_mean(key, window=10):  # one step's 32 rollouts are noisy: the trend is in the mean
        values = [r[key] for r in rows]
        return [np.mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]

    fig, (ax_reward, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_reward.plot(steps, [r["reward_mean"] for r in rows], alpha=0.3, label="train reward (mean of rollouts)")
    ax_reward.plot(steps, trailing_mean("reward_mean"), label="the same, mean of the last 10 steps")
    ax_reward.set_xlabel("GRPO step")
    ax_reward.set_ylabel("reward")
    ax_reward.legend()
    measures = [("format_validity", "validity"), ("cell_accuracy", "cell-level"), ("batch_accuracy", "batch-level")]
    for i, (key, label) in enumerate(measures):
        ax_acc.plot(steps, trailing_mean(key), color=f"C{i}", label=f"train {label}")
    evaluated = [r for r in every if "val_batch_accuracy" in r]
    for i, (key, label) in enumerate(measures):
        ax_acc.plot([r["step"] for r in evaluated], [r[f"val_{key}"] for r in evaluated], "o--", color=f"C{i}",
                    label=f"val {label}")
    ax_acc.set_xlabel("GRPO step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("train: rollouts, 10-step means; val: greedy", fontsize="medium")
    ax_acc.set_ylim(0, 1.3)  # room above the curves for the legend
    ax_acc.legend(fontsize="small", loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    os.replace(png_path + ".tmp.png", png_path)


def demo(argv):
    """The whole pipeline on the bundled data, each stage timed, then the results table and a plot."""
    import subprocess
    import time
    parser = argparse.ArgumentParser(prog="cello.py demo", description=demo.__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out-dir", default="runs/demo", help="run folder: every stage writes below it")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                                       "pbmc68k_reduced.h5ad"), help="AnnData file of the demo")
    parser.add_argument("--sft-steps", type=int, default=1500, help="SFT optimizer steps (batch 8) at lr 3e-3")
    parser.add_argument("--cooldown-steps", type=int, default=300,
                        help="SFT optimizer steps that follow at lr 1e-3, from the first SFT run's model")
    parser.add_argument("--grpo-steps", type=int, default=50, help="GRPO steps (4 puzzles x 8 samples each)")
    args = parser.parse_args(argv)
    check_ranges("cello.py demo", args, {"--sft-steps": "an integer >= 1", "--cooldown-steps": "an integer >= 1",
                                         "--grpo-steps": "an integer >= 1"})
    here = os.path.dirname(os.path.abspath(__file__))
    check_file(args.data, "cello.py demo", "--data", "an .h5ad file")
    make_out_dir(args.out_dir, "cello.py demo")
    # A finished stage is skipped, so a folder made with other flags would report its old results (while
    # no stage has finished, as after a wrong --data, the flags may change).
    stages = demo_stages(args.out_dir, args.data, args.sft_steps, args.cooldown_steps, args.grpo_steps)
    flags = {"--data": file_fingerprint(args.data), "--sft-steps": args.sft_steps,
             "--cooldown-steps": args.cooldown_steps, "--grpo-steps": args.grpo_steps}
    flags_path = f"{args.out_dir}/demo_flags.json"
    before = flags
    if os.path.exists(flags_path) and any(os.path.exists(done) for _, _, done in stages):
        try:
            before = read_json(flags_path)
        except ValueError as e:
            sys.exit(f"cello.py demo: error: {flags_path} is not JSON ({e}): the flags of its finished stages are "
                     "unknown; choose another --out-dir")
    changed = [flag for flag in flags if before.get(flag) != flags[flag]]
    if changed:
        flag = changed[0]
        if flag not in before:  # a folder of an older demo, which had no such flag
            sys.exit(f"cello.py demo: error: {args.out_dir} was made by an older demo without {flag}: its finished "
                     "stages would be reused; choose another --out-dir")
        sys.exit(f"cello.py demo: error: {args.out_dir} was made with {flag} {before[flag]} (this run: "
                 f"{flags[flag]}; data by content): its finished stages would be reused; run with its flags, or "
                 "choose another --out-dir")
    write_json_atomic(flags_path, flags)
    timings_path = f"{args.out_dir}/timings.json"  # kept across restarts, so a resumed demo reports every stage
    timings = read_json(timings_path) if os.path.exists(timings_path) else {}
    for name, command, done in stages:
        if os.path.exists(done):
            print(f"== {name}: done already ({done})")
            continue
        print(f"== {name}: python {' '.join(command)}", flush=True)
        start = time.time()
        try:
            result = subprocess.run([sys.executable, os.path.join(here, command[0]), *command[1:]])
        finally:  # a stage killed and resumed reports the time of every attempt
            timings[name] = timings.get(name, 0.0) + time.time() - start
            write_json_atomic(timings_path, timings)
        if result.returncode != 0:
            sys.exit(f"cello.py demo: stage '{name}' failed (exit {result.returncode}); fix it and run the demo "
                     f"again: finished stages are kept")
    rows = read_json(f"{args.out_dir}/eval/baselines/summary.json")
    rows["SFT"] = read_json(f"{args.out_dir}/eval/sft/summary.json")["model"]
    rows["SFT+GRPO"] = read_json(f"{args.out_dir}/eval/grpo/summary.json")["model"]
    table = reward.format_table(rows)
    plot_grpo(f"{args.out_dir}/grpo/metrics.jsonl", f"{args.out_dir}/grpo.png")
    lines = [f"Test puzzles: {rows['random']['count']} (N {DEMO_N[0]}-{DEMO_N[1]}, M {DEMO_GENES} genes), "
             f"from {args.data}", "", table, ""]
    lines += [f"- {name}: {seconds / 60:.1f} min" for name, seconds in timings.items()]
    lines += [f"- total: {sum(timings.values()) / 60:.1f} min"]
    write_text_atomic(f"{args.out_dir}/results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.out_dir}/results.md and {args.out_dir}/grpo.png")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "demo":
        sys.exit("usage: python cello.py demo [--out-dir DIR] (see python cello.py demo --help)")
    run_script(lambda: demo(sys.argv[2:]), "cello.py demo",
               "the same command continues: finished stages are kept, and SFT and GRPO resume from their checkpoints")
