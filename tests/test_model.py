"""Tests for cello.py section 2: the puzzle tokenizer, model presets, loading and loss masks."""
import json
import os
import shutil
import statistics
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cello
import reward
from conftest import DATA, ROOT

CONTEXT = "The cell is from a human, originating from the blood. The patient is healthy with no diagnosed disease."


def make_records(genes_per_cell=50, puzzles_per_lane=2, seed=0):
    """Real puzzles from the bundled pbmc68k data, built simply: per lane (batch), one random cell per
    label, its top genes by .raw expression, sorted candidates, and a short well-formed response."""
    import anndata

    with warnings.catch_warnings():  # the bundled file is an old anndata format: harmless warnings
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(DATA)
    raw = adata.raw.X.toarray() if hasattr(adata.raw.X, "toarray") else np.asarray(adata.raw.X)
    genes = np.asarray(adata.raw.var_names)
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    lanes = np.array([barcode.rsplit("-", 1)[1] for barcode in adata.obs_names])
    rng = np.random.default_rng(seed)
    records = []
    for lane in sorted(set(lanes)):
        for k in range(puzzles_per_lane):
            lane_labels = sorted(set(labels[lanes == lane]))
            cells = [rng.choice(np.where((lanes == lane) & (labels == label))[0]) for label in lane_labels]
            cells = list(rng.permutation(cells))
            top = [[str(g) for g in genes[np.argsort(-raw[i], kind="stable")[:genes_per_cell]]] for i in cells]
            answer = [str(labels[i]) for i in cells]
            response = (f"<think>Cell 1 expresses {', '.join(top[0][:3])}; weighing all  cells together.\n"
                        f"Café-style unicode and   spaces survive.</think>\n<answer>{' | '.join(answer)}</answer>")
            records.append(dict(id=f"pbmc68k_reduced/lane{lane}/{k}", source="pbmc68k_reduced.h5ad", donor="D0",
                                batch=lane, split="train", context=CONTEXT, cells=top,
                                candidates=sorted(answer), answer=answer, response=response))
    return records


@pytest.fixture(scope="module")
def records():
    return make_records()


@pytest.fixture(scope="module")
def small_dir(records, tmp_path_factory):
    return cello.build_model("small", str(tmp_path_factory.mktemp("models") / "small"), records, seed=0)


@pytest.fixture(scope="module")
def tiny_dir(records, tmp_path_factory):
    return cello.build_model("tiny", str(tmp_path_factory.mktemp("models") / "tiny"), records, seed=0)


