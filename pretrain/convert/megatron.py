"""Megatron-core ``torch_dist`` GPT checkpoints (import and export) for Llama-style decoders
(RMSNorm, SwiGLU, RoPE, no biases, dense FFN) and their Mixtral-style MoE form.

A torch_dist checkpoint is a DCP checkpoint (``.metadata``, ``__<rank>_<i>.distcp``) plus
``metadata.json`` (the backend) and ``common.pt`` (Megatron-LM keeps its ``args`` there). Its
tensors have global shapes whatever TP/PP layout saved them, and the layers of one kind are
stacked on a leading dimension:

    embedding.word_embeddings.weight                       embed.weight
    decoder.layers.self_attention.linear_qkv.layer_norm_weight [L, H]   layers.i.mixer_norm.weight
    decoder.layers.self_attention.linear_qkv.weight        [L, (nh+2·ng)·hd, H]: per query group g
                                                           the rows [q heads of g; k_g; v_g]
    decoder.layers.self_attention.linear_proj.weight       layers.i.mixer.wo.weight
    decoder.layers.mlp.linear_fc1.layer_norm_weight        layers.i.ffn_norm.weight
    decoder.layers.mlp.linear_fc1.weight [L, 2F, H]        [w1 (gate); w3 (up)]
    decoder.layers.mlp.linear_fc2.weight                   layers.i.ffn.w2.weight
    decoder.final_layernorm.weight                         norm.weight
    output_layer.weight                                    head.weight (absent when tied)

An MoE model (megatron-core's local spec, ``SequentialMLP`` experts, router softmax over the
top-k logits = ``moe_router_pre_softmax`` off = our ``topk_softmax``) has instead of linear_fc1/2:

    decoder.layers.mlp.router.weight [L, E, H]                     layers.i.ffn.routed.router.gate.weight
    decoder.layers.mlp.experts.experts.linear_fc1.weight [L, E, 2F, H]  [w1; w3] on dim 1
    decoder.layers.mlp.experts.experts.linear_fc2.weight [L, E, H, F]   layers.i.ffn.routed.experts.w2

A Megatron-LM directory (``latest_checkpointed_iteration.txt`` + ``iter_NNNNNNN/``) or an
iteration directory itself is accepted. The model config comes from ``common.pt``'s ``args``
when Megatron-LM saved them, else from ``--model-config``. Export writes the Megatron-LM layout
with the ``args`` a model of this shape needs. Each stacked tensor is read or built whole: memory
holds one stacked tensor.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pretrain.checkpoint import quiet_single_process
from pretrain.convert.errors import ConversionError
from pretrain.convert.weights import Weights, check_against_config

P = "decoder.layers."
EMBED, FINAL, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
QKV, PROJ = P + "self_attention.linear_qkv.weight", P + "self_attention.linear_proj.weight"
FC1, FC2 = P + "mlp.linear_fc1.weight", P + "mlp.linear_fc2.weight"
ROUTER = P + "mlp.router.weight"
EXPERTS_FC1, EXPERTS_FC2 = P + "mlp.experts.experts.linear_fc1.weight", P + "mlp.experts.experts.linear_fc2.weight"
NORM1, NORM2 = P + "self_attention.linear_qkv.layer_norm_weight", P + "mlp.linear_fc1.layer_norm_weight"
LOCAL_NAMES = {P + "input_layernorm.weight": NORM1, P + "pre_mlp_layernorm.weight": NORM2}
LATEST = "latest_checkpointed_iteration.txt"
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def iteration_dir(path: Path) -> Path:
    if (path / "metadata.json").is_file():
        return path
    if (path / LATEST).is_file():
        text = (path / LATEST).read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}"
        return path / name
    raise ConversionError(
        f"{path} is not a Megatron torch_dist checkpoint (no metadata.json) nor a Megatron-LM directory (no {LATEST})"
    )


def _load_common(directory: Path) -> dict:
    path = directory / "common.pt"
    if not path.is_file():
        return {}
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def config_from_args(args) -> object:
    """Our decoder config from Megatron-LM's ``args``, refusing what it cannot represent."""
    from models.attention.layer import AttentionConfig
    from models.decoder.config import DecoderConfig
    from models.ffn.swiglu import SwiGLUConfig

    a = vars(args) if not isinstance(args, dict) else args
    problems = []
    if a.get("normalization", "RMSNorm") != "RMSNorm":
        problems.append(f"normalization={a.get('normalization')!r} (only RMSNorm)")
    if not a.get("swiglu", True):
        problems.append("swiglu off (only SwiGLU FFNs)")
    if a.get("add_bias_linear", False) or a.get("add_qkv_bias", False):
        problems.append("linear biases")
    if a.get("position_embedding_type", "rope") != "rope":
        problems.append(f"position_embedding_type={a.get('position_embedding_type')!r} (only rope)")
    if a.get("num_experts"):
        problems += _moe_problems(a)
    if problems:
        raise ConversionError("unknown Megatron layout for our decoder: " + "; ".join(problems))
    heads = a["num_attention_heads"]
    groups = a.get("num_query_groups") if a.get("group_query_attention") else heads
    head_dim = a.get("kv_channels") or a["hidden_size"] // heads
    config = DecoderConfig(
        vocab_size=a.get("padded_vocab_size") or a["vocab_size"], d_model=a["hidden_size"], n_layers=a["num_layers"],
        max_seq_len=a.get("max_position_embeddings") or a["seq_length"], rope_theta=float(a.get("rotary_base", 10000)),
        norm_eps=float(a.get("norm_epsilon", 1e-5)), tie_embeddings=not a.get("untie_embeddings_and_output_weights", False),
        init_std=float(a.get("init_method_std", 0.02)),
        mixer=AttentionConfig(n_heads=heads, n_kv_heads=groups, head_dim=None if head_dim == a["hidden_size"] // heads else head_dim),
        ffn=_moe_from_args(a) if a.get("num_experts") else SwiGLUConfig(d_ff=a["ffn_hidden_size"]),
    )
    config.validate()
    return config


def _moe_problems(a: dict) -> list[str]:
    problems = []
    if a.get("moe_router_pre_softmax", False) or a.get("moe_router_score_function", "softmax") != "softmax":
        problems.append("an MoE router other than softmax over the top-k logits")
    if a.get("moe_shared_expert_intermediate_size"):
        problems.append("shared experts")
    if a.get("moe_layer_freq", 1) != 1:
        problems.append("dense layers between MoE layers (moe_layer_freq)")
    if a.get("moe_expert_capacity_factor") is not None:
        problems.append("an expert capacity factor")
    if a.get("moe_router_enable_expert_bias", False) or a.get("moe_router_topk_scaling_factor") is not None:
        problems.append("router expert bias or top-k scaling")
    return problems


def _moe_from_args(a: dict):
    from models.ffn.moe.config import MoEConfig

    return MoEConfig(
        n_experts=a["num_experts"], top_k=a.get("moe_router_topk", 2),
        d_ff=a.get("moe_ffn_hidden_size") or a["ffn_hidden_size"], router="topk_softmax",
        aux_loss_coef=float(a.get("moe_aux_loss_coeff") or 0.0), z_loss_coef=float(a.get("moe_z_loss_coeff") or 0.0),
    )


def _is_moe(config) -> bool:
    return config.ffn.kind == "moe"


def args_from_config(config) -> dict:
    """The Megatron-LM arguments describing our decoder ``config``."""
    _check_exportable(config)
    mixer = config.mixer
    return dict(
        num_layers=config.n_layers, hidden_size=config.d_model, ffn_hidden_size=config.ffn.d_ff,
        num_attention_heads=mixer.n_heads, num_query_groups=mixer.n_kv_heads, group_query_attention=True,
        kv_channels=mixer.resolved_head_dim(config.d_model), padded_vocab_size=config.vocab_size,
        max_position_embeddings=config.max_seq_len, seq_length=config.max_seq_len, rotary_base=config.rope_theta,
        norm_epsilon=config.norm_eps, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
        position_embedding_type="rope", untie_embeddings_and_output_weights=not config.tie_embeddings,
        init_method_std=config.init_std,
        **(_moe_args(config.ffn) if _is_moe(config) else {}),
    )


def _moe_args(ffn) -> dict:
    return dict(
        num_experts=ffn.n_experts, moe_router_topk=ffn.top_k, moe_ffn_hidden_size=ffn.d_ff,
        moe_router_pre_softmax=False, moe_router_score_function="softmax", moe_grouped_gemm=False,
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=ffn.aux_loss_coef, moe_z_loss_coeff=ffn.z_loss_coef or None,
    )


def _check_exportable(config) -> None:
    from models.decoder.hf import LLAMA_ADAPTER

    if getattr(config, "ffn", None) is not None and _is_moe(config):
        from models.decoder.hf_moe import MIXTRAL_ADAPTER

        problem = MIXTRAL_ADAPTER.refusal(config)
        if problem:
            raise ConversionError(
                f"cannot write a Megatron GPT checkpoint of this MoE model: {problem} (only Mixtral-style MoE maps); "
                "convert to hf or safetensors instead"
            )
        return
    problem = LLAMA_ADAPTER.refusal(config)
    if problem:
        raise ConversionError(f"cannot write a Megatron GPT checkpoint: {problem}; convert to safetensors instead")


def _groups(config) -> tuple[int, int, int, int]:
    mixer = config.mixer
    return mixer.n_heads, mixer.n_kv_heads, mixer.resolved_head_dim(config.d_model), config.d_model


def split_qkv(weight: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_heads, n_groups, hd, d = _groups(config)
    per = n_heads // n_groups
    grouped = weight.reshape(n_groups, per + 2, hd, weight.shape[-1])
    q = grouped[:, :per].reshape(n_heads * hd, -1)
    return q.contiguous(), grouped[:, per].reshape(n_groups * hd, -1).contiguous(), grouped[:, per + 1].reshape(n_groups * hd, -1).contiguous()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config) -> torch.Tensor:
    n_heads, n_groups, hd, _ = _groups(config)
    per = n_heads // n_groups
    cols = q.shape[-1]
    parts = [q.reshape(n_groups, per, hd, cols), k.reshape(n_groups, 1, hd, cols), v.reshape(n_groups, 1, hd, cols)]
    return torch.cat(parts, dim=1).reshape(-1, cols)


def _layer_kinds(config):
    """(megatron key, our names of layer i, split(stacked[i]) → tensors, fuse(tensors) → one)."""
    ffn = config.ffn.d_ff
    return [
        (NORM1, ["mixer_norm.weight"], lambda t: [t], lambda ts: ts[0]),
        (QKV, ["mixer.wq.weight", "mixer.wk.weight", "mixer.wv.weight"], lambda t: split_qkv(t, config),
         lambda ts: fuse_qkv(*ts, config)),
        (PROJ, ["mixer.wo.weight"], lambda t: [t], lambda ts: ts[0]),
        (NORM2, ["ffn_norm.weight"], lambda t: [t], lambda ts: ts[0]),
    ] + (_moe_kinds(ffn) if _is_moe(config) else [
        (FC1, ["ffn.w1.weight", "ffn.w3.weight"], lambda t: [t[:ffn].contiguous(), t[ffn:].contiguous()],
         lambda ts: torch.cat(ts, 0)),
        (FC2, ["ffn.w2.weight"], lambda t: [t], lambda ts: ts[0]),
    ])


def _moe_kinds(ffn: int):
    experts = "ffn.routed.experts."
    return [
        (ROUTER, ["ffn.routed.router.gate.weight"], lambda t: [t], lambda ts: ts[0]),
        (EXPERTS_FC1, [experts + "w1", experts + "w3"], lambda t: [t[:, :ffn].contiguous(), t[:, ffn:].contiguous()],
         lambda ts: torch.cat(ts, 1)),
        (EXPERTS_FC2, [experts + "w2"], lambda t: [t], lambda ts: ts[0]),
    ]


def read_megatron(path: str | os.PathLike, model_config=None) -> Weights:
    """A Megatron torch_dist GPT checkpoint as our weights."""
    directory = iteration_dir(Path(path))
    common = _load_common(directory)
    if common.get("args") is not None:
        config = config_from_args(common["args"])
    elif model_config is not None:
        config = model_config
    else:
        raise ConversionError(
            f"{directory}/common.pt holds no Megatron-LM args; pass --model-config FILE (a YAML with our model section)"
        )
    _check_exportable(config)
    metadata = FileSystemReader(directory).read_metadata()
    tensors = {
        LOCAL_NAMES.get(k, k): (k, tuple(m.size), m.properties.dtype)
        for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)
    }
    kinds = _layer_kinds(config)
    known = {EMBED, FINAL, OUTPUT} | {kind[0] for kind in kinds}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise ConversionError(
            f"unknown Megatron layout: tensor {unknown[0]} ({len(unknown)} unrecognised); only Llama-style GPT checkpoints "
            "(RMSNorm, SwiGLU, RoPE, no biases, dense or Mixtral-style MoE MLP) convert"
        )
    for key in [EMBED, FINAL, *(kind[0] for kind in kinds)] + ([] if config.tie_embeddings else [OUTPUT]):
        if key not in tensors:
            raise ConversionError(f"{directory} lacks Megatron tensor {key}; the checkpoint is incomplete or another model")

    def load(key: str) -> torch.Tensor:
        stored, size, dtype = tensors[key]
        out = {stored: torch.empty(size, dtype=dtype)}
        with quiet_single_process():
            dcp.load(out, storage_reader=FileSystemReader(directory), no_dist=True)
        return out[stored]

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        yield "embed.weight", load(EMBED)
        for key, names, split, _ in kinds:
            stacked = load(key)
            if stacked.shape[0] != config.n_layers:
                raise ConversionError(f"{key} stacks {stacked.shape[0]} layers but the config has {config.n_layers}")
            for i in range(config.n_layers):
                for name, tensor in zip(names, split(stacked[i]), strict=True):
                    yield f"layers.{i}.{name}", tensor.contiguous()
            del stacked
        yield "norm.weight", load(FINAL)
        if not config.tie_embeddings:
            yield "head.weight", load(OUTPUT)

    listing = {}
    for name, tensor in _meta_read(config, tensors, kinds):
        listing[name] = (tuple(tensor.shape), tensor.dtype)
    check_against_config(listing, config, str(directory))
    return Weights(config, listing, read, None, common.get("iteration"), str(directory))


