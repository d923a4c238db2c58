"""Decode-state (KV cache) bytes of YOCO against the same-depth decoder, from the configs'
``decode_cache_bytes`` formulas (tests/models/test_yoco.py checks them against the bytes real
caches hold):

    python bench/kv_cache.py [--pairs 1b:yoco-1b tiny:yoco-tiny] [--lengths 4096 32768 131072]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["1b:yoco-1b", "tiny:yoco-tiny"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 32768, 131072])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"bf16 caches, batch {args.batch}; MiB\n")
    print("| decoder preset | yoco preset | length | decoder MiB | yoco MiB | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for pair in args.pairs:
        decoder_name, yoco_name = pair.split(":")
        decoder, yoco = load_config(decoder_name).model, load_config(yoco_name).model
        for length in args.lengths:
            a = decoder.decode_cache_bytes(args.batch, length) / 2**20
            b = yoco.decode_cache_bytes(args.batch, length) / 2**20
            print(f"| {decoder_name} | {yoco_name} | {length} | {a:,.1f} | {b:,.1f} | {a / b:.1f}× |")


if __name__ == "__main__":
    main()
