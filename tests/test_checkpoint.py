"""Checkpoints: round trips, atomicity under a real SIGKILL, keep-last-K, the ``latest``
pointer, layout changes (FSDP2 / TP / DDP on two gloo ranks, pipeline parts) and export."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from pretrain.checkpoint import (
    LATEST,
    MARKER,
    TMP_TAG,
    CheckpointError,
    CheckpointManager,
    read_marker,
    seed_rng,
)
from pretrain.distributed import shutdown
from pretrain.export import export_main, export_safetensors
from pretrain.names import clean_key
from tests.parallel.launch import free_port

VOCAB, DIM = 32, 16
FULL = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({"0": Block(), "1": Block()})
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.layers.values():
            x = block(x)
        return self.head(self.norm(x)) * self.scale


def optimize(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))


def make(seed=0):
    torch.manual_seed(seed)
    model = Net()
    return model, *optimize(model)


def train(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (4, 9), generator=g)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def same_draws(a, b):
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def full_state(model, opt):
    """Unsharded model and flattened optimizer state (on every rank), keyed by canonical FQNs."""
    model_sd, optim_sd = get_state_dict(model, opt, options=FULL)
    assert model_sd and optim_sd
    return model_sd, optim_sd


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items()
    )


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ---------------------------------------------------------------- single process


def test_round_trip_restores_model_optimizer_scheduler_extra_and_rng(tmp_path):
    model, opt, sched = make(0)
    train(model, opt, sched, 3, seed=1)
    extra = {
        "scheduler": sched.state_dict(),
        "loader": {"fingerprint": "abc123", "consumed_samples": 12},
        "step": 3,
        "config": {"model": {"dim": DIM}, "optim": {"lr": 1e-2}},
    }
    mgr = CheckpointManager(tmp_path, keep_last=3)
    seed_rng(5)
    path = mgr.save(3, model, opt, extra)
    after_save = draws()

    model2, opt2, sched2 = make(1)
    assert CheckpointManager(tmp_path / "empty").resume(model2, opt2) is None
    seed_rng(99)
    loaded = CheckpointManager(tmp_path).resume(model2, opt2)
    assert same_draws(draws(), after_save)
    sched2.load_state_dict(loaded["scheduler"])
    assert loaded == extra | {"scheduler": loaded["scheduler"]}
    assert loaded["scheduler"]["last_epoch"] == 3 and sched2.get_last_lr() == sched.get_last_lr()
    assert_same(model2.state_dict(), model.state_dict())
    for p, p2 in zip(opt.state.values(), opt2.state.values(), strict=True):
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(p[name], p2[name]), name
    assert json.loads((path / "config.json").read_text()) == extra["config"]
    assert read_marker(path)["step"] == 3 and read_marker(path)["world_size"] == 1

    train(model, opt, sched, 2, seed=2)
    train(model2, opt2, sched2, 2, seed=2)
    assert_same(model2.state_dict(), model.state_dict())


def test_keep_last_and_latest_pointer(tmp_path):
    model, opt, _ = make()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        mgr.save(step, model, opt, {"step": step})
    assert names(tmp_path) == ["latest", "step_00000004", "step_00000005"]
    assert (tmp_path / LATEST).read_text().strip() == "step_00000005"
    # A rollback save at an older step becomes latest and is never pruned.
    mgr.save(3, model, opt, {"step": 3})
    assert mgr.latest() == tmp_path / "step_00000003"
    assert [p.name for p in mgr.checkpoints()] == [
        "step_00000003",
        "step_00000004",
        "step_00000005",
    ]
    assert mgr.load(mgr.latest(), model, opt) == {"step": 3}


def test_latest_falls_back_when_pointer_is_stale_or_corrupt(tmp_path):
    model, opt, _ = make()
    mgr = CheckpointManager(tmp_path)
    assert mgr.latest() is None
    mgr.save(1, model, opt, {"step": 1})
    mgr.save(2, model, opt, {"step": 2})
    shutil.rmtree(tmp_path / "step_00000002")
    assert mgr.latest() == tmp_path / "step_00000001"
    mgr.save(2, model, opt, {"step": 2})
    (tmp_path / "step_00000002" / MARKER).unlink()
    assert mgr.latest() == tmp_path / "step_00000001"
    with pytest.raises(CheckpointError):
        mgr.load(tmp_path / "step_00000002", model, opt)
    (tmp_path / LATEST).write_text("../../etc\n")
    assert mgr.latest() == tmp_path / "step_00000001"


def _shard(directory: Path) -> Path:
    return sorted(directory.glob("*.distcp"))[0]


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "deleted shard": (lambda d: _shard(d).unlink(), "is missing"),
    "truncated shard": (lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:100]), "bytes but"),
    "empty metadata": (lambda d: (d / ".metadata").write_bytes(b""), ".metadata has 0 bytes"),
    "truncated metadata": (lambda d: (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:10]), ".metadata has 10"),
    "flipped bytes": (lambda d: _flip_middle_byte(_shard(d)), "does not match the SHA-256"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_found_before_loading(tmp_path, caplog, kind):
    """auto falls back to the newest intact checkpoint with a warning naming the damage; a named
    damaged checkpoint is one clear error; when none is intact, an error (never a fresh start)."""
    damage_fn, words = DAMAGE[kind]
    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, model, opt, {"step": 1})
    train(model, opt, sched, 2, seed=3)
    mgr.save(2, model, opt, {"step": 2})
    damage_fn(tmp_path / "step_00000002")

    with caplog.at_level("WARNING", logger="pretrain.checkpoint"):
        chosen = mgr.choose("auto")
    assert chosen == tmp_path / "step_00000001"
    assert "step_00000002" in caplog.text and words in caplog.text, caplog.text
    fresh, fresh_opt, _ = make(seed=5)
    assert mgr.load(chosen, fresh, fresh_opt) == {"step": 1}
    with pytest.raises(CheckpointError, match=f"is damaged: .*{words}"):
        mgr.choose(str(tmp_path / "step_00000002"))
    _flip_middle_byte(_shard(tmp_path / "step_00000001"))
    with pytest.raises(CheckpointError, match="every checkpoint under .* is damaged"):
        mgr.choose("auto")


def test_extra_state_that_cannot_be_loaded_back_is_refused_at_save(tmp_path):
    model, opt, _ = make()
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="numpy"):
        mgr.save(1, model, opt, {"loader": {"consumed_samples": np.int64(3)}})
    assert mgr.latest() is None and list(tmp_path.iterdir()) == []


def test_leftover_tmp_dirs_are_ignored_then_cleaned(tmp_path):
    model, opt, _ = make()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, model, opt, {"step": 1})
    shutil.copytree(tmp_path / "step_00000001", tmp_path / f"step_00000002{TMP_TAG}dead")
    (tmp_path / f"{LATEST}{TMP_TAG}dead").write_text("step_00000002")
    assert mgr.latest() == tmp_path / "step_00000001"
    assert mgr.checkpoints() == [tmp_path / "step_00000001"]
    mgr.save(3, model, opt, {"step": 3})
    assert names(tmp_path) == ["latest", "step_00000001", "step_00000003"]


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(5, model, opt, {"v": 1})
    train(model, opt, sched, 1, seed=3)
    mgr.save(5, model, opt, {"v": 2})
    assert names(tmp_path) == ["latest", "step_00000005"]
    model2, opt2, _ = make(1)
    assert mgr.load(mgr.latest(), model2, opt2) == {"v": 2}
    assert_same(model2.state_dict(), model.state_dict())


def test_pipeline_parts_load_into_one_model_and_back(tmp_path):
    """Two stages with their own optimizers (a pipeline layout) ⇄ one model, one optimizer."""
    full, _, _ = make(0)
    stage0, stage1 = copy.deepcopy(full), copy.deepcopy(full)
    del stage0.layers["1"]
    stage0.norm = stage0.head = None
    stage1.embed = None
    del stage1.layers["0"]
    opts = [torch.optim.AdamW(s.parameters(), lr=1e-2) for s in (stage0, stage1)]
    torch.manual_seed(3)
    for stage, opt in zip((stage0, stage1), opts, strict=True):
        for p in stage.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    mgr = CheckpointManager(tmp_path / "pp")
    mgr.save(1, [stage0, stage1], opts)
    want_model = stage0.state_dict() | stage1.state_dict()
    want_opt = {}
    for stage, opt in zip((stage0, stage1), opts, strict=True):
        want_opt.update(full_state(stage, opt)[1])

    model, opt, _ = make(1)  # its scheduler adds ``initial_lr``, which the stages never had
    mgr.load(mgr.latest(), model, opt)
    got_model, got_opt = full_state(model, opt)
    assert_same(got_model, want_model)
    added = {k: got_opt.pop(k) for k in list(got_opt) if k.endswith(".initial_lr")}
    assert len(added) == len(want_model) - 1 and set(added.values()) == {1e-2}
    assert_same(got_opt, want_opt)

    back = CheckpointManager(tmp_path / "single")
    back.save(1, model, opt)
    parts = copy.deepcopy(stage0), copy.deepcopy(stage1)
    for p in list(parts[0].parameters()) + list(parts[1].parameters()):
        p.data.zero_()
    back.load(back.latest(), list(parts), None)
    assert_same(parts[0].state_dict() | parts[1].state_dict(), want_model)


def test_model_only_and_non_strict_loads(tmp_path):
    model, opt, sched = make(0)
    train(model, opt, sched, 1, seed=1)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, model, None, {"step": 1})
    model2, opt2, _ = make(1)
    with pytest.raises(Exception, match="optimizer"):
        mgr.load(mgr.latest(), model2, opt2)
    assert mgr.load(mgr.latest(), model2) == {"step": 1}
    assert_same(model2.state_dict(), model.state_dict())

    class NetPlus(Net):
        def __init__(self):
            super().__init__()
            self.adapter = nn.Linear(DIM, DIM)

    bigger = NetPlus()
    adapter = copy.deepcopy(bigger.adapter.state_dict())
    with pytest.raises(Exception, match="adapter"):
        mgr.load(mgr.latest(), bigger)
    mgr.load(mgr.latest(), bigger, strict=False)
    assert_same(
        bigger.state_dict(), model.state_dict() | {f"adapter.{k}": v for k, v in adapter.items()}
    )


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_export_safetensors_strips_wrappers_and_equals_state_dict(tmp_path):
    model, opt, sched = make(0)
    train(model, opt, sched, 2, seed=1)

    class Wrapper(nn.Module):  # saved keys become "module.<name>", as under DDP without DCP
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert clean_key("module._orig_mod.layers.0._checkpoint_wrapped_module.fc1.weight") == (
        "layers.0.fc1.weight"
    )
    config = {"model": {"dim": DIM}}
    for root, wrapped in (("compiled", torch.compile(model)), ("wrapped", Wrapper(model))):
        CheckpointManager(tmp_path / root).save(2, wrapped, opt, {"config": config})
        out = export_safetensors(
            tmp_path / root / "step_00000002", tmp_path / f"{root}.safetensors"
        )
        assert_same(load_file(out), model.state_dict())
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["step"] == "2"
    assert json.loads((tmp_path / "wrapped.config.json").read_text()) == config

    assert export_main(tmp_path / "compiled", tmp_path / "bf16" / "m.safetensors", "bf16") == 0
    half = load_file(tmp_path / "bf16" / "m.safetensors")
    assert all(half[k].dtype == torch.bfloat16 for k in half)
    assert torch.equal(half["head.weight"], model.head.weight.detach().to(torch.bfloat16))
    assert not [p for p in (tmp_path / "bf16").iterdir() if TMP_TAG in p.name]
    with pytest.raises(CheckpointError):
        export_main(tmp_path / "nothing-here", tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError):
        export_main(tmp_path / "compiled", tmp_path / "x.safetensors", "int3")


# ---------------------------------------------------------------- SIGKILL during a save

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch.distributed.checkpoint import FileSystemWriter
    from pretrain.checkpoint import CheckpointManager

    root, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(root, keep_last=2)
    state = {"step": 0}

    def stall(where):
        print(where, flush=True)
        time.sleep(600)

    write_data, rename = FileSystemWriter.write_data, os.rename

    def slow_write(self, plan, planner):
        result = write_data(self, plan, planner)
        if mode == "after_data" and state["step"] == 2:
            stall("STALL")
        return result

    def slow_rename(src, dst):
        if mode == "before_rename" and os.path.basename(dst) == "step_00000002":
            stall("STALL")
        return rename(src, dst)

    FileSystemWriter.write_data, os.rename = slow_write, slow_rename
    for step in range(1, 10_000):
        state["step"] = step
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
            opt.param_groups[0]["lr"] = step * 1e-3
        mgr.save(step, model, opt, {"step": step})
        print(f"SAVED {step}", flush=True)
    """
)


