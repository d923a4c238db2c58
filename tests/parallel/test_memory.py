"""Saved activation bytes per block, measured with saved-tensor hooks, equal the derivation in
models/decoder/activations.py exactly: for each recompute mode, attention kernel and dtype in one
process, and per rank under TP and TP+SP."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from models.decoder.activations import BACKEND_EXTRAS, block_activation_bytes, block_activation_terms
from tools.activation_meter import measure_activations
from pretrain.parallel.recompute import RECOMPUTE_MODES
from tests.parallel.launch import run_ranks
from tests.parallel.workloads import TINY, variant

# d_ff not a multiple of d_model and GQA, so that no two terms of the derivation coincide.
CONFIG = variant(TINY, ffn={"d_ff": 160}, n_layers=3, max_seq_len=64)
BATCH, SEQ = 2, 32
# attention backend, whether rows hold several documents, the derivation's kernel
KERNELS = [("sdpa", False, "fused"), ("sdpa", True, "fused_masked"), ("math", False, "unfused"),
           ("math", True, "unfused_masked")]


def measure(mode: str, backend: str, documents: bool, dtype=torch.float32, tp_mesh=None, sp=False) -> dict:
    config = variant(CONFIG, mixer={"backend": backend})
    doc_ids = (torch.arange(SEQ) // 10).expand(BATCH, SEQ) if documents else None
    return measure_activations(config, BATCH, SEQ, mode, dtype, tp_mesh, sp, doc_ids)


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
@pytest.mark.parametrize("backend, documents, kernel", KERNELS, ids=[k for *_, k in KERNELS])
def test_one_process_fp32(mode, backend, documents, kernel):
    measured = measure(mode, backend, documents)
    expected = block_activation_bytes(CONFIG, BATCH, SEQ, mode, kernel=kernel)
    assert measured == {f"layers.{i}": expected for i in range(CONFIG.n_layers)}


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_one_process_bf16(mode):
    measured = measure(mode, "sdpa", False, dtype=torch.bfloat16)
    expected = block_activation_bytes(CONFIG, BATCH, SEQ, mode, element_bytes=2)
    assert measured == {f"layers.{i}": expected for i in range(CONFIG.n_layers)}


def test_modes_order_and_the_quadratic_term():
    bytes_of = {mode: block_activation_bytes(CONFIG, BATCH, SEQ, mode, kernel="unfused") for mode in RECOMPUTE_MODES}
    assert bytes_of["full"] < bytes_of["op"] < bytes_of["selective"] < bytes_of["none"]
    # Selective recomputation removes exactly what scales with s² (and the kernel's K/V copies).
    terms = block_activation_terms(CONFIG, BATCH, SEQ, "none", kernel="unfused")
    quadratic = terms["probs"] + terms["extra.probs_masked"] + terms["extra.masks_bool"]
    head_dim = CONFIG.d_model // CONFIG.mixer.n_heads
    expanded = 4 * BATCH * SEQ * 2 * (CONFIG.mixer.n_heads - CONFIG.mixer.n_kv_heads) * head_dim
    assert bytes_of["none"] - bytes_of["selective"] == quadratic + expanded
    assert bytes_of["full"] == 4 * BATCH * SEQ * CONFIG.d_model  # the block input only


@pytest.mark.parametrize("kernel", ["fused", "fused_masked", "unfused", "unfused_masked"])
def test_attention_math_is_the_same_for_every_backend_and_extras_have_reasons(kernel):
    """Attention's terms without the ``extra.`` ones are its math: q, k, v, out and the softmax
    statistics (log-sum-exp per query and head, or the fp32 probabilities when the kernel keeps
    them); a kernel that keeps nothing else (flash) has no extras, and every extra names its
    reason (measured totals above include them)."""
    terms = block_activation_terms(CONFIG, BATCH, SEQ, "none", kernel=kernel)
    head_dim = CONFIG.d_model // CONFIG.mixer.n_heads
    q, kv, t, heads = CONFIG.d_model, CONFIG.mixer.n_kv_heads * head_dim, BATCH * SEQ, CONFIG.mixer.n_heads
    math = {"q": 4 * t * q, "k": 4 * t * kv, "v": 4 * t * kv, "out": 4 * t * q}
    math.update({"probs": 4 * BATCH * heads * SEQ**2} if kernel.startswith("unfused") else {"lse_fp32": 4 * t * heads})
    attention = {k: v for k, v in terms.items() if not k.startswith(("mixer_norm.", "ffn_norm.", "gate", "up",
                                                                         "extra."))}
    assert attention == math
    extras = {k.removeprefix("extra."): v for k, v in terms.items() if k.startswith("extra.")}
    assert (kernel == "fused") == (not extras)
    assert set(extras) <= set(BACKEND_EXTRAS)


def measure_tp(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for backend, documents, kernel in KERNELS[:3]:
        for sp in (False, True):
            for mode in RECOMPUTE_MODES:
                results[kernel, sp, mode] = measure(mode, backend, documents, tp_mesh=mesh, sp=sp)
    return results


@pytest.fixture(scope="module")
def per_rank():
    return run_ranks(2, measure_tp)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("kernel", [k for *_, k in KERNELS[:3]])
def test_per_rank_under_tensor_parallelism(per_rank, kernel, sp):
    for mode in RECOMPUTE_MODES:
        expected = block_activation_bytes(CONFIG, BATCH, SEQ, mode, kernel=kernel, tp=2, sp=sp)
        for rank, results in enumerate(per_rank):
            assert results[kernel, sp, mode] == {f"layers.{i}": expected for i in range(CONFIG.n_layers)}, (mode, rank)
    if sp and kernel == "fused":  # all but the gathered GEMM inputs divide by tp (a mask would not)
        # One process's norms are lean; under TP they run the plain ops, which also keep x/rms.
        one = block_activation_bytes(CONFIG, BATCH, SEQ, "none") + 2 * 4 * BATCH * SEQ * CONFIG.d_model
        gathered = 2 * 4 * BATCH * SEQ * CONFIG.d_model
        assert block_activation_bytes(CONFIG, BATCH, SEQ, "none", tp=2, sp=True) == (one - gathered) / 2 + gathered
