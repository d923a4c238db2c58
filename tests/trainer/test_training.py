"""End-to-end trainer behaviour on a real corpus (the built-in King James Bible shards), through
the real command line in subprocesses: loss falls, DDP on 2 ranks equals one process, resume
after SIGKILL is bit-exact, SIGUSR1 checkpoints and exits 75, and bad input fails clearly."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.distributed import DistInfo
from pretrain.signals import EXIT_CHECKPOINTED_FOR_REQUEUE
from pretrain.train import Trainer, TrainingError

SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2", "model.ffn.d_ff=128",
    "model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0",
    "train.global_batch=8", "train.micro_batch=4", "train.eval_interval=4", "train.eval_batches=2",
    "schedule.warmup_steps=2", "logging.interval=1", "optim.lr=1e-2",
]


def env_for(cache: Path) -> dict:
    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", "train", *SMALL, f"run.dir={run_dir}", *overrides]


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """Step → loss (or valid_loss) from metrics.jsonl; a resumed run's later lines replace
    earlier ones."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


@pytest.fixture(scope="module")
def reference_run(cache, tmp_path_factory) -> Path:
    """12 uninterrupted steps, checkpoint every 3."""
    run_dir = tmp_path_factory.mktemp("reference")
    subprocess.run(
        train_command(run_dir, "train.max_steps=12", "checkpoint.interval=3"),
        env=env_for(cache), check=True, capture_output=True, text=True,
    )
    return run_dir


