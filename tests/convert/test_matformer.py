"""Conversion of a MatFormer checkpoint whose hidden units are stored TP-interleaved
(``tp_interleave=2``), saved under TP2: ``dcp → safetensors`` writes the canonical order (the
first m units of each FFN, loaded into a plain ``swiglu`` decoder of width m, compute what the
MatFormer computes at width m), and ``safetensors → dcp`` puts the stored order back (the
weights equal the ones the run initialised, bit for bit)."""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file

from models.config import ModelConfig
from models.configtree import to_dict
from models.ffn.matformer import MatFormerConfig, set_granularity
from models.ffn.swiglu import SwiGLUConfig
from models.spec import build_model
from pretrain.convert import convert
from pretrain.export import load_model_weights
from tests.convert.helpers import decoder_config
from tests.convert.test_layouts import reference, save_layouts
from tests.parallel.launch import run_ranks

WIDTHS = [32, 64, 128]


def test_interleaved_matformer_converts_in_canonical_order_and_back(tmp_path):
    config = dataclasses.replace(
        decoder_config(vocab=512), ffn=MatFormerConfig(d_ff=128, granularities=WIDTHS, tp_interleave=2)
    )
    section = to_dict(config)
    run_ranks(2, save_layouts, str(tmp_path), {"matformer": section}, {"tp2": dict(tp=2, dp_shard=1)})
    model = reference(section)
    convert("dcp", "safetensors", tmp_path / "matformer-tp2", tmp_path / "m.safetensors")
    canonical = load_file(tmp_path / "m.safetensors")
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    for m in WIDTHS:
        dense = build_model(dataclasses.replace(ModelConfig.from_dict(section), ffn=SwiGLUConfig(d_ff=m))).eval()
        cut = {k: v[:m] if k.endswith(("w1.weight", "w3.weight")) else v[:, :m] if k.endswith("w2.weight") else v
               for k, v in canonical.items()}
        dense.load_state_dict(cut)
        set_granularity(model, m if m < 128 else None)
        with torch.no_grad():
            expected = model(tokens)
            got = dense(tokens)
        if m < 128:
            assert torch.equal(got, expected), m
        else:  # full width: the MatFormer sums its units in stored order, the dense one in canonical order
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.equal(canonical["layers.0.ffn.w1.weight"], model.layers["0"].ffn.w1.weight)
    convert("safetensors", "dcp", tmp_path / "m.safetensors", tmp_path / "back")
    back = load_model_weights(tmp_path / "back" / "checkpoints" / "step_00000003")
    expected = dict(model.named_parameters())
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_an_encdec_matformer_extracts_at_one_width(tmp_path, capsys):
    """The encoder-decoder family with MatFormer FFNs (TP-interleaved): ``extract`` at one width
    writes a dense encdec of SwiGLU FFNs that computes what the narrowed model computes, bit for
    bit, with full − Σ 3·d·(d_ff − m) parameters; no T5 directory (T5 has no SwiGLU FFN), said why."""
    from models.counting import param_counts
    from models.encdec.config import EncDecConfig
    from pretrain.generation import load_checkpoint_model
    from pretrain.matformer import extract_main
    from tests.convert.helpers import random_model, save_run

    config = EncDecConfig(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, n_heads=4, max_seq_len=16,
                          max_target_len=8, ffn=MatFormerConfig(d_ff=128, granularities=WIDTHS, tp_interleave=2))
    model = random_model(config)
    save_run(tmp_path / "run", model)
    inputs, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 8))
    for m in WIDTHS[:-1]:
        extract_main(tmp_path / "run" / "checkpoints", tmp_path / f"m{m}", granularity=m)
        dense, _ = load_checkpoint_model(tmp_path / f"m{m}" / "checkpoints")
        assert [f.kind for f in dense.config.layers().ffns] == ["swiglu"] * 4
        assert param_counts(dense.config).total == param_counts(config).total - 4 * 3 * 32 * (128 - m)
        set_granularity(model, m)
        with torch.no_grad():
            assert torch.equal(dense(inputs, decoder_input_ids=targets), model(inputs, decoder_input_ids=targets))
        assert not (tmp_path / f"m{m}" / "hf").exists()
    assert "no Hugging Face directory written" in capsys.readouterr().err


def test_a_new_tp_interleave_is_refused_on_resume_and_relaid_out_through_init_from(cache, tmp_path):
    """A checkpoint stored for tp_interleave=2 read by a model with tp_interleave=4 would load
    without error into another function: resuming it, or starting from it with model.init_from,
    is refused with the way out; starting from its canonical safetensors conversion writes the
    new order, and the model computes what the checkpoint's model computes at every width."""
    import os

    import pytest

    from pretrain.config import load_config
    from pretrain.convert.errors import ConversionError
    from pretrain.convert.init import load_initial_weights
    from pretrain.distributed import DistInfo
    from pretrain.errors import CheckpointError
    from pretrain.train import Trainer
    from tests.convert.helpers import random_model, save_run

    os.environ["PRETRAIN_CACHE"] = str(cache)
    original = random_model(dataclasses.replace(
        decoder_config(vocab=4096), ffn=MatFormerConfig(d_ff=128, granularities=WIDTHS, tp_interleave=2)
    ))
    checkpoint = save_run(tmp_path / "src", original)
    convert("dcp", "safetensors", checkpoint, tmp_path / "w.safetensors")
    run = ["data.seq_len=64", "data.num_workers=0", "train.global_batch=4", "train.micro_batch=4",
           "schedule.warmup_steps=1", "train.max_steps=2", "model.ffn.tp_interleave=4"]
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def trainer(*overrides):
        return Trainer(load_config("matformer-tiny", [*run, *overrides]), cpu)

    model_fields = ["model.d_model=64", "model.n_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2",
                    "model.max_seq_len=64", "model.ffn.d_ff=128", f"model.ffn.granularities={WIDTHS}"]
    resuming = trainer(*model_fields, f"run.dir={tmp_path / 'resume'}", f"checkpoint.resume={checkpoint}")
    with pytest.raises(CheckpointError, match="stored with hidden units interleaved for tp_interleave=2"):
        resuming.resume()
    from_dcp = trainer(f"run.dir={tmp_path / 'dcp'}", f"model.init_from={checkpoint}")
    with pytest.raises(ConversionError, match="this run's model reads hidden units interleaved for tp_interleave=4"):
        load_initial_weights(from_dcp.parts, from_dcp.config.init_from, from_dcp.run_dir, from_dcp.config.model)
    relaid = trainer(f"run.dir={tmp_path / 'relaid'}", f"model.init_from={tmp_path / 'w.safetensors'}")
    load_initial_weights(relaid.parts, relaid.config.init_from, relaid.run_dir, relaid.config.model)
    model = relaid.parts[0].eval()
    assert model.config.ffn.tp_interleave == 4
    assert not torch.equal(model.layers["0"].ffn.w1.weight, original.layers["0"].ffn.w1.weight)
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(2))
    for m in WIDTHS:
        set_granularity(model, m)
        set_granularity(original, m)
        with torch.no_grad():
            if m < WIDTHS[-1]:
                assert torch.equal(model(tokens), original(tokens)), m
            else:
                torch.testing.assert_close(model(tokens), original(tokens), rtol=0, atol=1e-5)