def _kill_mid_save(proc: subprocess.Popen, mode: str, rng: random.Random) -> list[int]:
    """SIGKILL the child at its stall point (or at a moment of its save loop drawn from ``rng``)
    and return the steps it reported as saved."""
    saved = []
    for line in proc.stdout:
        if line.startswith("SAVED"):
            saved.append(int(line.split()[1]))
        if mode == "random" and saved:
            time.sleep(rng.uniform(0.0, 0.4))
            break
        if line.strip() == "STALL":
            break
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, mode
    # Read the rest through the same buffered file: lines the loop above already pulled into its
    # buffer are not in the pipe any more (communicate() would read the pipe and miss them).
    rest = proc.stdout.read()
    return saved + [int(line.split()[1]) for line in rest.splitlines() if line.startswith("SAVED")]


def test_sigkill_mid_save_leaves_a_complete_checkpoint_to_resume_from(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    modes = ["after_data", "before_rename", "random", "random"]
    roots = [tmp_path / f"ckpt{i}" for i in range(len(modes))]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(root), mode], stdout=subprocess.PIPE, text=True
        )
        for root, mode in zip(roots, modes, strict=True)
    ]
    seed = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"kill point seed: KILL_SEED={seed}")
    rng = random.Random(seed)
    try:
        reported = [_kill_mid_save(proc, mode, rng) for proc, mode in zip(procs, modes, strict=True)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for root, mode, saved in zip(roots, modes, reported, strict=True):
        assert saved, f"{mode}: the child never finished its first checkpoint"
        mgr = CheckpointManager(root, keep_last=2)
        latest = mgr.latest()
        step = read_marker(latest)["step"]
        if mode == "random":  # killed before or after the rename of the save in flight
            assert saved[-1] <= step <= saved[-1] + 1, (saved, step, f"KILL_SEED={seed}")
        else:
            assert step == 1 and saved == [1], (mode, saved, step)
            assert [p for p in root.iterdir() if p.name.startswith("step_00000002" + TMP_TAG)]
        model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
        opt = torch.optim.AdamW(model.parameters(), lr=1.0)
        assert mgr.load(latest, model, opt) == {"step": step}
        assert all(torch.all(p == step) for p in model.parameters())
        assert opt.param_groups[0]["lr"] == pytest.approx(step * 1e-3)

        mgr.save(step + 1, model, opt, {"step": step + 1})
        assert not [p for p in root.iterdir() if TMP_TAG in p.name]
        assert mgr.latest().name == f"step_{step + 1:08d}"


# ---------------------------------------------------------------- two gloo ranks


def _tp_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        f"layers.{i}.{name}": style()
        for i in ("0", "1")
        for name, style in (("fc1", ColwiseParallel), ("fc2", RowwiseParallel))
    }