def test_loss_falls_and_outputs_exist(reference_run):
    seen = losses(reference_run)
    assert sorted(seen) == list(range(1, 13))
    assert seen[12] < seen[1] - 1.0, seen
    valid = losses(reference_run, "valid_loss")
    assert sorted(valid) == [4, 8, 12] and valid[12] < valid[4], valid
    assert (reference_run / "config.yaml").is_file() and (reference_run / "tokenizer.model").is_file()
    assert (reference_run / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    record = [r for r in records if "loss" in r][-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops", "peak_mem_gib", "data_wait_s"):
        assert record[key] is not None and record[key] >= 0, key
    assert record["mfu"] is None  # CPU: TFLOP/s only


def test_the_run_writes_a_report_whose_numbers_are_its_metrics(reference_run, tmp_path, capsys):
    """The report written at the end of the run, and `pretrain report` over two runs, against
    metrics.jsonl read here."""
    from pretrain.cli import main

    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    report = reference_run / "report"
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "data_wait_s", "ce_loss"):
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    row = (report / "summary.md").read_text().splitlines()[-1].split(" | ")
    mean_tokens = sum(r["tokens_per_s"] for r in train) / len(train)
    wall = max(r["time"] for r in records) - min(r["time"] for r in records)
    assert row[1:5] == ["12", f"{train[-1]['loss']:.4f}", f"{valid[-1]['valid_loss']:.4f}", f"{mean_tokens:,.0f}"]
    assert row[5] == "—" and float(row[6]) == pytest.approx(wall, abs=0.051)
    assert row[7].rstrip(" |").split(", ") == sorted(
        p.name for p in (reference_run / "checkpoints").iterdir() if p.name.startswith("step_")
    )

    other = tmp_path / "other"
    other.mkdir()
    # A second run as a GPU run would log it (MFU is logged only where the device's peak is known).
    mfu = [0.2 + 0.01 * i for i in range(len(train))]
    (other / "metrics.jsonl").write_text(
        "\n".join(json.dumps({**r, "loss": 1.0, "mfu": m}) for r, m in zip(train, mfu)) + "\n"
    )
    assert main(["report", str(reference_run), str(other), "--output", str(tmp_path / "both")]) == 0
    rows = (tmp_path / "both" / "summary.md").read_text().splitlines()[4:]
    assert [r.split(" | ")[2] for r in rows] == [f"{train[-1]['loss']:.4f}", "1.0000"]
    assert [r.split(" | ")[5] for r in rows] == ["—", f"{sum(mfu) / len(mfu):.2%}"]
    assert (tmp_path / "both" / "mfu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigkill_then_resume_is_bit_exact(cache, reference_run, tmp_path):
    seed = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    kill_after = random.Random(seed).randint(4, 10)
    print(f"kill point seed: KILL_SEED={seed} (kill after step {kill_after})")
    env = env_for(cache)
    command = train_command(tmp_path, "train.max_steps=12", "checkpoint.interval=3")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path, kill_after, proc)
    proc.kill()
    proc.wait()
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    assert losses(tmp_path) == losses(reference_run), f"killed after step {kill_after} (KILL_SEED={seed})"
    assert losses(tmp_path, "valid_loss") == losses(reference_run, "valid_loss")


def test_sigusr1_checkpoints_and_exits_for_requeue(cache, reference_run, tmp_path):
    env = env_for(cache)
    command = train_command(tmp_path, "train.max_steps=12", "checkpoint.interval=0")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CHECKPOINTED_FOR_REQUEUE, output
    saved = (tmp_path / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(saved.split("_")[1])
    assert stopped_at == max(losses(tmp_path)) and stopped_at < 12
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert losses(tmp_path) == losses(reference_run)


def test_sigterm_to_the_process_group_with_loader_workers(cache, tmp_path):
    """Schedulers signal every process of a job, DataLoader workers included: the run must still
    checkpoint and exit 75 rather than crash on a dead worker."""
    env = env_for(cache)
    command = train_command(tmp_path, "train.max_steps=40", "checkpoint.interval=0", "data.num_workers=2")
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    wait_for_step(tmp_path, 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CHECKPOINTED_FOR_REQUEUE, output
    assert "Traceback" not in output
    assert (tmp_path / "checkpoints" / "latest").is_file()


def test_ddp_two_ranks_equals_one_process(cache, reference_run, tmp_path):
    """Same global batch (8): 2 ranks x micro 4 x 1 accumulation vs 1 rank x micro 4 x 2."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "pretrain", "train", *SMALL, f"run.dir={tmp_path}", "train.max_steps=12", "checkpoint.interval=0",
    ]
    env = env_for(cache)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = losses(tmp_path)
    single = losses(reference_run)
    assert sorted(ddp) == list(range(1, 13))
    for step in ddp:
        assert ddp[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step


def small_trainer(cache: Path, run_dir: Path, *overrides: str) -> Trainer:
    os.environ["PRETRAIN_CACHE"] = str(cache)
    config = load_config("tiny", [*SMALL, f"run.dir={run_dir}", *overrides])
    return Trainer(config, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def test_non_finite_steps_are_skipped_then_stop(cache, tmp_path):
    trainer = small_trainer(cache, tmp_path, "train.max_steps=10", "train.max_bad_steps=3")
    trainer.log = type("Quiet", (), {"message": lambda self, text: None})()
    trainer.train_iter = iter(trainer.train_loader)
    assert not trainer.train_step().skipped  # a finite step first, so the optimizer has state
    with torch.no_grad():
        trainer.model.norm.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    assert moments
    for attempt in range(2):
        result = trainer.train_step()
        assert result.skipped
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
    for p, state in trainer.optimizer.state.items():  # a skipped step leaves Adam's moments alone
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in state.items())
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
        trainer.train_step()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.global_batch=6"], "train.global_batch (6) must be a multiple of train.micro_batch (4)"),
        (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        (["data.seq_len=128"], "data.seq_len (128) exceeds model.max_seq_len (64)"),
        (["data.paths=[/no/such/shards]"], "data path /no/such/shards does not exist"),
        (["model.vocab_size=1000"], "model.vocab_size is 1000; set model.vocab_size >= 4096"),
        (["model.mixer.n_heads=3"], "model.mixer.n_heads"),
        (["model.n_heads=4"], "'model.n_heads' has moved: it is now 'model.mixer.n_heads'"),
        (["train.max_steps=100000"], "Set data.allow_repeat=true"),
        (["model.kernels.attention=xformers"], "model.kernels.attention 'xformers' is unknown"),
    ],
)
def test_bad_configs_fail_with_one_clear_line(cache, tmp_path, monkeypatch, capsys, overrides, message):
    from pretrain.cli import main

    monkeypatch.setenv("PRETRAIN_CACHE", str(cache))
    code = main(["train", *SMALL, f"run.dir={tmp_path}", "train.max_steps=4", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert message in err, err


def test_the_banner_states_the_run(cache, tmp_path):
    """Every number in the banner against its source: the built model, the shard manifest, the
    batch arithmetic."""
    from pretrain.banner import run_banner

    trainer = small_trainer(cache, tmp_path, "train.max_steps=10")
    lines = run_banner(trainer.config, trainer.dims, trainer.data.paths, None, 0, "tiny")
    text = "\n".join(lines)
    total = sum(p.numel() for p in trainer.model.parameters())
    embedding = trainer.model.embed.weight.numel()
    assert f"decoder (preset tiny), 2 blocks: {total / 1e6:,.2f}M parameters ({total / 1e6:,.2f}M active" in text, text
    assert f"{embedding / 1e6:,.2f}M embedding" in text, text
    assert lines[1].startswith("layout  1 rank(s): "), lines
    assert f"run     {tmp_path}" in lines, lines
    assert "8 sequences x 64 tokens = 512 tokens per step (micro-batch 4 per rank, 2 accumulation" in text, text
    assert "10 steps = 5,120 tokens" in text, text
    (shards,) = trainer.data.paths
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    assert f"data    {shards} ({manifest['tokens']:,} tokens)" in lines, lines
    assert lines[-1] == "resume  none: from step 0"
    assert not [line for line in lines if line.startswith("kernels")], lines
    kernels = dataclasses.replace(trainer.config.model.kernels, attention="math")
    switched = dataclasses.replace(trainer.config, model=dataclasses.replace(trainer.config.model, kernels=kernels))
    lines = run_banner(switched, trainer.dims, trainer.data.paths, None, 0)
    assert "kernels attention=math in every attention layer (overrides model.mixer.backend=sdpa)" in lines, lines


def test_the_banner_counts_active_parameters_of_an_moe_model(cache, tmp_path):
    """moe-tiny routes each token to top_k of n_experts experts: active = every parameter
    outside the routed experts + top_k / n_experts of the experts' (counted on the built model)."""
    from pretrain.banner import run_banner

    os.environ["PRETRAIN_CACHE"] = str(cache)
    config = load_config("moe-tiny", [*SMALL, f"run.dir={tmp_path}", "train.max_steps=10"])
    trainer = Trainer(config, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    ffn = config.model.ffn
    experts = sum(p.numel() for name, p in trainer.model.named_parameters() if ".experts." in name)
    total = sum(p.numel() for p in trainer.model.parameters())
    assert 0 < experts < total
    active = total - experts + experts * ffn.top_k // ffn.n_experts
    model_line = run_banner(config, trainer.dims, trainer.data.paths, None, 0, "moe-tiny")[0]
    assert f"(preset moe-tiny), 2 blocks: {total / 1e6:,.2f}M parameters ({active / 1e6:,.2f}M active" in model_line


def test_preparing_the_built_in_corpus_says_what_and_how_long(builtin_preparation):
    """On first use each stage is announced and the total time reported; a prepared cache is
    reused silently."""
    from pretrain.builtin_data import prepare_builtin_corpus

    root, messages = builtin_preparation
    assert [m.split(" ")[0] for m in messages] == ["preparing", "training", "tokenizing", "built-in"], messages
    assert "King James Bible" in messages[0] and "4096-piece BPE tokenizer" in messages[1]
    seconds = messages[-1].removeprefix("built-in corpus ready in ").split(" s ")[0]
    assert float(seconds) > 0 and str(root) in messages[-1], messages[-1]
    again: list[str] = []
    prepare_builtin_corpus(root, log=again.append)
    assert again == []


def test_diverging_run_stops_with_one_error_line_and_status_3(cache, tmp_path, monkeypatch, capsys):
    """A learning rate of 1e30 makes every loss after the first update NaN."""
    from pretrain.cli import main

    monkeypatch.setenv("PRETRAIN_CACHE", str(cache))
    code = main(["train", *SMALL, f"run.dir={tmp_path}", "train.max_steps=20", "train.eval_interval=0",
                 "optim.lr=1e30", "schedule.warmup_steps=1", "train.max_bad_steps=2"])
    out, err = capsys.readouterr()
    assert "model   decoder (preset tiny), 2 blocks" in out, out  # the banner names the default preset
    assert code == 3, err
    assert err.startswith("error: 2 consecutive steps had a non-finite loss") and "Traceback" not in err
    assert err.count("\n") == 1, err


def test_a_damaged_latest_checkpoint_through_the_command_line(cache, reference_run, tmp_path, monkeypatch, capsys):
    """Bytes flipped in a shard of the latest checkpoint (step 12) of a copy of the reference run:
    naming it is one error line (status 2); checkpoint.resume=auto warns, naming the damage, and
    falls back to step 9, whose continuation repeats the reference's steps 10-12 bit for bit."""
    import logging
    import shutil

    from pretrain.cli import main

    monkeypatch.setenv("PRETRAIN_CACHE", str(cache))
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    latest = run_dir / "checkpoints" / "step_00000012"
    shard = sorted(latest.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (run_dir / "metrics.jsonl").write_text("")
    command = ["train", *SMALL, f"run.dir={run_dir}", "train.max_steps=12", "checkpoint.interval=3"]

    assert main([*command, f"checkpoint.resume={latest}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint.resume={latest} is damaged: ") and err.count("\n") == 1, err
    assert "SHA-256" in err and shard.name in err, err

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("pretrain.checkpoint").addHandler(handler)
    try:
        assert main(command) == 0
    finally:
        logging.getLogger("pretrain.checkpoint").removeHandler(handler)
    assert any("step_00000012" in w and shard.name in w for w in warnings), warnings
    assert "checkpoints/step_00000009 at step 9" in capsys.readouterr().out
    assert losses(run_dir) == {step: losses(reference_run)[step] for step in (10, 11, 12)}


def test_generate_and_export_from_the_trained_run(reference_run, tmp_path):
    """`pretrain generate` continues the prompt greedily and deterministically with the tokenizer
    saved in the run; `pretrain export` writes weights equal to the checkpoint's model."""
    from safetensors.torch import load_file

    from pretrain.export import load_model_weights

    command = [sys.executable, "-m", "pretrain", "generate", "--checkpoint", str(reference_run / "checkpoints"),
               "--prompt", "And God said", "--max-new-tokens", "12"]
    first = subprocess.run(command, capture_output=True, text=True)
    second = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("And God said") and len(first.stdout) > len("And God said\n")
    assert first.stdout == second.stdout
    output = tmp_path / "model.safetensors"
    exported = subprocess.run(
        [sys.executable, "-m", "pretrain", "export", "--checkpoint", str(reference_run / "checkpoints"),
         "--output", str(output)], capture_output=True, text=True,
    )
    assert exported.returncode == 0, exported.stderr
    weights = load_file(output)
    expected = load_model_weights(reference_run / "checkpoints" / "step_00000012")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)


def test_wandb_offline_run_records_metrics(cache, tmp_path):
    env = dict(env_for(cache), WANDB_MODE="offline", WANDB_SILENT="true")
    result = subprocess.run(
        train_command(tmp_path, "train.max_steps=4", "checkpoint.interval=0", "logging.wandb=true"),
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb")), "no wandb data file written"
