"""The tokenizer files of an HF model directory, from our tokenizer: a sentencepiece
``tokenizer.model`` (loaded by transformers' LlamaTokenizer, with the dummy-prefix setting the
model was trained with) or a ``tokenizer.json``, plus ``tokenizer_config.json`` naming the
BOS/EOS/PAD tokens. Special-token text inside a document is encoded as text, as ours does
(``split_special_tokens``)."""

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


def write_hf_tokenizer(path: Path | None, out_dir: Path, max_len: int) -> dict:
    """Copy the tokenizer at ``path`` into ``out_dir`` with its tokenizer_config.json; returns
    the special token ids (``bos_token_id``...). No tokenizer: nothing written, no ids."""
    if path is None:
        return {}
    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    config: dict = {"model_max_length": max_len, "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    if path.suffix == ".model" or path.name == "tokenizer.model":
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        shutil.copyfile(path, out_dir / "tokenizer.model")
        config.update(
            tokenizer_class="LlamaTokenizer", add_prefix_space=bool(proto.normalizer_spec.add_dummy_prefix),
            legacy=False, add_bos_token=tokenizer.bos_id is not None, add_eos_token=False,
        )
    else:
        shutil.copyfile(path, out_dir / "tokenizer.json")
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
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
