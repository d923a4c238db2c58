"""Bad inputs to ``pretrain convert`` give one ``error:`` line naming the tensor (or setting) and
the fix, and write nothing; a conversion killed mid-way leaves no output that looks complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.cli import main
from pretrain.convert import convert
from tests.convert.helpers import decoder_config, random_model, save_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bible_tokenizer):
    root = tmp_path_factory.mktemp("src")
    save_run(root / "run", random_model(decoder_config()), tokenizer=bible_tokenizer)
    convert("dcp", "hf", root / "run", root / "hf", shard_size="100KB")
    return root


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of the HF directory ``src`` with ``edit(index, shards, config)`` applied."""
    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = {f: load_file(src / f) for f in sorted(set(index["weight_map"].values()))}
    config = json.loads((src / "config.json").read_text())
    edit(index, shards, config)
    for f, tensors in shards.items():
        save_file(tensors, dst / f, metadata={"format": "pt"})
    index["weight_map"] = {n: f for f, tensors in shards.items() for n in tensors}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def drop(name):
    def edit(index, shards, config):
        del shards[index["weight_map"][name]][name]

    return edit


def add_extra(index, shards, config):
    next(iter(shards.values()))["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)


def shrink_vocab(index, shards, config):
    config["vocab_size"] = 4000


def foreign(index, shards, config):
    config["architectures"] = ["GPT2LMHeadModel"]


@pytest.mark.parametrize(
    "edit,expected",
    [
        (drop("model.layers.1.mlp.up_proj.weight"), "lacks tensor model.layers.1.mlp.up_proj.weight"),
        (add_extra, "holds tensor model.layers.0.self_attn.rotary_emb.inv_freq"),
        (shrink_vocab, "tensor embed.weight has shape (4096, 64) but the config builds (4000, 64) (vocab_size differs)"),
        (foreign, "no adapter converts GPT2LMHeadModel"),
    ],
    ids=["missing", "unexpected", "vocab", "architecture"],
)
def test_bad_hf_input_is_one_line_naming_the_problem(hf_dir, tmp_path, capsys, edit, expected):
    bad = edited_copy(hf_dir / "hf", tmp_path / "bad", edit)
    assert main(["convert", "--from", "hf", "--to", "dcp", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys, bible_tokenizer):
    save_run(tmp_path / "run", random_model(decoder_config(vocab=1000)), tokenizer=bible_tokenizer)
    assert main(["convert", "--from", "dcp", "--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "has 4096 tokens but the model's vocab_size is 1000" in err and "--tokenizer" in err


def test_a_checkpoint_without_a_model_config_is_refused(tmp_path, capsys):
    from pretrain.checkpoint import CheckpointManager

    CheckpointManager(tmp_path / "ckpt").save(1, random_model(decoder_config()), extra_state={"step": 1})
    assert main(["convert", "--from", "dcp", "--to", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    assert "holds no model config" in capsys.readouterr().err


def test_a_killed_conversion_leaves_nothing_that_looks_complete(tmp_path):
    config = decoder_config(vocab=32000)
    config.d_model, config.n_layers, config.ffn.d_ff = 256, 8, 1024
    save_run(tmp_path / "run", random_model(config))
    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pretrain", "convert", "--from", "dcp", "--to", "hf", "--shard-size", "64KB",
           str(tmp_path / "run"), str(out)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        while not any(tmp_path.glob("hf.tmp-*/model-00005-of-*.safetensors")):
            assert proc.poll() is None, "the conversion ended before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "run"]
    assert leftovers and all(".tmp-" in name for name in leftovers)
    decoys = ["hf.tmp-notours", "hf2.tmp-0123456789ab", "hf.tmp-0123456789abc", "hf.tmp-replaced-0123"]
    for name in decoys:
        (tmp_path / name).mkdir()
    assert main(["convert", "--from", "dcp", "--to", "hf", str(tmp_path / "run"), str(out)]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", "hf", *decoys])


def test_leftovers_of_a_single_file_output_are_removed_on_the_next_run(tmp_path, capsys):
    save_run(tmp_path / "run", random_model(decoder_config(vocab=512)))
    out = tmp_path / "m.safetensors"
    for name in ("m.safetensors.tmp-00112233aabb", "m.safetensors.tmp-replaced-deadbeef", "m.safetensors.tmp-x"):
        (tmp_path / name).write_bytes(b"half written")
    assert main(["convert", "--from", "dcp", "--to", "safetensors", str(tmp_path / "run"), str(out)]) == 0
    assert "removing" in capsys.readouterr().err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.config.json", "m.safetensors", "m.safetensors.tmp-x", "run"]
    assert load_file(out).keys() == dict(random_model(decoder_config(vocab=512)).named_parameters()).keys()
