"""``pretrain convert`` dcp ↔ hf for the MoE decoder (Mixtral, Qwen3-MoE: our stacked experts
↔ HF's per-expert files) and the encoder-decoder (T5), from checkpoints saved under TP2 and
FSDP2 on two gloo ranks: bit-exact round trips, transformers' from_pretrained on the written
directory (logits to 1e-5, identical greedy generations), the T5 tokenizer files with their
sentinels, and MoE refused to Megatron."""

from __future__ import annotations

import json

import pytest
import torch

from data.span_corruption import encode_with_sentinels
from data.tokenizer import load_tokenizer
from models.attention.layer import AttentionConfig
from models.configtree import to_dict
from models.decoder.config import DecoderConfig
from models.encdec.config import EncDecConfig
from models.ffn.gated import GatedGELUConfig, ReLUConfig
from models.ffn.moe import MoEConfig
from pretrain.convert import convert
from pretrain.convert.errors import ConversionError
from pretrain.export import load_model_weights
from tests.convert.helpers import random_model, save_run
from tests.convert.test_layouts import reference, save_layouts
from tests.parallel.launch import run_ranks

VOCAB = 512


def mixtral() -> dict:
    return to_dict(DecoderConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6,
        mixer=AttentionConfig(n_heads=4, n_kv_heads=2),
        ffn=MoEConfig(n_experts=4, top_k=2, d_ff=32, router="topk_softmax", z_loss_coef=0.0),
    ))


def qwen3_moe() -> dict:
    return to_dict(DecoderConfig(
        vocab_size=VOCAB, d_model=64, n_layers=3, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6,
        tie_embeddings=True, mixer=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=24, qk_norm_eps=1e-6),
        ffn=MoEConfig(
            n_experts=8, top_k=3, d_ff=16, router="softmax_topk", renormalize=True, z_loss_coef=0.0,
            first_dense_layers=1, dense_d_ff=48,
        ),
    ))


def t5(**overrides) -> dict:
    fields = dict(vocab_size=VOCAB, d_model=48, encoder_layers=2, decoder_layers=2, n_heads=4, max_seq_len=64,
                  max_target_len=32, ffn=GatedGELUConfig(d_ff=80))
    return to_dict(EncDecConfig(**{**fields, **overrides}))


LAYOUTS = {"tp2": dict(tp=2, dp_shard=1), "fsdp2": dict(dp_shard=2)}
CASES = {
    "mixtral-tp2": mixtral(),
    "qwen3_moe-fsdp2": qwen3_moe(),
    "t5-tp2": t5(),
    "t5_relu_tied-fsdp2": t5(ffn=ReLUConfig(d_ff=64), tie_embeddings=True),
}
EXPERT = {
    "mixtral-tp2": "model.layers.1.block_sparse_moe.experts.3.w2.weight",
    "qwen3_moe-fsdp2": "model.layers.2.mlp.experts.7.up_proj.weight",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """CASES saved by our checkpoint manager under their layouts, as ``<family>-<layout>``."""
    root = tmp_path_factory.mktemp("moe_t5")
    for layout, fields in LAYOUTS.items():
        sections = {case.rsplit("-", 1)[0]: s for case, s in CASES.items() if case.endswith(f"-{layout}")}
        run_ranks(2, save_layouts, str(root), sections, {layout: fields})
    return root


def weights(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_dcp_hf_dcp_is_bit_exact_and_transformers_agrees(saved, case, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    section = CASES[case]
    model = reference(section)
    convert("dcp", "hf", saved / case, tmp_path / "hf", shard_size="60KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    if case in EXPERT:
        assert EXPERT[case] in index and not any("gate_up_proj" in name for name in index)
    convert("hf", "dcp", tmp_path / "hf", tmp_path / "back", shard_size="50KB")
    back = load_model_weights(tmp_path / "back" / "checkpoints" / "step_00000000")
    assert back.keys() == weights(model).keys()
    for name, tensor in weights(model).items():
        assert torch.equal(back[name], tensor), name

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (2, 12), generator=gen)
    with torch.no_grad():
        if section["family"] == "encdec":
            from models.encdec.generate import generate

            hf = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
            decoder = torch.randint(0, VOCAB, (2, 7), generator=gen)
            theirs = hf(input_ids=tokens, decoder_input_ids=decoder).logits
            torch.testing.assert_close(theirs, model(tokens, decoder_input_ids=decoder), atol=1e-5, rtol=1e-5)
            ours = generate(model, tokens, max_new_tokens=10)
            theirs = hf.generate(input_ids=tokens, max_new_tokens=10, do_sample=False, num_beams=1, eos_token_id=None,
                                 pad_token_id=0, use_cache=False)
        else:
            from models.generate import generate

            hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
            torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)
            ours = generate(model, tokens[:, :4], max_new_tokens=10)
            theirs = hf.generate(tokens[:, :4], max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_a_missing_expert_file_entry_is_named(saved, tmp_path):
    convert("dcp", "hf", saved / "mixtral-tp2", tmp_path / "hf")
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"lacks tensor model\.layers\.0\.block_sparse_moe\.experts\.2\.w3"):
        convert("hf", "dcp", tmp_path / "hf", tmp_path / "back")


def test_an_moe_megatron_cannot_hold_is_refused_in_one_line(saved, tmp_path):
    with pytest.raises(ConversionError, match="of this MoE model: query/key norms") as error:
        convert("dcp", "megatron", saved / "qwen3_moe-fsdp2", tmp_path / "megatron")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "megatron").exists() and list(tmp_path.iterdir()) == []


def _t5_sentencepiece(directory, lines):
    """A sentencepiece model as T5's own are trained (unigram, <pad> 0, </s> 1, <unk> 2, no BOS)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(directory / "t5"), vocab_size=400, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return directory / "t5.model"


def test_t5_tokenizer_files_and_sentinels(tmp_path, bible_jsonl, bible_tokenizer):
    from transformers import AutoTokenizer

    lines = [json.loads(line)["text"] for line in bible_jsonl.read_text().splitlines()[:150]]
    texts = lines[:30] + ["  two spaces\tand a tab", "Ünïcödé ✓", ""]
    with_sentinels = ["In the<extra_id_0> God created <extra_id_1>and the earth.", "<extra_id_99> and it was good"]
    for kind, tokenizer, vocab, files in (
        ("t5", _t5_sentencepiece(tmp_path, lines), 500, ("spiece.model", "T5Tokenizer")),
        ("ours", bible_tokenizer, 4196, ("tokenizer.model", "LlamaTokenizer")),
    ):
        save_run(tmp_path / kind, random_model(EncDecConfig.from_dict({**t5(), "vocab_size": vocab})))
        convert("dcp", "hf", tmp_path / kind, tmp_path / f"{kind}-hf", tokenizer=tokenizer)
        config = json.loads((tmp_path / f"{kind}-hf" / "tokenizer_config.json").read_text())
        assert (tmp_path / f"{kind}-hf" / files[0]).is_file() and config["tokenizer_class"] == files[1]
        theirs = AutoTokenizer.from_pretrained(tmp_path / f"{kind}-hf", local_files_only=True)
        ours = load_tokenizer(tokenizer)
        assert len(theirs) == vocab and (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.pad_id)
        assert theirs.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_95>"]) == [vocab - 1, vocab - 96]
        for text in texts:
            assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), (kind, text[:40])
        for text in with_sentinels:
            assert theirs.encode(text, add_special_tokens=False) == encode_with_sentinels(ours, text, vocab), kind
        convert("hf", "dcp", tmp_path / f"{kind}-hf", tmp_path / f"{kind}-back")
        assert (tmp_path / f"{kind}-back" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_disk_map_names_what_save_pretrained_writes(case, tmp_path):
    from safetensors import safe_open

    from models.config import ModelConfig
    from models.spec import hf_adapter

    model = random_model(ModelConfig.from_dict(CASES[case]))
    adapter = hf_adapter(model.config)
    adapter.to_hf_model(model).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        written = {name: f.get_tensor(name) for name in f.keys()}
    tmap = adapter.disk_map(model.config)
    ours = dict(model.state_dict())
    expected = {
        theirs: rule.to_hf(ours[name]) for name, (theirs, rule) in tmap.rules.items() if name not in tmap.aliases
    }
    expected.update({theirs: ours[name][e] for name, names in tmap.stacked.items() for e, theirs in enumerate(names)})
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