def _meta_read(config, tensors, kinds):
    """The names, shapes and dtypes ``read`` will yield, worked out on meta tensors."""
    def meta(key):
        return torch.empty(tensors[key][1], dtype=tensors[key][2], device="meta")

    yield "embed.weight", meta(EMBED)
    for key, names, split, _ in kinds:
        stacked = meta(key)
        for i in range(config.n_layers):
            for name, tensor in zip(names, split(stacked[i]), strict=True):
                yield f"layers.{i}.{name}", tensor
    yield "norm.weight", meta(FINAL)
    if not config.tie_embeddings:
        yield "head.weight", meta(OUTPUT)


def write_megatron(weights: Weights, out_dir: Path, batch_bytes: int, on_tensor=None) -> dict[str, str]:
    """Write ``weights`` as a Megatron-LM torch_dist checkpoint directory; returns checksums of
    the Megatron tensors."""
    from pretrain.convert.dcp_io import save_batches
    from pretrain.convert.tensorfile import checksum

    config = weights.config
    _check_exportable(config)
    if weights.fetch is None:
        raise ConversionError(f"{weights.source} cannot be read in Megatron's order")
    step = weights.step or 0
    directory = out_dir / f"iter_{step:07d}"
    directory.mkdir(parents=True)
    sums: dict[str, str] = {}
    n_layers = config.n_layers

    def fetch(name):
        tensor = weights.fetch(name)
        if on_tensor:
            on_tensor(name, tensor)
        return tensor

    def items():
        plain = [(EMBED, "embed.weight"), (FINAL, "norm.weight")]
        if not config.tie_embeddings:
            plain.append((OUTPUT, "head.weight"))
        for key, name in plain:
            tensor = fetch(name)
            sums[key] = checksum(tensor)
            yield key, tensor
        for key, names, _, fuse in _layer_kinds(config):
            stacked = torch.stack([fuse([fetch(f"layers.{i}.{n}") for n in names]) for i in range(n_layers)])
            sums[key] = checksum(stacked)
            yield key, stacked
            del stacked
        modules = EXTRA_STATE_MODULES[:2] if _is_moe(config) else EXTRA_STATE_MODULES
        for module in modules:
            for i in range(n_layers):
                # an empty extra state, as megatron-core stores sharded objects: a list of their data
                yield f"{P}{module}._extra_state/shard_{i}_{n_layers}", [None]
        if _is_moe(config):
            n = config.ffn.n_experts
            for fc in ("linear_fc1", "linear_fc2"):
                for i in range(n_layers):
                    for e in range(n):
                        yield f"{P}mlp.experts.experts.{fc}._extra_state/shard_{i}.{e}_{n_layers}.{n}", [None]

    save_batches(directory, items(), batch_bytes)
    backend = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
               "common_backend_version": 1}
    (directory / "metadata.json").write_text(json.dumps(backend))
    torch.save({"args": argparse.Namespace(**args_from_config(config)), "iteration": step,
                "checkpoint_version": 3.0}, directory / "common.pt")
    (out_dir / LATEST).write_text(f"{step}\n")
    return sums


def verify_megatron(out_dir: Path, sums: dict[str, str]) -> None:
    """Re-read every Megatron tensor written and compare checksums."""
    from pretrain.convert.tensorfile import checksum

    directory = iteration_dir(out_dir)
    metadata = FileSystemReader(directory).read_metadata()
    for key, digest in sums.items():
        meta = metadata.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise ConversionError(f"verification failed: {key} is missing from {directory}")
        out = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
        with quiet_single_process():
            dcp.load(out, storage_reader=FileSystemReader(directory), no_dist=True)
        if checksum(out[key]) != digest:
            raise ConversionError(f"verification failed: {key} reads back different from what was written")
