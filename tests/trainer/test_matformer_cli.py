"""MatFormer end to end on the built-in corpus, through the command line: joint training orders
validation loss by width; ``pretrain matformer extract`` writes a standalone checkpoint and a
Hugging Face Llama directory that compute what the trained model computes at that width;
``sweep`` reports each choice's exact parameter count and its loss; self-speculative ``generate``
gives the full model's greedy output. Sampled-width training resumes across layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.ffn.matformer import set_granularity
from models.generate import generate
from models.speculative import speculative_generate
from pretrain.config import load_config
from pretrain.distributed import DistInfo
from pretrain.generation import draft_switch, load_checkpoint_model
from pretrain.matformer import extract_main
from pretrain.train import Trainer
from tests.parallel.launch import run_ranks

MODEL = [
    "model.d_model=128", "model.n_layers=4", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2",
    "model.ffn.granularities=[64,256,1024]", "model.max_seq_len=128", "data.seq_len=128", "data.num_workers=0",
]
RUN = [
    "train.global_batch=8", "train.micro_batch=8", "train.max_steps=80", "train.eval_interval=40",
    "train.eval_batches=4", "schedule.warmup_steps=8", "logging.interval=40", "checkpoint.interval=40",
]


def env_for(cache: Path) -> dict:
    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def pretrain(cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", *args], env=env_for(cache), check=True,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("matformer")
    pretrain(cache, "train", "--config", "matformer-tiny", *MODEL, *RUN, f"run.dir={run_dir}")
    return run_dir


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_validation_loss_is_ordered_by_width(trained):
    last = [r for r in records(trained) if "valid_loss" in r][-1]
    widths = [last[f"valid_loss/m{m}"] for m in (64, 256, 1024)]
    assert widths[0] > widths[1] > widths[2], widths
    assert last["valid_loss"] == last["valid_loss/m1024"]
    train = [r for r in records(trained) if "loss" in r]
    # The logged step loss is the joint objective: the sum of the widths' losses (weights 1).
    for r in train:
        assert r["loss"] == pytest.approx(sum(r[f"loss/m{m}"] for m in (64, 256, 1024)), rel=1e-9)


def test_the_report_plots_each_widths_loss(trained):
    """The report written at the end of the run has one plot per logged per-width loss."""
    widths = sorted({key for r in records(trained) for key in r if key.startswith("loss/m")})
    assert widths == ["loss/m1024", "loss/m256", "loss/m64"], widths
    for key in widths:
        assert (trained / "report" / f"{key.replace('/', '_')}.png").read_bytes()[:4] == b"\x89PNG", key


def logits_at(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_extract_writes_what_the_trained_model_computes(trained, cache, tmp_path):
    from transformers import LlamaForCausalLM

    model, _ = load_checkpoint_model(trained / "checkpoints")
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    pretrain(cache, "matformer", "extract", "--checkpoint", str(trained / "checkpoints"), "--granularity", "256",
             "--output", str(tmp_path / "m256"))
    dense, _ = load_checkpoint_model(tmp_path / "m256" / "checkpoints")
    assert [f.d_ff for f in dense.config.layers().ffns] == [256] * 4
    set_granularity(model, 256)
    expected = logits_at(model, tokens)
    assert torch.equal(logits_at(dense, tokens), expected)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "m256" / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, expected, rtol=0, atol=1e-5)
    # Mix'n'Match: one width per layer; no single Llama size, so no hf/.
    pretrain(cache, "matformer", "extract", "--checkpoint", str(trained / "checkpoints"), "--per-layer",
             "64,256,256,1024", "--output", str(tmp_path / "mix"))
    mixed, _ = load_checkpoint_model(tmp_path / "mix" / "checkpoints")
    set_granularity(model, [64, 256, 256, 1024])
    assert torch.equal(logits_at(mixed, tokens), logits_at(model, tokens))
    assert not (tmp_path / "mix" / "hf").exists()
    bad = subprocess.run([sys.executable, "-m", "pretrain", "matformer", "extract", "--checkpoint",
                          str(trained / "checkpoints"), "--granularity", "100", "--output", str(tmp_path / "bad")],
                         env=env_for(cache), capture_output=True, text=True)
    assert bad.returncode == 2 and "width 100 is not one of its granularities [64, 256, 1024]" in bad.stderr


def test_sweep_counts_and_losses(trained, cache, tmp_path):
    pretrain(cache, "matformer", "sweep", "--checkpoint", str(trained / "checkpoints"), "--output", str(tmp_path))
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert (tmp_path / "sweep.png").is_file() and (tmp_path / "sweep.md").is_file()
    full = next(r for r in rows if r["widths"] == [1024] * 4)
    assert [1024, 1024, 1024, 1024] in [r["widths"] for r in rows] and len(rows) > 3
    for r in rows:
        assert r["widths"] == sorted(r["widths"]), "default choices never shrink with depth"
        assert r["params"] == full["params"] - sum(3 * 128 * (1024 - m) for m in r["widths"])
    last = [r for r in records(trained) if "valid_loss" in r][-1]
    for m in (64, 256, 1024):  # the run's own validation of each width (same batches)
        row = next(r for r in rows if r["widths"] == [m] * 4)
        assert row["valid_loss"] == pytest.approx(last[f"valid_loss/m{m}"], abs=1e-5)


def test_self_speculative_decoding_is_the_full_models_greedy_output(trained):
    model, _ = load_checkpoint_model(trained / "checkpoints")
    g = torch.Generator().manual_seed(3)
    accepted = 0
    for length in (1, 5, 17):
        prompt = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
        greedy = generate(model, prompt, 40)
        for width, k in ((64, 4), (256, 3), (256, 1)):
            out, stats = speculative_generate(model, prompt, 40, draft_switch(model, width), k=k)
            assert torch.equal(out, greedy), (length, width, k)
            accepted += stats.accepted
    assert accepted > 0


def test_generate_command_with_a_draft_prints_the_plain_greedy_text(trained, cache):
    common = ["generate", "--checkpoint", str(trained / "checkpoints"), "--prompt", "And God said",
              "--max-new-tokens", "24"]
    plain = pretrain(cache, *common)
    drafted = pretrain(cache, *common, "--draft-granularity", "256", "--draft-tokens", "3")
    assert drafted.stdout == plain.stdout and plain.stdout.startswith("And God said")
    assert "drafted tokens accepted" in drafted.stderr
    bad = subprocess.run([sys.executable, "-m", "pretrain", *common, "--draft-granularity", "100"],
                         env=env_for(cache), capture_output=True, text=True)
    assert bad.returncode == 2 and "nested widths are ['64', '256', '1024']" in bad.stderr


def train_sampled(rank: int, world: int, cache: str, run_dir: str, overrides: list[str]) -> dict:
    os.environ["PRETRAIN_CACHE"] = cache
    small = ["model.d_model=64", "model.n_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2",
             "model.ffn.d_ff=256", "model.ffn.granularities=[64,128,256]", "model.ffn.train_mode=sampled",
             "model.ffn.tp_interleave=2", "model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0",
             "train.global_batch=8", "train.micro_batch=4", "train.max_steps=8", "train.eval_interval=0",
             "schedule.warmup_steps=2", "logging.interval=1", "checkpoint.interval=4"]
    config = load_config("matformer-tiny", [*small, f"run.dir={run_dir}", *overrides])
    trainer = Trainer(config, DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu")))
    return {"code": trainer.fit()}


def step_losses(run_dir: Path) -> dict[int, tuple[float, list[str]]]:
    return {r["step"]: (r["loss"], sorted(k for k in r if k.startswith("loss/"))) for r in records(run_dir)
            if "loss" in r}


def test_sampled_widths_resume_across_layouts(cache, tmp_path):
    """One width per step from the seeded schedule: TP2 equals one process; TP2's step-4
    checkpoint resumed in one process continues TP2's own steps 5-8."""
    one, tp2, resumed = tmp_path / "one", tmp_path / "tp2", tmp_path / "resumed"
    assert run_ranks(1, train_sampled, str(cache), str(one), [])[0]["code"] == 0
    assert all(r["code"] == 0 for r in run_ranks(2, train_sampled, str(cache), str(tp2), ["parallel.tp=2"]))
    checkpoint = tp2 / "checkpoints" / "step_00000004"
    assert run_ranks(1, train_sampled, str(cache), str(resumed), [f"checkpoint.resume={checkpoint}"])[0]["code"] == 0
    a, b, c = step_losses(one), step_losses(tp2), step_losses(resumed)
    assert len({tuple(names) for _, names in a.values()} ) > 1, "the schedule draws different widths"
    for step in range(1, 9):
        assert b[step][1] == a[step][1] and b[step][0] == pytest.approx(a[step][0], abs=1e-5), step
    assert sorted(c) == [5, 6, 7, 8]
    for step in c:
        assert c[step][1] == b[step][1] and c[step][0] == pytest.approx(b[step][0], abs=1e-6), step
    # Trained under TP2 in the interleaved order: the extracted width-64 model (order undone)
    # computes what the checkpoint's model computes at width 64.
    model, _ = load_checkpoint_model(checkpoint)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    extract_main(checkpoint, tmp_path / "m64", granularity=64)
    dense, _ = load_checkpoint_model(tmp_path / "m64" / "checkpoints")
    set_granularity(model, 64)
    assert torch.equal(logits_at(dense, tokens), logits_at(model, tokens))
    # The safetensors export is in canonical order: its first 64 units are the extracted model's.
    from safetensors.torch import load_file

    from pretrain.export import export_safetensors

    exported = load_file(export_safetensors(checkpoint, tmp_path / "model.safetensors"))
    for key in ("layers.0.ffn.w1.weight", "layers.1.ffn.w3.weight"):
        assert torch.equal(exported[key][:64], dense.state_dict()[key])
    assert torch.equal(exported["layers.1.ffn.w2.weight"][:, :64], dense.state_dict()["layers.1.ffn.w2.weight"])