def test_scored_text_keeps_special_tokens_inside_and_drops_the_stop_token(tiny_dir):
    tokenizer = cello.load_tokenizer(tiny_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    think = tokenizer.encode("<think>x</think>\n", add_special_tokens=False)
    answer = tokenizer.encode("<answer>A | B</answer>", add_special_tokens=False)
    finished = cello.response_text(tokenizer, think + answer + [eos], [eos])
    assert finished == "<think>x</think>\n<answer>A | B</answer>" and reward.parse_answer(finished, 2)["valid"]
    assert cello.response_text(tokenizer, think + answer, [eos]) == finished  # cut off at the budget: as sampled
    assert cello.response_text(tokenizer, [], [eos]) == ""  # a budget of 0 tokens
    # a pad token the policy wrote mid-response stays in the text, so the format check sees it
    hidden = cello.response_text(tokenizer, think + [pad] + answer + [eos], [eos])
    assert hidden == "<think>x</think>\n" + tokenizer.pad_token + "<answer>A | B</answer>"
    assert reward.parse_answer(hidden, 2)["error"] == "expected exactly one newline between </think> and <answer>"
    # whichever stop token ended the response (Qwen's EOS or its pad) is left out of the text
    for stop in (eos, pad):
        assert cello.response_text(tokenizer, think + answer + [stop], sorted({eos, pad})) == finished


def test_prompt_ids_add_no_bos_to_the_template_s_text():
    """The chat template already holds every special token: a tokenizer that would prepend a BOS on
    encode (Llama-style) must not get one more."""
    class BosTokenizer:
        eos_token_id = 1

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "T"

        def encode(self, text, add_special_tokens):
            return ([100] if add_special_tokens else []) + [ord(c) for c in text]

    record = {"context": "c", "cells": [["X"]], "candidates": ["A"]}
    assert cello.prompt_ids(BosTokenizer(), record) == [ord("T")]
    # nor the response, which follows the prompt mid-sequence
    assert cello.example_ids(BosTokenizer(), record, "R") == ([ord("T"), ord("R"), 1], [0, 1, 1])


@pytest.mark.parametrize("folder", ["tiny_dir", "small_dir"])
def test_round_trip_every_prompt_and_response(folder, records, request):
    tokenizer = cello.load_tokenizer(request.getfixturevalue(folder))
    for record in records:
        for text in [cello.render_system(record), cello.render_user(record), record["response"]]:
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.decode(ids) == text
        # the whole chat-formatted example, special tokens included
        ids, _ = cello.example_ids(tokenizer, record, record["response"])
        full = tokenizer.apply_chat_template(cello.render_messages(record, record["response"]), tokenize=False)
        assert tokenizer.decode(ids) + "\n" == full


TOKENIZER_CACHE = {}


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_any_text(text):
    # byte level: texts the tokenizer never saw (any unicode, odd whitespace) come back exactly too
    if not TOKENIZER_CACHE:
        TOKENIZER_CACHE["tokenizer"] = cello.train_tokenizer(make_records(puzzles_per_lane=1), 512)
    tokenizer = TOKENIZER_CACHE["tokenizer"]
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_gene_symbols_are_mostly_single_tokens(small_dir, records):
    tokenizer = cello.load_tokenizer(small_dir)
    occurrences = [gene for record in records for cell in record["cells"] for gene in cell[1:]]
    # inside a gene list every gene after the first comes as ", GENE": one token with its separator
    single = sum(len(tokenizer.encode(", " + gene, add_special_tokens=False)) == 1 for gene in occurrences)
    assert single / len(occurrences) >= 0.95
    # "Cell 1: GNLY, NKG7" -> ..., " GNLY", ", NKG7"
    record = records[0]
    first, second = record["cells"][0][:2]
    ids = tokenizer.encode(f"Cell 1: {first}, {second}", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[-2:] == ["Ġ" + first, ",Ġ" + second]


def test_cell_types_are_single_tokens_wherever_they_stand(small_dir, records):
    tokenizer = cello.load_tokenizer(small_dir)
    record = records[0]
    label, other = record["candidates"][:2]  # e.g. "CD4+/CD45RA+/CD25- Naive T": 7 BPE pieces without this
    (label_id,) = tokenizer.encode(label, add_special_tokens=False)
    for text in [f"\n{label}\n", f"<answer>{label} | {other}</answer>", f"Left: {other}; {label}\n",
                 f"Cell 2: GNLY -> {label}\n"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids.count(label_id) == 1 and tokenizer.decode(ids) == text
    # every candidate line of a prompt is one label token
    assert all(len(tokenizer.encode(c, add_special_tokens=False)) == 1 for r in records for c in r["candidates"])
    # single_word: a label is never cut out of a longer word
    for text in [f"x{label}", f"{label}x"]:
        assert label_id not in tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_special_tokens_and_chat_template(small_dir, records):
    tokenizer = cello.load_tokenizer(small_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    record = records[0]
    expected = (f"<|im_start|>system\n{cello.render_system(record)}<|im_end|>\n"
                f"<|im_start|>user\n{cello.render_user(record)}<|im_end|>\n<|im_start|>assistant\n")
    ids = cello.prompt_ids(tokenizer, record)
    assert tokenizer.decode(ids) == expected
    # special tokens are single ids, and no BOS or other token is added around the template
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(tokenizer.eos_token_id) == 2
    assert tokenizer.encode("ab", add_special_tokens=True) == tokenizer.encode("ab", add_special_tokens=False)


def test_example_ids_mask_exactly_the_response_and_eos(small_dir, records):
    tokenizer = cello.load_tokenizer(small_dir)
    for record in records[:4]:
        prompt = cello.prompt_ids(tokenizer, record)
        ids, mask = cello.example_ids(tokenizer, record, record["response"])
        assert len(ids) == len(mask)
        assert ids[:len(prompt)] == prompt
        assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))  # zero loss over exactly the prompt
        assert ids[-1] == tokenizer.eos_token_id
        trained = [i for i, m in zip(ids, mask) if m]
        assert tokenizer.decode(trained) == record["response"] + "<|im_end|>"


def test_build_writes_a_folder_auto_classes_load(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"]:
        assert os.path.isfile(os.path.join(tiny_dir, name)), name
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    with open(os.path.join(tiny_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
    # the tiny preset is tiny: about 0.15M parameters
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 200_000
    # loaded through cello: same weights, sdpa attention, the right eos in generate
    again = cello.load_model(tiny_dir)
    assert again.config._attn_implementation == "sdpa"
    # no hub kernels: transformers 5.25 turns them on by default, and on a GPU .train() then downloads
    # them (offline: a crash; online: layers cello's sampler and log-probs were never checked against)
    assert not getattr(again, "use_kernels", False)
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(x).logits, again(x).logits)


def test_small_preset_size():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cello.PRESETS["small"], tie_word_embeddings=True))
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 2_000_000


def test_a_build_killed_half_way_leaves_nothing_after_the_rerun(records, tmp_path):
    """A kill while the folder is written leaves its temporary folder; the next build clears it."""
    os.makedirs(tmp_path / "tiny-init.tmp")
    (tmp_path / "tiny-init.tmp" / "config.json").write_text("{")  # half written
    cello.build_model("tiny", str(tmp_path / "tiny-init"), records)
    assert sorted(os.listdir(tmp_path)) == ["tiny-init"] and cello.is_model_folder(str(tmp_path / "tiny-init"))


def test_build_is_deterministic_for_a_seed(records, tmp_path):
    a = cello.load_model(cello.build_model("tiny", str(tmp_path / "a"), records[:3], seed=1))
    b = cello.load_model(cello.build_model("tiny", str(tmp_path / "b"), records[:3], seed=1))
    c = cello.load_model(cello.build_model("tiny", str(tmp_path / "c"), records[:3], seed=2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_prepare_model(records, tiny_dir, tmp_path):
    path = cello.prepare_model("tiny", str(tmp_path / "work"), records[:3])
    assert path == str(tmp_path / "work" / "tiny-init") and cello.is_model_folder(path)
    assert cello.prepare_model(tiny_dir, str(tmp_path / "work"), records) == tiny_dir


@pytest.mark.parametrize("call", [
    lambda p, records: cello.prepare_model(p, "/tmp", records),
    lambda p, records: cello.load_model(p),
    lambda p, records: cello.load_tokenizer(p),
])
def test_bad_path_is_one_clear_error(call, records, tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match=r"cello: error: .*empty.* (config|tokenizer_config)\.json"):
        call(str(tmp_path / "empty"), records)


def test_weights_that_do_not_fit_the_config_are_refused(tiny_dir, tmp_path):
    """from_pretrained fills missing weights at random and goes on: a checkpoint saved with a wrapper's
    prefix (torch.compile's _orig_mod.) would be a random model. load_model refuses it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_dir, tmp_path / "prefixed")
    weights = load_file(tmp_path / "prefixed" / "model.safetensors")
    save_file({"_orig_mod." + k: v for k, v in weights.items()}, tmp_path / "prefixed" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(SystemExit) as exit_info:
        cello.load_model(str(tmp_path / "prefixed"))
    assert str(exit_info.value.code) == (
        f"cello: error: the weights in {str(tmp_path / 'prefixed')!r} do not fit its config.json: "
        f"{len(weights) + 1} weight(s) missing, e.g. lm_head.weight (unexpected in the file: {len(weights)})")  # + the tied head


def test_a_chat_template_that_refuses_a_system_message_is_one_line(tiny_dir, tmp_path):
    """Gemma-1-it's template raises on a system message, which every cello prompt has."""
    shutil.copytree(tiny_dir, tmp_path / "nosystem")
    config = json.loads((tmp_path / "nosystem" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "nosystem" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "nosystem" / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(SystemExit) as exit_info:
        cello.load_tokenizer(str(tmp_path / "nosystem"))
    assert str(exit_info.value.code) == (
        f"cello: error: the chat template in {str(tmp_path / 'nosystem')!r} refuses cello's prompt (a system "
        "message, then a user message): System role not supported")


def test_model_fingerprint_counts_only_the_model_s_own_files(tiny_dir, tmp_path):
    """An eval's output written into the model folder does not change the model's identity (--resume
    compares it); a changed weight file does."""
    shutil.copytree(tiny_dir, tmp_path / "m")
    before = cello.model_fingerprint(str(tmp_path / "m"))
    for name in ("predictions.jsonl", "summary.json", ".model-0123.partial.jsonl", "notes.md"):
        (tmp_path / "m" / name).write_text("{}\n")
    assert cello.model_fingerprint(str(tmp_path / "m")) == before
    (tmp_path / "m" / "tokenizer_config.json").write_text("{}")
    assert cello.model_fingerprint(str(tmp_path / "m")) != before


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """An existing read-only folder passes makedirs; the probe file finds it before any work. (Root
    ignores mode bits, so the probe's failure is simulated.)"""
    def refuse(dir):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cello.tempfile, "TemporaryFile", refuse)
    with pytest.raises(SystemExit) as exit_info:
        cello.make_out_dir(str(tmp_path), "eval.py")
    assert str(exit_info.value.code) == f"eval.py: error: --out-dir {tmp_path}: cannot write in the folder (Permission denied)"


def test_a_second_run_in_the_same_out_dir_is_refused(tmp_path):
    """Two runs in one --out-dir would mix checkpoints and metrics: the second is refused while the first
    holds OUT_DIR/.lock, and the lock goes with the first process, however it ends."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"import cello, sys, time; cello.make_out_dir({str(out)!r}, "
                               "'sft.py'); print('locked', flush=True); time.sleep(60)"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SystemExit) as exit_info:
            cello.make_out_dir(str(out), "grpo.py")
        assert str(exit_info.value.code) == (f"grpo.py: error: --out-dir {out}: another run is using it (it holds "
                                             f"{out}/.lock); wait for it, or choose another --out-dir")
    finally:
        holder.kill()
        holder.wait()
    cello.make_out_dir(str(out), "grpo.py")  # the killed run's lock is gone
    cello.release_out_dirs()


def test_one_process_scripts_refuse_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        cello.refuse_torchrun("eval.py")
    assert str(exit_info.value.code) == "eval.py: error: it runs in one process: start it with python, not torchrun"
    monkeypatch.setenv("WORLD_SIZE", "1")
    cello.refuse_torchrun("eval.py")  # one process: nothing to say


@pytest.mark.parametrize("config_class, options, named", [
    ("MistralConfig", {"sliding_window": 16}, "sliding-window attention (sliding_window 16)"),
    ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
     "sliding-window attention (sliding_window 16)"),
])
def test_a_model_whose_attention_or_head_cello_does_not_implement_is_refused(tmp_path, config_class, options, named):
    """Sliding windows and soft-capped logits: the sampler and the log-probs would silently compute
    another distribution than the model's own forward (the GRPO ratio would be biased)."""
    import transformers

    config = getattr(transformers, config_class)(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                 head_dim=8, **options)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit) as stop:
        cello.load_model(str(tmp_path / "m"))
    assert stop.value.code == (f"cello: error: the model in {str(tmp_path / 'm')!r} uses {named}, which cello's "
                               "sampler and log-probs do not implement")


def test_unsupported_features_of_known_configs():
    import transformers

    assert cello.unsupported_features(transformers.Qwen2Config()) == ""  # Qwen2.5's: the window switched off
    assert cello.unsupported_features(transformers.LlamaConfig()) == ""
    # (Gemma 2 does not load with sdpa attention at all; its soft-capped logits would be refused too)
    gemma2 = transformers.Gemma2Config(num_hidden_layers=1, sliding_window=None, layer_types=["full_attention"])
    assert cello.unsupported_features(gemma2) == "attn_logit_softcapping 50.0, final_logit_softcapping 30.0"


def test_bad_preset_and_no_records(tmp_path):
    with pytest.raises(SystemExit, match="unknown preset 'huge'"):
        cello.build_model("huge", str(tmp_path / "m"), [])
    with pytest.raises(SystemExit, match="needs puzzle records"):
        cello.build_model("tiny", str(tmp_path / "m"), [])
    assert not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("line, message", [
    ('[1, 2]', "line 1: expected a JSON object (a puzzle record)"),
    ('{"id": "a", "context": "c", "cells": [["X"]], "candidates": ["A", "B"], "answer": ["A"]}',
     "line 1: cells, candidates and answer must have the same length"),
    ('{"id": "a", "cells": [["X"]], "candidates": ["A"], "answer": ["A"]}', "line 1: lacks field(s) context"),
    ('{"id": "a", "context": "c", "cells": ["X"], "candidates": ["A"], "answer": ["A"]}',
     'line 1: "cells" must be a list of gene lists (lists of strings)'),
    ('{"id": "a", "context": "c", "cells": [["X"]], "candidates": "A", "answer": ["A"]}',
     'line 1: "candidates" and "answer" must be lists of strings'),
    ('{"id": 7, "context": "c", "cells": [["X"]], "candidates": ["A"], "answer": ["A"]}',
     'line 1: "id" must be a non-empty string'),
    ('{"id": "", "context": "c", "cells": [["X"]], "candidates": ["A"], "answer": ["A"]}',
     'line 1: "id" must be a non-empty string'),
    ('{"id": "a", "context": "c", "cells": [["X"]], "candidates": ["A"], "answer": [1]}',
     'line 1: "candidates" and "answer" must be lists of strings'),
    ('{"id": "a", "context": "c", "cells": [], "candidates": [], "answer": []}',
     "line 1: a puzzle needs at least one cell"),
    ('{"id": "a", "context": "c", "cells": [["X"], ["Y"]], "candidates": ["A", " a"], "answer": ["A", " a"]}',
     'line 1: "candidates" must be distinct (compared stripped, case-insensitively)'),
    ('{"id": "a", "context": "c", "cells": [["X"], ["Y"]], "candidates": ["A | B", "C"], "answer": ["A | B", "C"]}',
     'line 1: "candidates" must be non-empty labels without "|" (the answer\'s separator)'),
    ('{"id": "a", "context": "c", "cells": [["X"], ["Y"]], "candidates": [" ", "C"], "answer": [" ", "C"]}',
     'line 1: "candidates" must be non-empty labels without "|" (the answer\'s separator)'),
    # a repeated gold label, or one that is no candidate, could never be matched by a well-formed answer
    ('{"id": "a", "context": "c", "cells": [["X"], ["Y"]], "candidates": ["A", "B"], "answer": ["A", "A"]}',
     'line 1: "answer" must use every candidate exactly once (a permutation of "candidates")'),
    ('{"id": "a", "context": "c", "cells": [["X"], ["Y"]], "candidates": ["A", "B"], "answer": ["A", "C"]}',
     'line 1: "answer" must use every candidate exactly once (a permutation of "candidates")'),
])
def test_read_puzzles_names_the_file_line_and_problem(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cello.read_puzzles(str(path), "--train", "grpo.py")
    assert exit_info.value.code == f"grpo.py: error: {path} {message}"


def test_read_puzzles_accepts_an_answer_that_differs_only_in_case_and_spaces(tmp_path):
    path = tmp_path / "p.jsonl"  # the reward compares labels stripped and case-insensitively, so this is a match
    path.write_text('{"id": "a", "context": "c", "cells": [["X"], ["Y"]], "candidates": ["A", "B"], '
                    '"answer": ["b ", "A"]}\n')
    assert cello.read_puzzles(str(path), "--train", "grpo.py")[0]["answer"] == ["b ", "A"]


def test_read_puzzles_refuses_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "p.h5ad"
    path.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(SystemExit) as exit_info:
        cello.read_puzzles(str(path), "--puzzles", "eval.py")
    assert exit_info.value.code == (f"eval.py: error: --puzzles {path}: not a UTF-8 text file "
                                    "(expected JSONL puzzle records)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_check_device_without_cuda():
    with pytest.raises(SystemExit) as exit_info:
        cello.check_device("cuda:0", "distill.py")
    assert exit_info.value.code == "distill.py: error: --device cuda:0: no CUDA device here (or a CPU-only torch build)"
    cello.check_device("cpu", "distill.py")  # fine: returns


def test_check_device_refuses_a_gpu_index_the_machine_lacks(monkeypatch):
    """On a machine with one GPU, cuda:0 is fine and cuda:1 is one line (found by mutation testing)."""
    monkeypatch.setattr(cello.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cello.torch.cuda, "device_count", lambda: 1)
    assert cello.check_device("cuda:0", "eval.py") == "cuda:0"
    with pytest.raises(SystemExit) as exit_info:
        cello.check_device("cuda:1", "eval.py")
    assert exit_info.value.code == "eval.py: error: --device cuda:1: this machine has 1 CUDA device(s)"


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="keep_freed_memory tunes glibc's malloc")
@pytest.mark.parametrize("keep", [False, True])
def test_keep_freed_memory_reuses_freed_blocks_instead_of_faulting_in_new_pages(keep):
    # A tensor a little larger every step (as sequence lengths vary): glibc maps each new largest
    # block fresh from the kernel (~4,100 page faults for 16 MB); kept, the freed heap serves it
    code = f"""
import resource, torch, cello
if {keep}:
    assert cello.keep_freed_memory()
faults = []
for k in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones((4 << 20) + k * 25_000)  # 16 MB + 100 KB per step
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(faults)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    after_warmup = json.loads(run.stdout.strip().splitlines()[-1])[6:]  # the heap is touched in by then
    # (the median: the kernel may reclaim idle heap pages now and then, e.g. DAMON, so one step may fault)
    if keep:
        assert statistics.median(after_warmup) < 1000  # ~25-100: the pages the block grew by
    else:
        assert statistics.median(after_warmup) > 4000  # the premise: by default every step faults its whole block in


def test_an_older_transformers_is_a_clear_import_error():
    # 5.17 (seen on a GPU machine) ignores the cache= argument; cello must say so at import
    code = "import transformers; transformers.__version__ = '5.17.0'; import cello"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "cello needs transformers >= 5.24 (requirements.txt), found 5.17.0" in run.stderr.strip().splitlines()[-1]


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tiny_dir, tmp_path):
    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = folder / "special_tokens_map.json"
    if special.exists():
        special.write_text(json.dumps({k: v for k, v in json.loads(special.read_text()).items() if k != "pad_token"}))
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(folder)).pad_token_id is None  # as Llama-3's ship
    tokenizer = cello.load_tokenizer(str(folder))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None


def test_bench_core_runs_every_cpu_part_and_its_checks_hold():
    # bench_core.py is not a test, but its figures go into BENCHMARKS.md: it must run, and the checks
    # it prints (greedy equals generate, shared equals per-sequence, chunked equals naive) must hold
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench_core.py"), "--parts", "speed,logprobs,sft,memory", "--prompts", "2",
         "--prompt-len", "40", "--new-tokens", "4", "--shared-prompts", "1", "--samples", "2", "--repeats", "1",
         "--lp-prompt-len", "30", "--lp-response-len", "4", "--sft-batch", "2", "--sft-len", "60",
         "--sft-response-len", "10", "--sft-prefix-len", "20", "--memory-vocab", "2000",
         "--memory-len", "32", "--memory-batch", "1"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "== speed: the small preset's shape (Llama hidden 128, 4 layers, vocab 4096" in out
    assert out.count("speed-up of cello.sample over model.generate") == 2
    gaps = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if line.strip().startswith("max |")]
    assert len(gaps) == 2 and max(gaps) < 1e-5, out
