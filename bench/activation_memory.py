"""Activation memory per transformer block and recompute mode: measured vs derived.

    python bench/activation_memory.py [--seq 1024] [--batch 1] [--shapes 125m 1b]

Three markdown tables:

1. One process: for blocks shaped like the named presets (2 blocks each), the bytes per block
   that autograd keeps for backward, measured with saved-tensor hooks
   (tools.activation_meter.ActivationMeter), next to the derivation
   (models.decoder.activations.block_activation_bytes), for each recompute mode, in fp32 and with
   bf16 parameters (the FSDP2 mixed-precision regime), SDPA on unpacked causal rows.
2. The same per rank under TP2 and TP2+SP (2 gloo processes, bf16, the first shape).
3. Derived only, per block at each preset's training length in bf16, one GPU and TP8+SP, with
   Korthikanti et al.'s formula for their GPT block of the same width, heads and length
   (34·s·b·h + 5·a·s²·b bytes; 4h GeLU MLP, LayerNorm, dropout) for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.decoder.activations import block_activation_bytes  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from tools.activation_meter import measure_activations  # noqa: E402
from pretrain.parallel.recompute import RECOMPUTE_MODES  # noqa: E402

MIB = 2**20


def shape_of(preset: str, seq: int):
    config = load_config(preset).model
    return dataclasses.replace(config, n_layers=2, vocab_size=1024, max_seq_len=seq)


def measure(config, batch: int, seq: int, mode: str, dtype: torch.dtype, tp_mesh=None, sp: bool = False) -> int:
    per_layer = set(measure_activations(config, batch, seq, mode, dtype, tp_mesh, sp).values())
    assert len(per_layer) == 1, per_layer
    return per_layer.pop()


def one_process_table(shapes: list[str], batch: int, seq: int) -> list[str]:
    rows = ["| block | dtype | mode | measured MiB | derived MiB | measured / derived |", "|---|---|---|---|---|---|"]
    for preset in shapes:
        config = shape_of(preset, seq)
        for dtype, e in ((torch.float32, 4), (torch.bfloat16, 2)):
            for mode in RECOMPUTE_MODES:
                got = measure(config, batch, seq, mode, dtype)
                want = block_activation_bytes(config, batch, seq, mode, element_bytes=e)
                rows.append(
                    f"| {preset} | {str(dtype).split('.')[1]} | {mode} | {got / MIB:.2f} | {want / MIB:.2f} | "
                    f"{got / want:.4f} |"
                )
    return rows


def _tp_worker(rank: int, world: int, port: int, preset: str, batch: int, seq: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    config = shape_of(preset, seq)
    for sp in (False, True):
        for mode in RECOMPUTE_MODES:
            got = measure(config, batch, seq, mode, torch.bfloat16, tp_mesh=mesh, sp=sp)
            if rank == 0:
                out[sp, mode] = got
    dist.destroy_process_group()


def tp_table(preset: str, batch: int, seq: int) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_tp_worker, args=(2, port, preset, batch, seq, out), nprocs=2)
    config = shape_of(preset, seq)
    rows = ["| block | layout | mode | measured MiB/rank | derived MiB/rank | measured / derived |",
            "|---|---|---|---|---|---|"]
    for sp in (False, True):
        for mode in RECOMPUTE_MODES:
            want = block_activation_bytes(config, batch, seq, mode, tp=2, sp=sp, element_bytes=2)
            got = out[sp, mode]
            rows.append(
                f"| {preset} | TP2{'+SP' if sp else ''} | {mode} | {got / MIB:.2f} | {want / MIB:.2f} | "
                f"{got / want:.4f} |"
            )
    return rows


def korthikanti(config, batch: int, seq: int, tp: int, selective: bool) -> float:
    """Their GPT block, 16-bit, TP+SP (tp=1: no parallelism)."""
    s, b, h, a = seq, batch, config.d_model, config.mixer.n_heads
    quadratic = 0 if selective else 5 * a * s / h
    return s * b * h / tp * (34 + quadratic)


def derived_table(presets: list[str], batch: int) -> list[str]:
    rows = ["| preset | seq | layout | none | selective | op | full | GPT formula: none / selective |",
            "|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        config = load_config(preset).model
        seq = config.max_seq_len
        for tp, sp in ((1, False), (8, True)):
            cells = [block_activation_bytes(config, batch, seq, m, tp=tp, sp=sp, element_bytes=2) / MIB
                     for m in RECOMPUTE_MODES]
            gpt = [korthikanti(config, batch, seq, tp, sel) / MIB for sel in (False, True)]
            layout = "1 GPU" if tp == 1 else f"TP{tp}+SP"
            rows.append(
                f"| {preset} | {seq} | {layout} | " + " | ".join(f"{c:.1f}" for c in cells)
                + f" | {gpt[0]:.1f} / {gpt[1]:.1f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--shapes", nargs="+", default=["125m", "1b"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"## Activation bytes per block, one process (batch {args.batch}, seq {args.seq}, SDPA)\n")
    print("\n".join(one_process_table(args.shapes, args.batch, args.seq)))
    print(f"\n## Per rank under tensor parallelism ({args.shapes[0]}-shaped block, bf16)\n")
    print("\n".join(tp_table(args.shapes[0], args.batch, args.seq)))
    print(f"\n## Derived MiB per block in bf16 at each preset's length (batch {args.batch})\n")
    print("\n".join(derived_table(["125m", "350m", "1b"], args.batch)))


if __name__ == "__main__":
    main()
