"""Context parallelism on CPU (gloo): activation memory per rank, step time and ring traffic.

    python bench/context_parallel.py [--seqs 1024 2048 4096] [--cps 1 2 4] [--steps 3]

A decoder of 2 blocks (d_model 256, 8 query / 4 KV heads of 32, SwiGLU 704, fp32), one sequence
per step: one causal document, or packed documents of 512 tokens (a document mask). Two markdown
tables:

1. Saved activation bytes per block and rank (tools.activation_meter.ActivationMeter: what
   autograd keeps for backward) at each sequence length and cp degree, next to cp=1's bytes / cp,
   for one document (cp=1: SDPA's fused causal kernel) and for packed documents (cp=1: SDPA
   with a mask, whose CPU kernel keeps the S² probabilities).
2. At the longest sequence: forward+backward time per step (median of ``--steps`` after one
   warm-up) of cp=1 (one process, the whole sequence) and of each cp (cp processes, the same
   tokens), the time a rank spent blocked in the transfers' ``wait`` (what the overlap did not
   hide), and the bytes each rank sends per step counted at ``torch.distributed.isend``, next
   to the formula (ring.py): per layer (cp−1) K/V blocks forward, (cp−1) K/V blocks and cp fp32
   dK/dV accumulators backward, a block being 2·B·Hkv·(S/cp)·D elements.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attention.layer import AttentionConfig  # noqa: E402
from models.decoder.config import DecoderConfig  # noqa: E402
from models.ffn.swiglu import SwiGLUConfig  # noqa: E402
from models.spec import build_model  # noqa: E402
from pretrain.parallel.context.apply import apply_cp  # noqa: E402
from pretrain.parallel.context.zigzag import shard_sequence  # noqa: E402
from tools.activation_meter import ActivationMeter  # noqa: E402

MIB = 2**20
HEADS, KV_HEADS, HEAD_DIM, LAYERS, DOC = 8, 4, 32, 2, 512


def config(seq: int) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=1024, d_model=HEADS * HEAD_DIM, n_layers=LAYERS, max_seq_len=seq,
        mixer=AttentionConfig(n_heads=HEADS, n_kv_heads=KV_HEADS), ffn=SwiGLUConfig(d_ff=704),
    )


def batch(seq: int, documents: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (1, seq + 1), generator=g)
    doc = DOC if documents else seq
    positions = torch.arange(seq)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": (positions // doc)[None],
            "position_ids": (positions % doc)[None]}


def model_for(seq: int, mesh) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(config(seq))
    if mesh is not None:
        apply_cp(model, mesh, "ring")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def run(seq: int, cp: int, rank: int, steps: int, mesh, timed: bool, documents: bool) -> dict:
    model = model_for(seq, mesh)
    data = batch(seq, documents)
    local = shard_sequence(data, cp, rank) if cp > 1 else data
    doc_ids = local["doc_ids"] if documents else None

    def step() -> None:
        logits = model(local["input_ids"], position_ids=local["position_ids"], doc_ids=doc_ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), local["labels"].flatten()).backward()

    meter = ActivationMeter(model)
    with meter.measure():
        step()
    result = {"bytes": max(meter.per_layer().values())}
    if timed:
        sent = {"bytes": 0, "waited": 0.0}
        original = dist.isend, dist.irecv

        class Timed:
            """A transfer whose ``wait`` adds the time it blocked to ``sent["waited"]``."""

            def __init__(self, work):
                self.work = work

            def wait(self):
                start = time.perf_counter()
                self.work.wait()
                sent["waited"] += time.perf_counter() - start

        def counting_send(tensor, *args, **kwargs):
            sent["bytes"] += tensor.numel() * tensor.element_size()
            return Timed(original[0](tensor, *args, **kwargs))

        def timed_recv(tensor, *args, **kwargs):
            return Timed(original[1](tensor, *args, **kwargs))

        times = []
        for i in range(steps + 1):
            if mesh is not None:
                dist.barrier()
            dist.isend, dist.irecv = (counting_send, timed_recv) if i == 1 else original
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        dist.isend, dist.irecv = original
        result.update(seconds=statistics.median(times[1:]), sent=sent["bytes"], waited=sent["waited"])
    return result


def _worker(rank: int, cp: int, port: int, seq: int, steps: int, timed: bool, documents: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cp)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    result = run(seq, cp, rank, steps, mesh, timed, documents)
    out[rank] = result
    dist.barrier()
    dist.destroy_process_group()


def measure(seq: int, cp: int, steps: int, timed: bool, documents: bool) -> dict:
    if cp == 1:
        torch.set_num_threads(1)
        return run(seq, 1, 0, steps, None, timed, documents)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(cp, port, seq, steps, timed, documents, out), nprocs=cp)
    results = [out[r] for r in range(cp)]
    merged = {"bytes": max(r["bytes"] for r in results)}
    if timed:
        merged.update(seconds=max(r["seconds"] for r in results), sent=max(r["sent"] for r in results),
                      waited=max(r["waited"] for r in results))
    return merged


def ring_bytes(seq: int, cp: int, element_bytes: int = 4) -> int:
    block = 2 * KV_HEADS * (seq // cp) * HEAD_DIM
    return LAYERS * block * (2 * (cp - 1) * element_bytes + cp * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    longest = max(args.seqs)
    print("| rows | seq | cp | saved MiB per block and rank | cp=1 / cp | ratio |\n|---|---|---|---|---|---|")
    timed = {}
    for documents in (False, True):
        for seq in args.seqs:
            base = None
            for cp in args.cps:
                result = measure(seq, cp, args.steps, seq == longest and documents, documents)
                base = result["bytes"] if cp == 1 else base
                if seq == longest and documents:
                    timed[cp] = result
                expected = base / cp
                rows = f"documents of {DOC}" if documents else "one document"
                print(f"| {rows} | {seq} | {cp} | {result['bytes'] / MIB:.2f} | {expected / MIB:.2f} | "
                      f"{result['bytes'] / expected:.3f} |", flush=True)
    print(f"\n| seq {longest}, documents | step s | vs cp=1 | blocked on transfers s | sent per rank MiB | formula MiB |"
          "\n|---|---|---|---|---|---|")
    for cp, result in timed.items():
        formula = ring_bytes(longest, cp) if cp > 1 else 0
        print(f"| cp={cp} | {result['seconds']:.3f} | {result['seconds'] / timed[args.cps[0]]['seconds']:.2f}x | "
              f"{result['waited']:.3f} | {result['sent'] / MIB:.2f} | {formula / MIB:.2f} |")


if __name__ == "__main__":
    main()
