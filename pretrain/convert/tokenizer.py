"""The tokenizer files of an HF model directory, from our tokenizer: a sentencepiece
``tokenizer.model`` (loaded by transformers' LlamaTokenizer, with the dummy-prefix setting the
model was trained with) or a ``tokenizer.json``, plus ``tokenizer_config.json`` naming the
BOS/EOS/PAD tokens. Special-token text inside a document is encoded as text, as ours does
(``split_special_tokens``).

An encoder-decoder (T5) also gets its span-corruption sentinels: ``<extra_id_j>`` is id
``vocab_size − 1 − j`` for every id the model has beyond the tokenizer's (data/span_corruption.py).
A T5-style sentencepiece model (unigram, dummy prefix, whitespace collapsed, no byte fallback,
``<pad>`` 0 / ``</s>`` 1 / ``<unk>`` 2) ships as ``spiece.model`` for ``T5Tokenizer`` with
``extra_ids``; any other tokenizer (ours train BPE with byte fallback, which T5Tokenizer's
unigram backend would segment differently) ships as above with the sentinels as added tokens
that are not special, so they are recognised in text while ``<s>``/``</s>`` stay text, as in
``encode_with_sentinels``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pretrain.convert.errors import ConversionError


def _token(tokenizer, token_id):
    if token_id is None:
        return None
    if hasattr(tokenizer, "piece"):
        return tokenizer.piece(token_id)
    return tokenizer._tok.id_to_token(token_id)


def _t5_style(proto) -> bool:
    """Whether T5Tokenizer (a unigram backend with T5's fixed pre-tokenizer) reproduces ``proto``."""
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces[:3]]
    return (
        trainer.model_type == trainer.UNIGRAM and not trainer.byte_fallback and normalizer.add_dummy_prefix
        and normalizer.remove_extra_whitespaces and pieces == ["<pad>", "</s>", "<unk>"]
    )


def write_hf_tokenizer(path: Path | None, out_dir: Path, model_config) -> dict:
    """Copy the tokenizer at ``path`` into ``out_dir`` with its tokenizer_config.json; returns
    the special token ids (``bos_token_id``...). No tokenizer: nothing written, no ids."""
    if path is None:
        return {}
    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    extra = model_config.vocab_size - tokenizer.vocab_size if model_config.family == "encdec" else 0
    config: dict = {
        "model_max_length": model_config.max_seq_len, "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    if path.suffix == ".model":
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        if model_config.family == "encdec" and _t5_style(proto):
            shutil.copyfile(path, out_dir / "spiece.model")
            config.update(tokenizer_class="T5Tokenizer", extra_ids=extra, split_special_tokens=False)
            extra = 0
        else:
            shutil.copyfile(path, out_dir / "tokenizer.model")
            config.update(
                tokenizer_class="LlamaTokenizer", add_prefix_space=bool(proto.normalizer_spec.add_dummy_prefix),
                legacy=False, add_bos_token=tokenizer.bos_id is not None, add_eos_token=False,
            )
    else:
        shutil.copyfile(path, out_dir / "tokenizer.json")
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if extra > 0:
        config["added_tokens_decoder"] = {
            str(model_config.vocab_size - 1 - j): {
                "content": f"<extra_id_{j}>", "special": False, "lstrip": False, "rstrip": False,
                "normalized": False, "single_word": False,
            }
            for j in reversed(range(extra))
        }
    ids = {}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_id")
        ids[f"{role}_token_id"] = token_id
        if token_id is not None:
            config[f"{role}_token"] = _token(tokenizer, token_id)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ids


def check_vocab(tokenizer_path: Path | None, vocab_size: int, source: str) -> None:
    """Refuse a tokenizer with more ids than the model's embedding has rows."""
    if tokenizer_path is None:
        return
    from data.tokenizer import load_tokenizer

    size = load_tokenizer(tokenizer_path).vocab_size
    if size > vocab_size:
        raise ConversionError(
            f"{source}: tokenizer {tokenizer_path.name} has {size} tokens but the model's vocab_size is {vocab_size}; "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )
