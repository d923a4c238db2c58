"""Megatron-core torch_dist checkpoints: one written by megatron-core's own GPTModel and
``dist_checkpointing`` on CPU (TP1 and TP2 over gloo) imports to our model with megatron-core's
logits; our export is loaded by megatron-core's ``dist_checkpointing.load`` into its GPTModel,
which then gives our logits; the round trip dcp → megatron → dcp is bit-exact. The same for a
Mixtral-style MoE model against megatron-core's MoE GPT (SequentialMLP experts, TP1)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import yaml

from models.config import ModelConfig
from models.configtree import to_dict
from models.spec import build_model
from pretrain.cli import main
from pretrain.convert import convert
from pretrain.export import load_model_weights
from tests.convert.helpers import decoder_config
from tests.parallel.launch import run_ranks

VOCAB, SEQ = 128, 16


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(11))


def _cpu_megatron():
    """megatron-core's GPT on CPU: its checkpoint code calls CUDA helpers that have CPU
    equivalents, and its attention forks a CUDA RNG tracker that dropout 0 never uses."""
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core import parallel_state, tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None  # undefined without Transformer Engine; None selects the torch path
    return parallel_state


MOE = dict(
    num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_token_dispatcher_type="allgather",
    moe_grouped_gemm=False, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
)


def gpt(seed: int, moe: bool = False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        use_cpu_initialization=True, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", add_bias_linear=False, layernorm_epsilon=1e-6, bias_activation_fusion=False,
        persist_layer_norm=False, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        init_method_std=0.3, **(MOE if moe else {}),
    )
    spec = get_gpt_layer_local_spec(num_experts=4 if moe else None, moe_grouped_gemm=False, normalization="RMSNorm")
    model = GPTModel(
        config, spec, vocab_size=VOCAB, max_sequence_length=64,
        position_embedding_type="rope", rotary_base=5000, share_embeddings_and_output_weights=False,
        parallel_output=False,
    )
    with torch.no_grad():  # random norm gains, so a mis-mapped norm shows
        for name, param in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def logits_of(model) -> torch.Tensor:
    x = tokens()
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)
    with torch.no_grad():
        return model(x, torch.arange(SEQ).expand(2, SEQ), mask)


def megatron_side(rank: int, world: int, save_dir: str | None, load_dir: str | None, moe: bool = False) -> dict:
    from megatron.core import dist_checkpointing

    parallel_state = _cpu_megatron()
    parallel_state.initialize_model_parallel(world, 1)
    try:
        out = {}
        if save_dir:
            model = gpt(seed=3, moe=moe)
            out["saved_logits"] = logits_of(model)
            dist_checkpointing.save(model.sharded_state_dict(), save_dir)
        if load_dir:
            model = gpt(seed=9, moe=moe)
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, load_dir)  # as Megatron-LM does
            model.load_state_dict(loaded["model"])
            out["args"] = vars(loaded["args"])
            out["loaded_logits"] = logits_of(model)
        return out
    finally:
        parallel_state.destroy_model_parallel()


def ours(run_dir) -> torch.nn.Module:
    checkpoint = next((run_dir / "checkpoints").glob("step_*"))
    model = build_model(ModelConfig.from_dict(yaml.safe_load((checkpoint / "config.json").read_text())["model"]))
    model.load_state_dict(load_model_weights(checkpoint))
    return model.eval()


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_checkpoint_imports_and_our_export_loads_in_megatron(tmp_path, tp):
    config = decoder_config(vocab=VOCAB)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": to_dict(config)}))
    (tmp_path / "meg").mkdir()
    saved = run_ranks(tp, megatron_side, str(tmp_path / "meg"), None)[0]["saved_logits"]

    convert("megatron", "dcp", tmp_path / "meg", tmp_path / "ours", model_config=str(tmp_path / "model.yaml"))
    model = ours(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), saved, atol=1e-5, rtol=1e-5)

    convert("dcp", "megatron", tmp_path / "ours", tmp_path / "export")
    loaded = run_ranks(tp, megatron_side, None, str(tmp_path / "export" / "iter_0000000"))[0]
    torch.testing.assert_close(loaded["loaded_logits"], saved, atol=1e-5, rtol=1e-5)
    assert (loaded["args"]["num_query_groups"], loaded["args"]["ffn_hidden_size"]) == (2, 96)

    convert("megatron", "dcp", tmp_path / "export", tmp_path / "back")  # config from the args we wrote
    first = load_model_weights(tmp_path / "ours" / "checkpoints" / "step_00000000")
    back = load_model_weights(tmp_path / "back" / "checkpoints" / "step_00000000")
    assert first.keys() == back.keys()
    for name, tensor in first.items():
        assert torch.equal(back[name], tensor), name


def test_unknown_megatron_layouts_are_refused(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    from pretrain.checkpoint import quiet_single_process

    bad = tmp_path / "bad"
    with quiet_single_process():
        dcp.save({"decoder.layers.mlp.experts.linear_fc1.weight": torch.zeros(2, 4, 4),
                  "embedding.word_embeddings.weight": torch.zeros(VOCAB, 64)}, checkpoint_id=bad, no_dist=True)
    (bad / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": to_dict(decoder_config(vocab=VOCAB))}))
    args = ["convert", "--from", "megatron", "--to", "dcp", str(bad), str(tmp_path / "out")]
    assert main([*args, "--model-config", str(tmp_path / "model.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown Megatron layout: tensor decoder.layers.mlp.experts.linear_fc1.weight" in err
    assert main(args) == 2
    assert "pass --model-config" in capsys.readouterr().err


def test_megatron_export_with_a_dtype_round_trips_the_cast_weights(tmp_path):
    from tests.convert.helpers import random_model, save_run

    model = random_model(decoder_config(vocab=VOCAB, tie=True))
    save_run(tmp_path / "run", model)
    convert("dcp", "megatron", tmp_path / "run", tmp_path / "meg", dtype="bf16")
    convert("megatron", "dcp", tmp_path / "meg", tmp_path / "back")
    back = load_model_weights(tmp_path / "back" / "checkpoints" / "step_00000007")
    expected = dict(model.named_parameters())
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], tensor.detach().to(torch.bfloat16)), name


def test_a_megatron_moe_checkpoint_imports_and_our_export_loads_in_megatron(tmp_path):
    from models.attention.layer import AttentionConfig
    from models.decoder.config import DecoderConfig
    from models.ffn.moe import MoEConfig

    config = DecoderConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6,
        mixer=AttentionConfig(n_heads=4, n_kv_heads=2),
        ffn=MoEConfig(n_experts=4, top_k=2, d_ff=32, router="topk_softmax", aux_loss_coef=0.01, z_loss_coef=0.0),
    )
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": to_dict(config)}))
    (tmp_path / "meg").mkdir()
    saved = run_ranks(1, megatron_side, str(tmp_path / "meg"), None, True)[0]["saved_logits"]
    convert("megatron", "dcp", tmp_path / "meg", tmp_path / "ours", model_config=str(tmp_path / "model.yaml"))
    with torch.no_grad():
        torch.testing.assert_close(ours(tmp_path / "ours")(tokens()), saved, atol=1e-5, rtol=1e-5)

    convert("dcp", "megatron", tmp_path / "ours", tmp_path / "export")
    loaded = run_ranks(1, megatron_side, None, str(tmp_path / "export" / "iter_0000000"), True)[0]
    torch.testing.assert_close(loaded["loaded_logits"], saved, atol=1e-5, rtol=1e-5)
    assert (loaded["args"]["num_experts"], loaded["args"]["moe_router_topk"]) == (4, 2)
    convert("megatron", "dcp", tmp_path / "export", tmp_path / "back")
    first = load_model_weights(tmp_path / "ours" / "checkpoints" / "step_00000000")
    back = load_model_weights(tmp_path / "back" / "checkpoints" / "step_00000000")
    assert first.keys() == back.keys()
    for name, tensor in first.items():
        assert torch.equal(back[name], tensor), name
