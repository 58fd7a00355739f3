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
import random
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist

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
# space) stays one piece, so BPE can learn " HLA-DRB1" as one token; punctuation runs and whitespace
# are pieces of their own. Every character falls in one of the alternatives.
PRETOKEN_PATTERN = r" ?[A-Za-z0-9][A-Za-z0-9._\-]*| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
# Text every tokenizer learns from besides the records, so the answer format has tokens of its own.
FORMAT_TEXT = "<think>\n</think>\n<answer> | </answer>"

PRESETS = {
    # tests: about 0.1M parameters, trains in seconds
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
    # the CPU demo: about 4M parameters (1M of them the tied embedding)
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
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
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([FORMAT_TEXT, *record_texts(records)], trainer=trainer)
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
    tmp = f"{out_dir}.tmp{os.getpid()}"
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
    if not is_model_folder(name_or_path):
        sys.exit(f"cello: error: model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                 "nor a Hugging Face model folder (no config.json)")
    return name_or_path


def load_model(path, device="cpu", dtype=torch.float32):
    """A causal LM from a local Hugging Face folder (never the hub), with PyTorch's sdpa attention."""
    from transformers import AutoModelForCausalLM

    if not is_model_folder(path):
        sys.exit(f"cello: error: {path!r} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True)
    return model.to(device)


def load_tokenizer(path):
    """The tokenizer of a local Hugging Face folder; it must have a chat template and an EOS token."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        sys.exit(f"cello: error: {path!r} is not a Hugging Face folder with a tokenizer (no tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.chat_template is None or tokenizer.eos_token_id is None:
        sys.exit(f"cello: error: the tokenizer in {path!r} needs a chat template and an EOS token")
    return tokenizer


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


# ---------------------------------------------------------------------------------------------
# 4. Distributed setup and checkpoints
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 5. The demo
# ---------------------------------------------------------------------------------------------