def _dist_worker(rank: int, world: int, port: int, tmp: str, single_draws):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    tmp = Path(tmp)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        out = {}

        def fsdp(model):
            for block in model.layers.values():
                fully_shard(block, mesh=mesh)
            return fully_shard(model, mesh=mesh)

        layouts = {
            "fsdp": (fsdp, 10 + rank),
            "tp": (lambda m: parallelize_module(m, mesh, _tp_plan()), 10),
            "ddp": (lambda m: DistributedDataParallel(m), 10 + rank),
        }
        for name, (wrap, data_seed) in layouts.items():
            model = wrap(make(0)[0])
            opt, sched = optimize(model)
            train(model, opt, sched, 2, seed=data_seed)
            mgr = CheckpointManager(tmp / name, keep_last=1, seed=7)
            seed_rng(100 + rank)
            mgr.save(2, model, opt, {"scheduler": sched.state_dict(), "layout": name})
            after_save = draws()
            want = full_state(model, opt)
            if rank == 0:
                torch.save(want, tmp / f"{name}_ref.pt")

            fresh = wrap(make(1)[0])
            fresh_opt, _ = optimize(fresh)
            seed_rng(999)
            extra = mgr.resume(fresh, fresh_opt)
            got = full_state(fresh, fresh_opt)
            out[f"{name}_same_layout"] = same_state(got[0], want[0]) and same_state(got[1], want[1])
            out[f"{name}_rng"] = same_draws(draws(), after_save) and mgr.rng_restored
            out[f"{name}_extra"] = extra["layout"] == name and extra["scheduler"]["last_epoch"] == 2

        # Layout change 1 -> 2 ranks: a checkpoint written by a single process, loaded by FSDP2.
        model = fsdp(make(1)[0])
        opt, _ = optimize(model)
        mgr = CheckpointManager(tmp / "single", seed=7)
        extra = mgr.load(mgr.latest(), model, opt)
        got = full_state(model, opt)
        want = torch.load(tmp / "single_ref.pt", weights_only=True)
        out["single_to_fsdp"] = same_state(got[0], want[0]) and same_state(got[1], want[1])
        out["single_rng_flag"] = mgr.rng_restored == (rank == 0)
        if rank == 0:
            out["single_rng"] = same_draws(draws(), single_draws)
        else:
            after = draws()
            seed_rng(7 + rank)
            out["single_rng"] = same_draws(after, draws())
        try:  # rank 0 refuses the extra state: every rank must raise rather than hang
            mgr.save(3, model, opt, {"bad": np.int64(1)} if rank == 0 else {})
            out["bad_extra_raises"] = False
        except CheckpointError:
            out["bad_extra_raises"] = not [
                p for p in (tmp / "single").iterdir() if TMP_TAG in p.name
            ]
        torch.save(out, tmp / f"result_{rank}.pt")
    finally:
        shutdown()


