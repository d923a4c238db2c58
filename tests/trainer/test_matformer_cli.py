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

from models.counting import param_counts
from models.ffn.matformer import set_granularity
from models.ffn.matformer.extract import extract_config
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
    model, _ = load_checkpoint_model(trained / "checkpoints")
    for r in rows:
        assert r["widths"] == sorted(r["widths"]), "default choices never shrink with depth"
        assert r["params"] == full["params"] - sum(3 * 128 * (1024 - m) for m in r["widths"])
        standalone = param_counts(extract_config(model.config, r["widths"]))  # the extracted model's tensors
        assert (r["params"], r["non_embedding"]) == (standalone.total, standalone.non_embedding)
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


def train_sampled(rank: int, world: int, cache: str, run_dir: str, overrides: list[str], mode: str = "sampled") -> dict:
    os.environ["PRETRAIN_CACHE"] = cache
    small = ["model.d_model=64", "model.n_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2",
             "model.ffn.d_ff=256", "model.ffn.granularities=[64,128,256]", f"model.ffn.train_mode={mode}",
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
    extract_main(checkpoint, tmp_path / "mix", per_layer=[128, 64])  # Mix'n'Match, also exact
    mixed, _ = load_checkpoint_model(tmp_path / "mix" / "checkpoints")
    assert [f.d_ff for f in mixed.config.layers().ffns] == [128, 64]
    set_granularity(model, [128, 64])
    assert torch.equal(logits_at(mixed, tokens), logits_at(model, tokens))
    set_granularity(model, 64)
    # The safetensors export is in canonical order: its first 64 units are the extracted model's.
    from safetensors.torch import load_file

    from pretrain.export import export_safetensors

    exported = load_file(export_safetensors(checkpoint, tmp_path / "model.safetensors"))
    for key in ("layers.0.ffn.w1.weight", "layers.1.ffn.w3.weight"):
        assert torch.equal(exported[key][:64], dense.state_dict()[key])
    assert torch.equal(exported["layers.1.ffn.w2.weight"][:, :64], dense.state_dict()["layers.1.ffn.w2.weight"])


@pytest.mark.parametrize("mode", ["joint", "sampled"])
def test_step_flops_count_every_widths_work(cache, tmp_path, mode):
    """The FLOPs a trainer step reports (tflops, MFU) are Σ over the step's widths of the
    training FLOPs of a plain ``swiglu`` decoder of that width: four widths in a joint step,
    the drawn one in a sampled step."""
    import dataclasses

    from models.counting import training_flops_per_token
    from models.ffn.swiglu import SwiGLUConfig

    os.environ["PRETRAIN_CACHE"] = str(cache)
    config = load_config("matformer-tiny", [
        "model.d_model=64", "model.n_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2",
        "model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0", "train.global_batch=4",
        "train.micro_batch=4", "train.max_steps=3", "schedule.warmup_steps=1", f"model.ffn.train_mode={mode}",
        f"run.dir={tmp_path}",
    ])
    trainer = Trainer(config, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    trainer.train_iter = iter(trainer.train_loader)
    widths_of = (128, 256, 512, 1024)
    dense = {m: training_flops_per_token(dataclasses.replace(config.model, ffn=SwiGLUConfig(d_ff=m)), 64)
             for m in widths_of}
    for _ in range(3):
        result = trainer.train_step()
        widths = sorted(int(k[len("loss/m"):]) for k in trainer.loss_terms if k.startswith("loss/m"))
        assert widths == (list(widths_of) if mode == "joint" else widths[:1]) and widths
        assert result.flops == result.tokens * sum(dense[m] for m in widths)


def test_joint_training_resumes_across_layouts(cache, tmp_path):
    """Joint training (every width each step) under FSDP2 equals one process; FSDP2's step-4
    checkpoint resumed under PP2 continues like the uninterrupted one-process run, every
    width's logged loss included."""
    one, fsdp2, resumed = tmp_path / "one", tmp_path / "fsdp2", tmp_path / "resumed"
    assert run_ranks(1, train_sampled, str(cache), str(one), [], "joint")[0]["code"] == 0
    assert all(r["code"] == 0 for r in run_ranks(2, train_sampled, str(cache), str(fsdp2), [], "joint"))
    checkpoint = fsdp2 / "checkpoints" / "step_00000004"
    assert all(r["code"] == 0 for r in run_ranks(
        2, train_sampled, str(cache), str(resumed), ["parallel.pp=2", f"checkpoint.resume={checkpoint}"], "joint"
    ))
    a, b, c = step_losses(one), step_losses(fsdp2), step_losses(resumed)
    widths = ["loss/m128", "loss/m256", "loss/m64"]
    assert sorted(a) == sorted(b) == list(range(1, 9)) and sorted(c) == [5, 6, 7, 8]
    for step, (loss, names) in a.items():
        assert names == widths and b[step][1] == widths and b[step][0] == pytest.approx(loss, abs=1e-5), step
        if step in c:
            assert c[step][1] == widths and c[step][0] == pytest.approx(loss, abs=1e-5), step
    per_width = [r for r in records(resumed) if r.get("step") == 8][0]
    expected = [r for r in records(one) if r.get("step") == 8][0]
    for name in widths:
        assert per_width[name] == pytest.approx(expected[name], abs=1e-5), name


def test_sweep_of_a_yoco_matformer_evaluates_its_mixes(cache, tmp_path):
    """YOCO extracts one width for all layers only; ``sweep`` still evaluates its monotone mixes
    in place: each row's parameters follow the formula, and the uniform rows' losses are the
    run's own validation of those widths."""
    from pretrain.matformer import sweep_main

    run_dir = tmp_path / "yoco"
    pretrain(cache, "train", "--config", "yoco-tiny", "model.d_model=64", "model.n_layers=4", "model.self_layers=2",
             "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2", "model.cross.n_heads=4", "model.cross.n_kv_heads=2",
             "model.ffn.kind=matformer", "model.ffn.d_ff=256", "model.ffn.granularities=[64,128,256]",
             "model.mixer.window=16", "model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0",
             "train.global_batch=4", "train.micro_batch=4", "train.max_steps=4", "train.eval_interval=4",
             "train.eval_batches=2", "schedule.warmup_steps=1", "checkpoint.interval=4", f"run.dir={run_dir}")
    rows = sweep_main(run_dir / "checkpoints", tmp_path / "sweep")
    assert any(len(set(r["widths"])) > 1 for r in rows)
    full = next(r for r in rows if r["widths"] == [256] * 4)
    for r in rows:
        assert r["params"] == full["params"] - sum(3 * 64 * (256 - m) for m in r["widths"])
    last = [r for r in records(run_dir) if "valid_loss" in r][-1]
    for m in (64, 128, 256):
        row = next(r for r in rows if r["widths"] == [m] * 4)
        assert row["valid_loss"] == pytest.approx(last[f"valid_loss/m{m}"], abs=1e-5)
