"""MoE decoders: config validation, exact parameter and FLOP counts by hand, the hash router fed
the token ids by the decoder, and the moe-tiny preset trained through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.config import ModelConfig
from models.configtree import load_yaml
from models.counting import param_counts, training_flops_per_token
from models.ffn.moe import MoE
from models.ffn.moe.routers import hash_table
from models.ffn.swiglu import SwiGLU
from models.spec import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V, D, L, H, KV, S = 300, 32, 3, 4, 2, 16


def decoder(**ffn) -> ModelConfig:
    return ModelConfig.from_dict({
        "family": "decoder", "vocab_size": V, "d_model": D, "n_layers": L, "max_seq_len": S,
        "mixer": {"kind": "attention", "n_heads": H, "n_kv_heads": KV},
        "ffn": {"kind": "moe", **ffn},
    })


@pytest.mark.parametrize(
    "ffn, message",
    [
        ({"top_k": 9}, r"model.ffn.top_k \(9\) exceeds model.ffn.n_experts \(8\)"),
        ({"router": "switch"}, r"'model.ffn.router' must be one of 'softmax_topk'"),
        ({"first_dense_layers": 1}, r"set model.ffn.dense_d_ff to a positive integer"),
        ({"bias_update_rate": 1e-3}, r"needs router sigmoid_bias, got softmax_topk"),
        ({"router": "hash", "top_k": 1, "aux_loss_coef": 0, "z_loss_coef": 0}, r"set model.ffn.hash_vocab_size to model.vocab_size"),
        ({"router": "hash", "top_k": 1, "hash_vocab_size": V}, r"router hash has no router logits.*set model.ffn.aux_loss_coef: 0"),
        ({"router": "sigmoid_bias", "n_groups": 3}, r"model.ffn.n_groups \(3\) must divide model.ffn.n_experts \(8\)"),
        ({"router": "topk_softmax", "renormalize": False}, r"renormalize applies only to router softmax_topk"),
        ({"capacity_factor": -1.0}, r"capacity_factor must be null \(dropless\) or > 0"),
        ({"compete_every": 2}, r"apply only to router compete"),
        ({"n_expert": 4}, r"'model.ffn.n_expert' is not a field of model.ffn kind 'moe'.*did you mean 'model.ffn.n_experts'"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(ffn, message):
    with pytest.raises(ValueError, match=message):
        decoder(**ffn)


def test_counts_are_the_formula_and_first_dense_layers_are_dense():
    """Per block: attention 2·d·d + 2·d·(d/H·KV), 2 norms; block 0 a dense SwiGLU 3·d·g; the MoE
    blocks a router E·d, E experts 3·d·f, a shared SwiGLU 3·d·(n_s·f). Active: minus the E − k
    unused experts per MoE block. Forward FLOPs per token: 2 × the active linear weights (router,
    k experts, shared) + the head, plus causal attention 4·d·S/2."""
    E, k, f, shared, g = 6, 2, 24, 1, 80
    config = decoder(n_experts=E, top_k=k, d_ff=f, n_shared_experts=shared, first_dense_layers=1, dense_d_ff=g)
    model = build_model(config)
    assert isinstance(model.layers["0"].ffn, SwiGLU) and model.layers["0"].ffn.w1.out_features == g
    assert all(isinstance(model.layers[str(i)].ffn, MoE) for i in (1, 2))
    attention = 2 * D * D + 2 * D * (D // H * KV)
    moe_block = E * D + E * 3 * D * f + 3 * D * shared * f
    total = V * D + attention * L + 2 * D * L + 3 * D * g + 2 * moe_block + D + V * D
    counts = param_counts(config)
    assert counts.total == total == sum(p.numel() for p in model.parameters())
    assert counts.active == total - 2 * (E - k) * 3 * D * f < counts.total
    active_linear = attention * L + 3 * D * g + 2 * (E * D + k * 3 * D * f + 3 * D * shared * f) + V * D
    assert training_flops_per_token(config, S) == 3 * (2 * active_linear + L * 4 * D * S // 2)
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.1.ffn.routed.router.gate.weight", "layers.1.ffn.routed.experts.w1", "layers.1.ffn.shared.w2.weight"} <= names


def test_hash_routed_decoder_reads_the_token_ids():
    config = decoder(router="hash", top_k=1, hash_vocab_size=V, hash_seed=3, aux_loss_coef=0, z_loss_coef=0)
    torch.manual_seed(0)
    model = build_model(config)
    ids = torch.randint(0, V, (2, S))
    model(ids).sum().backward()
    expected = torch.bincount(hash_table(V, 8, 3)[ids.reshape(-1)], minlength=8).double()
    for i in range(L):
        routed = model.layers[str(i)].ffn.routed
        assert torch.equal(routed._stats[:8], expected)  # every block routed exactly the table's choice


def test_meta_build_then_init_gives_the_same_model():
    """Built on the meta device, materialised, initialised: the same routers (hash table, bias)
    and the same weights as an eagerly built model under the same seed."""
    config = decoder(router="sigmoid_bias", bias_update_rate=1e-3, n_shared_experts=1)
    torch.manual_seed(0)
    eager = build_model(config)
    torch.manual_seed(0)
    eager.init_weights()
    with torch.device("meta"):
        meta = build_model(config)
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    for (name, a), (_, b) in zip(eager.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), name


def test_moe_tiny_preset_shape():
    """8 experts of 512, top-2: the active FFN of tiny's dense 1024 (plus a router)."""
    moe_tiny = ModelConfig.from_dict(load_yaml(CONFIGS / "moe-tiny.yaml")["model"])
    tiny = ModelConfig.from_dict(load_yaml(CONFIGS / "tiny.yaml")["model"])
    router = moe_tiny.n_layers * 8 * moe_tiny.d_model
    expert = 3 * moe_tiny.d_model * 512
    assert param_counts(moe_tiny).active == param_counts(tiny).total + router == 9_982_208
    assert param_counts(moe_tiny).total == param_counts(moe_tiny).active + moe_tiny.n_layers * 6 * expert == 28_856_576


SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2", "model.ffn.d_ff=64",
    "model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0", "train.global_batch=8", "train.micro_batch=4",
    "train.eval_interval=6", "train.eval_batches=2", "schedule.warmup_steps=2", "logging.interval=1", "optim.lr=1e-2",
    "train.max_steps=12", "checkpoint.interval=12",
]


def test_moe_tiny_trains_through_the_command_line(cache, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    subprocess.run(
        [sys.executable, "-m", "pretrain", "train", "--config", "moe-tiny", *SMALL, f"run.dir={run_dir}"],
        env=env, check=True, capture_output=True, text=True,
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1] - 1.0, losses
    last = [r for r in records if "loss" in r][-1]
    for layer in (0, 1):
        for key in ("max_load", "min_load", "dropped", "aux_loss", "z_loss"):
            assert f"layers.{layer}.ffn.routed/{key}" in last, key
        assert last[f"layers.{layer}.ffn.routed/max_load"] >= 1.0 >= last[f"layers.{layer}.ffn.routed/min_load"]
        assert last[f"layers.{layer}.ffn.routed/dropped"] == 0.0  # dropless
    assert (run_dir / "report" / "layers.0.ffn.routed_max_load.png").is_file()


def test_config_round_trips_and_moe_can_be_chosen_per_layer():
    from models.configtree import to_dict

    config = decoder(router="sigmoid_bias", n_groups=4, topk_groups=2, capacity_factor=1.25, bias_update_rate=1e-3)
    assert ModelConfig.from_dict(to_dict(config)) == config
    mixed = ModelConfig.from_dict({
        "family": "decoder", "vocab_size": V, "d_model": D, "n_layers": 4, "max_seq_len": S,
        "mixer": {"kind": "attention", "n_heads": H, "n_kv_heads": KV}, "ffn": {"kind": "swiglu", "d_ff": 64},
        "layer_overrides": [{"layers": "1::2", "ffn": {"kind": "moe", "n_experts": 4, "top_k": 1, "d_ff": 16}}],
    })
    model = build_model(mixed)
    assert [type(model.layers[str(i)].ffn).__name__ for i in range(4)] == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
    assert param_counts(mixed).total - param_counts(mixed).active == 2 * 3 * 3 * D * 16
    with pytest.raises(ValueError, match=r"model.layer_overrides\[0\].ffn.top_k \(5\) exceeds"):
        ModelConfig.from_dict({**to_dict(mixed), "layer_overrides": [{"layers": "1::2", "ffn": {"kind": "moe", "top_k": 5, "n_experts": 4}}]})


@pytest.mark.parametrize("router", ["softmax_topk", "hash"])
def test_cached_decoding_of_a_dropless_moe_decoder_equals_the_full_forward(router):
    """Routing is per token, so prefill + one token at a time (with the KV cache) gives the
    logits of one full forward; greedy generation equals repeated full forwards' argmax."""
    from models.generate import generate

    fields = {"router": router, "n_shared_experts": 1}
    if router == "hash":
        fields.update(top_k=1, hash_vocab_size=V, aux_loss_coef=0, z_loss_coef=0)
    torch.manual_seed(0)
    model = build_model(decoder(**fields)).eval()
    tokens = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        state = model.new_decode_state(2, 12, torch.float32, "cpu")
        parts = [model(tokens[:, :5], state=state)] + [model(tokens[:, i : i + 1], state=state) for i in range(5, 12)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
        out = generate(model, tokens[:, :4], max_new_tokens=6)
        sequence = tokens[:, :4]
        for _ in range(6):
            sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, sequence)


def test_training_flops_match_flop_counter_mode():
    """FlopCounterMode over one forward + backward of a dropless MoE decoder (per-expert loop,
    math attention) counts what training_flops_per_token says: the router, exactly k experts' rows
    per token and the shared expert, plus the math kernel's full S×S attention square (twice our
    causal convention, as for dense models in test_counting.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = decoder(n_experts=4, top_k=2, d_ff=24, n_shared_experts=1, grouped_gemm=False, first_dense_layers=1, dense_d_ff=40)
    config.mixer.backend = "math"
    model = build_model(config)
    batch = 2
    tokens = torch.randint(0, V, (batch, S))
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().logsumexp(-1).sum().backward()
    dense_attention_extra = 6 * L * D * S
    assert counter.get_total_flops() == batch * S * (training_flops_per_token(config, S) + dense_attention_extra)