def test_two_gloo_ranks_save_fsdp_tp_ddp_and_change_layout(tmp_path):
    model, opt, sched = make(0)
    train(model, opt, sched, 1, seed=4)
    torch.save(full_state(model, opt), tmp_path / "single_ref.pt")
    seed_rng(21)
    CheckpointManager(tmp_path / "single").save(1, model, opt, {"step": 1})
    single_draws = draws()

    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path), single_draws), nprocs=2, join=True)

    for rank in range(2):
        result = torch.load(tmp_path / f"result_{rank}.pt", weights_only=True)
        assert len(result) == 13 and all(result.values()), (rank, result)
    for name in ("fsdp", "tp", "ddp"):
        want_model, want_opt = torch.load(tmp_path / f"{name}_ref.pt", weights_only=True)
        mgr = CheckpointManager(tmp_path / name)
        assert read_marker(mgr.latest())["world_size"] == 2
        assert len(list((mgr.latest() / "rng").iterdir())) == 2
        model, opt, _ = make(1)
        assert mgr.load(mgr.latest(), model, opt)["layout"] == name
        got_model, got_opt = full_state(model, opt)
        assert_same(got_model, want_model)
        assert_same(got_opt, want_opt)
        exported = export_safetensors(mgr.latest(), tmp_path / f"{name}.safetensors")
        assert_same(load_file(exported), want_model)
