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
import contextlib
import json
import os
import random
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

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
# Token lists go in and out; padded tensors exist only inside these functions. Rows are group-major
# everywhere: prompt p's G samples (or responses) are rows p*G .. p*G+G-1.


def _device_of(model):
    return next(model.parameters()).device


def _left_pad(seqs, pad_id, device):
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
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


@torch.no_grad()
def sample(model, prompts, num_samples, max_new_tokens, eos_id, pad_id, temperature=1.0, top_p=1.0,
           generator=None):
    """Sample num_samples responses per prompt with a KV cache; each prompt is prefilled once.

    prompts: P token lists (any lengths, left-padded inside). Returns dict(responses, logprobs,
    finished), each a list of R = P * num_samples rows, group-major. A response stops at its EOS
    (included, finished=True) or after max_new_tokens tokens (finished=False); it never holds padding.
    logprobs[r][t] = log softmax(logits / temperature)[token] (under T = 1 for greedy, temperature=0).
    generator: a torch.Generator on the model's device for reproducible sampling.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")
    if num_samples < 1 or max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sample: bad num_samples={num_samples}, max_new_tokens={max_new_tokens}, "
                         f"temperature={temperature} or top_p={top_p}")
    device = _device_of(model)
    rows = len(prompts) * num_samples
    tokens = torch.full((rows, max(max_new_tokens, 1)), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max(max_new_tokens, 1)), dtype=torch.float32, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    with gathered_weights(model):
        # prefill: every prompt once, logits only for its last position
        ids, mask, positions = _left_pad(prompts, pad_id, device)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)
        # copy each prompt's cache to its G rows (group-major), then decode all rows together
        cache.batch_repeat_interleave(num_samples)
        logits = out.logits[:, -1].float().repeat_interleave(num_samples, 0)  # [R, V]
        mask = mask.repeat_interleave(num_samples, 0)  # [R, T]
        next_pos = positions[:, -1].repeat_interleave(num_samples, 0) + 1  # [R]
        live = torch.arange(rows, device=device)  # output row of each row still decoding
        for step in range(max_new_tokens):
            token, logprob = _next_token(logits, temperature, top_p, generator)
            tokens[live, step] = token
            logprobs[live, step] = logprob
            lengths[live] = step + 1
            stop = token == eos_id
            if step == max_new_tokens - 1:
                finished[live[stop]] = True
                break
            if stop.any():  # drop finished rows from the batch (and their cache) rather than decode padding
                finished[live[stop]] = True
                keep = (~stop).nonzero()[:, 0]
                if len(keep) == 0:
                    break
                live, token, mask, next_pos = live[keep], token[keep], mask[keep], next_pos[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        cache=cache, use_cache=True)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
    lengths = lengths.tolist()
    return {"responses": [t[:n] for t, n in zip(tokens.tolist(), lengths)],
            "logprobs": [lp[:n] for lp, n in zip(logprobs.tolist(), lengths)],
            "finished": finished.tolist()}


def _final_hidden(model, **inputs):
    """The final (normed) hidden states [B, T, H] of a causal LM, without its [B, T, V] logits.

    The model runs through its own forward (so FSDP2's hooks gather and free the weights as usual);
    logits_to_keep=[] makes it project no position, and a hook catches the decoder's output.
    """
    caught = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, out: caught.append(out.last_hidden_state))
    try:
        model(**inputs, use_cache=False, logits_to_keep=torch.zeros(0, dtype=torch.long, device=_device_of(model)))
    finally:
        hook.remove()
    return caught[0]


def _chunk_logprobs(lm_head, hidden, targets, temperature):
    """hidden [n, H], targets [n] -> log softmax(lm_head(hidden) / T)[target], as [n] float32."""
    logits = lm_head(hidden).float() / temperature  # [n, V]: the only place logits exist
    return logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)


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


def token_logprobs(model, input_ids, attention_mask, temperature=1.0, chunk_size=None):
    """Per-token log-probs: out[b, t] = log softmax(logits[b, t] / T)[input_ids[b, t + 1]].

    input_ids, attention_mask: [B, T] (left or right padding). Returns [B, T - 1] float32, 0 where
    token t + 1 is padding. The [B, T, V] float32 logits never exist: only chunks of positions do.
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = _final_hidden(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    real = attention_mask[:, 1:].bool()  # [B, T-1]: positions whose next token is a real token
    values = _logprobs_of(model, hidden[:, :-1][real], input_ids[:, 1:][real], temperature, chunk_size)
    return torch.zeros(real.shape, dtype=torch.float32, device=values.device).masked_scatter(real, values)


def _packed_rows(prompts, responses, group, device, attn_implementation):
    """One row per prompt: [prompt, response_1, ..., response_G], right-padded to the longest row.

    Returns ids [P, T], positions [P, T] (each response restarts right after its prompt), a 4D
    attention mask [P, 1, T, T] (a token sees its prompt and the earlier tokens of its own response),
    and for every response token: its packed row, the position of the hidden state that predicts
    it (the previous token of its response; the prompt's last token for the first one).
    """
    width = max(len(p) + sum(len(r) for r in responses[i * group:(i + 1) * group]) for i, p in enumerate(prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    positions = torch.zeros((len(prompts), width), dtype=torch.long)
    segment = torch.full((len(prompts), width), -1, dtype=torch.long)  # 0 prompt, g+1 response g, -1 pad
    rows, predictors = [], []
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        ids[i, :n] = torch.tensor(prompt)
        positions[i, :n] = torch.arange(n)
        segment[i, :n] = 0
        start = n
        for g, response in enumerate(responses[i * group:(i + 1) * group]):
            m = len(response)
            if m:
                ids[i, start:start + m] = torch.tensor(response)
                positions[i, start:start + m] = torch.arange(n, n + m)
                segment[i, start:start + m] = g + 1
            rows += [i] * m
            predictors += [n - 1] + list(range(start, start + m - 1)) if m else []
            start += m
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    allowed = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding sees itself: no fully masked row (NaN) anywhere
    allowed = allowed[:, None]  # [P, 1, T, T]
    if attn_implementation != "sdpa":  # eager attention adds the mask to its scores
        allowed = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return (ids.to(device), positions.to(device), allowed.to(device),
            torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(predictors, dtype=torch.long, device=device))


def response_logprobs(model, prompts, responses, temperature=1.0, shared_prompt=True, chunk_size=None):
    """Log-probs of each response's tokens given its prompt, with gradients to the parameters.

    prompts: P token lists; responses: R = P * G token lists, group-major (response r belongs to prompt
    r // G). Returns (logprobs [R, L], mask [R, L]) float32, L = longest response:
    logprobs[r, t] = log softmax(logits / T)[responses[r][t]] given prompt + responses[r][:t], 0 where
    mask is 0. shared_prompt=True packs each prompt with its G responses into one row and one forward
    (a block attention mask keeps the responses apart), so the prompt is computed once and its keys and
    values carry the gradients of all G responses. shared_prompt=False is the per-sequence reference
    (prompt + response per row). Logits are computed only at response positions, in chunks.
    """
    if not prompts or len(responses) % len(prompts) or any(len(p) == 0 for p in prompts):
        raise ValueError(f"response_logprobs: need P non-empty prompts and a multiple of P responses, "
                         f"got {len(prompts)} prompts and {len(responses)} responses")
    group = len(responses) // len(prompts)
    device = _device_of(model)
    lengths = torch.tensor([len(r) for r in responses], device=device)
    width = max(1, int(lengths.max()))
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [R, L]
    targets = torch.tensor([t for r in responses for t in r], dtype=torch.long, device=device)
    if shared_prompt:
        ids, positions, attention, rows, predictors = _packed_rows(
            prompts, responses, group, device, model.config._attn_implementation)
        hidden = _final_hidden(model, input_ids=ids, attention_mask=attention, position_ids=positions)
    else:
        seqs = [prompts[r // group] + responses[r] for r in range(len(responses))]
        seq_width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), seq_width), dtype=torch.long)
        attention = torch.zeros((len(seqs), seq_width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            attention[r, :len(s)] = 1
        hidden = _final_hidden(model, input_ids=ids.to(device), attention_mask=attention.to(device))
        rows = torch.arange(len(seqs), device=device).repeat_interleave(lengths)
        prompt_lengths = torch.tensor([len(prompts[r // group]) for r in range(len(responses))], device=device)
        predictors = prompt_lengths[rows] - 1 + (torch.arange(len(targets), device=device)
                                                 - (lengths.cumsum(0) - lengths)[rows])
    values = _logprobs_of(model, hidden[rows, predictors], targets, temperature, chunk_size)
    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_scatter(mask, values)
    return logprobs, mask.float()


# ---------------------------------------------------------------------------------------------
# 4. Distributed setup and checkpoints
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 5. The demo
# ---------------------------------------------------------------------------------------------
