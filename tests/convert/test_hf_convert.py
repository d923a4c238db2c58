"""``pretrain convert`` between our DCP checkpoints, Hugging Face directories and safetensors:
bit-exact round trips, transformers' own loader and model on the written directory (logits to
1e-5, identical greedy generations), AutoTokenizer encoding a corpus like our tokenizer, and the
safety rules (refused overwrite, one-line errors, nothing half-written left looking complete)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from data.tokenizer import load_tokenizer
from models.generate import generate
from pretrain.cli import main
from pretrain.convert import convert
from pretrain.export import load_model_weights
from tests.convert.helpers import decoder_config, random_model, save_run


def weights_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def run(request, tmp_path_factory, bible_tokenizer):
    root = tmp_path_factory.mktemp("run")
    model = random_model(decoder_config(tie=request.param))
    save_run(root, model, tokenizer=bible_tokenizer)
    return root, model


def test_dcp_to_hf_to_dcp_is_bit_exact(run, tmp_path):
    root, model = run
    convert("dcp", "hf", root, tmp_path / "hf", shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    convert("hf", "dcp", tmp_path / "hf", tmp_path / "back", shard_size="30KB")
    back = load_model_weights(tmp_path / "back" / "checkpoints" / "step_00000000")
    expected = weights_of(model)
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_dcp_to_safetensors_to_dcp_is_bit_exact(run, tmp_path):
    root, model = run
    convert("dcp", "safetensors", root, tmp_path / "m.safetensors")
    assert load_file(tmp_path / "m.safetensors").keys() == weights_of(model).keys()
    convert("safetensors", "dcp", tmp_path / "m.safetensors", tmp_path / "back")
    back = load_model_weights(tmp_path / "back" / "checkpoints" / "step_00000007")
    for name, tensor in weights_of(model).items():
        assert torch.equal(back[name], tensor), name


def test_transformers_loads_the_directory_and_agrees(run, tmp_path, bible_jsonl):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, model = run
    convert("dcp", "hf", root, tmp_path / "hf", shard_size="100KB")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    tokens = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)
        ours = generate(model, tokens[:, :5], max_new_tokens=12)
        theirs = hf.generate(tokens[:, :5], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    our_tok = load_tokenizer(root / "tokenizer.model")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (our_tok.bos_id, our_tok.eos_id, our_tok.pad_id)
    lines = [json.loads(line)["text"] for line in bible_jsonl.read_text().splitlines()[:40]]
    lines += ["  two leading spaces", "tab\tand\nnewline", "a literal <s> and </s> inside", "Ünïcödé ✓", ""]
    for text in lines:
        assert hf_tok.encode(text, add_special_tokens=False) == our_tok.encode(text), text[:40]
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == our_tok.eos_id


def test_cli_refuses_to_overwrite_and_names_bad_input(run, tmp_path, capsys):
    root, _ = run
    out = tmp_path / "hf"
    assert main(["convert", "--from", "dcp", "--to", "hf", str(root), str(out)]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["convert", "--from", "dcp", "--to", "hf", str(root), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first
    assert main(["convert", "--from", "dcp", "--to", "hf", str(root), str(out), "--overwrite"]) == 0
    assert main(["convert", "--from", "dcp", "--to", "hf", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert main(["convert", "--from", "dcp", "--to", "hf", "--family", "yoco", str(root), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "holds a decoder model, not --family yoco" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_dtype_casts_every_floating_tensor(run, tmp_path):
    from transformers import AutoModelForCausalLM

    root, model = run
    convert("dcp", "hf", root, tmp_path / "hf", dtype="bf16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.bfloat16)
    from models.decoder.hf import LLAMA_ADAPTER

    back = LLAMA_ADAPTER.state_from_hf(hf.state_dict(), model.config)
    for name, tensor in weights_of(model).items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], tensor.to(torch.bfloat16)), name


def test_a_tokenizer_json_ships_and_encodes_like_ours(tmp_path, bible_jsonl):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    lines = [json.loads(line)["text"] for line in bible_jsonl.read_text().splitlines()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    save_run(tmp_path / "run", random_model(decoder_config(vocab=640)))
    convert("dcp", "hf", tmp_path / "run", tmp_path / "hf", tokenizer=tmp_path / "tokenizer.json")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2)
    for text in lines[:50] + ["a literal <s> inside", "  spaces\tand tabs", ""]:
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text), text[:40]
