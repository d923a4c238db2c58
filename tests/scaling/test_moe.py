"""Scaling-law tools on mixture-of-experts shapes: N is the active non-embedding parameter count.

Every count is checked against the formula written out (attention, k routed experts, shared
experts, the router's E×d gate, norms, head), one planned run's N by hand, the planned budgets
and exact FLOPs recomputed from the shapes, the collector's total and active columns, a fit on
synthetic losses of MoE shapes that recovers the generating law, and the refusal to fit dense
and MoE rows together."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from models.counting import param_counts
from models.ffn.moe.config import MoEConfig
from models.spec import build_model
from pretrain.cli import main
from pretrain.config import load_config
from tools.scaling.fit import BESIROGLU, PARAMS, LossLaw
from tools.scaling.ladder import LadderSettings, isoflop_grid, shape_for_params, size_ladder
from tools.scaling.runner import collect, write_plan

SMALL = LadderSettings(head_dim=16, aspect=32, batch_multiple=8, n_experts=8, top_k=2)
WIDE = LadderSettings(vocab_size=32000, seq_len=2048, head_dim=64, kv_ratio=2, tp=2, n_experts=16, top_k=4,
                      n_shared_experts=1)


def expert_width(d: int, s: LadderSettings) -> int:
    if s.expert_d_ff:
        return s.expert_d_ff
    ratio = 8 / 3 / s.top_k if s.expert_ffn_ratio is None else s.expert_ffn_ratio
    unit = s.ffn_multiple * s.tp
    return math.ceil(ratio * d / unit) * unit


def formula(d: int, layers: int, f: int, s: LadderSettings) -> dict:
    """Parameters of a decoder of MoE blocks, written out. Per block: q and o (d × d), k and v
    (d × d/kv_ratio each), the router gate (E × d), the experts (3·d·f each: E stored, k used per
    token), the shared experts (3·d·f each) and two norm gains; then the final norm, the untied
    head and the input table."""
    attn = 2 * d * d + 2 * d * (d // s.kv_ratio)
    fixed = attn + s.n_experts * d + 3 * d * f * s.n_shared_experts + 2 * d
    head = s.vocab_size * d
    active = layers * (fixed + s.top_k * 3 * d * f) + d + head
    total = layers * (fixed + s.n_experts * 3 * d * f) + d + head + s.vocab_size * d
    norms = layers * 2 * d + d
    return {"N": active, "N_total": total, "N_active": active + s.vocab_size * d, "norms": norms}


def exact_flops_per_token(d: int, layers: int, f: int, s: LadderSettings) -> int:
    """3 × forward: 2 FLOPs per active matmul weight (no norms), plus causal attention's q·kᵀ and
    ·v over S/2 keys per query (2·S·d per layer)."""
    counts = formula(d, layers, f, s)
    return 3 * (2 * (counts["N"] - counts["norms"]) + layers * 2 * s.seq_len * d)


@pytest.mark.parametrize("s,targets", [(SMALL, [3e5, 2e6]), (WIDE, [5e7, 4e8])], ids=["small", "wide-tp2-shared"])
def test_moe_shapes_count_by_formula(s, targets):
    for target in targets:
        config = shape_for_params(target, s)
        ffn, d, layers = config.ffn, config.d_model, config.n_layers
        assert isinstance(ffn, MoEConfig) and (ffn.n_experts, ffn.top_k) == (s.n_experts, s.top_k)
        assert ffn.n_shared_experts == s.n_shared_experts and ffn.d_ff == expert_width(d, s)
        expected = formula(d, layers, ffn.d_ff, s)
        counts = param_counts(config)
        assert counts.active - counts.embedding == expected["N"]
        assert counts.total == expected["N_total"] and counts.active == expected["N_active"]
        with torch.device("meta"):
            model = build_model(config)
        assert sum(p.numel() for p in model.parameters()) == expected["N_total"]
        assert abs(math.log(expected["N"] / target)) <= math.log(2)
        assert expected["N_total"] > 2 * expected["N"]


def test_search_is_on_active_parameters():
    """The chosen shape is within the size tolerance of the target in *active* N; its total is
    several times larger."""
    config = shape_for_params(2e6, SMALL)
    n = formula(config.d_model, config.n_layers, config.ffn.d_ff, SMALL)["N"]
    assert abs(n / 2e6 - 1) <= SMALL.size_tolerance


def test_one_planned_run_by_hand():
    """The smallest shape of the 3e13 budget: d_model 32, 2 layers, 2 heads of 16, 1 kv head,
    experts of width ceil(8/3/2 · 32 / 64) · 64 = 64. Per block q, o: 2·32·32 = 2048; k, v:
    2·32·16 = 1024; router 8·32 = 256; two of the experts: 2·3·32·64 = 12288; norms 64; so
    15680, twice = 31360; + final norm 32 + head 4096·32 = 131072: N = 162464."""
    run = isoflop_grid([3e13], 3, 3.0, SMALL)[0]
    assert (run.model["d_model"], run.model["n_layers"], run.model["d_ff"]) == (32, 2, 64)
    assert run.n == 162464
    assert run.n_total == 162464 + 2 * 6 * 3 * 32 * 64 + 4096 * 32
    assert run.flops == 6 * 162464 * run.tokens


def test_planned_moe_isoflop_grid_recomputed():
    budgets = [3e13, 1e14]
    runs = isoflop_grid(budgets, 3, 3.0, SMALL)
    assert len(runs) == 6
    for run in runs:
        m = run.model
        d, layers, f = m["d_model"], m["n_layers"], m["d_ff"]
        assert (m["ffn_kind"], m["n_experts"], m["top_k"]) == ("moe", 8, 2) and f == expert_width(d, SMALL)
        expected = formula(d, layers, f, SMALL)
        assert (run.n, run.n_total, run.n_active) == (expected["N"], expected["N_total"], expected["N_active"])
        assert run.tokens == run.max_steps * run.global_batch * SMALL.seq_len
        assert run.flops == 6 * expected["N"] * run.tokens
        assert abs(run.flops / run.budget - 1) <= 0.5 / run.max_steps + 1e-12
        assert run.flops_exact == exact_flops_per_token(d, layers, f, SMALL) * run.tokens
        assert run.lr == pytest.approx(0.0047 * (expected["N"] / 108e6) ** (-1 / 3))
        config = load_config("tiny", run.overrides("runs/check")).model
        assert isinstance(config.ffn, MoEConfig) and (config.ffn.n_experts, config.ffn.top_k) == (8, 2)
        assert param_counts(config).active - param_counts(config).embedding == run.n


def test_fixed_expert_width_and_settings_errors():
    fixed = LadderSettings(head_dim=16, aspect=32, n_experts=4, top_k=1, expert_d_ff=96)
    for run in size_ladder([3e5, 1e6], [1], fixed):
        assert run.model["d_ff"] == 96
        assert run.n == formula(run.model["d_model"], run.model["n_layers"], 96, fixed)["N"]
    with pytest.raises(ValueError, match=r"top_k must be in 1..n_experts \(4\), got 5"):
        LadderSettings(n_experts=4, top_k=5).validate()
    with pytest.raises(ValueError, match="expert_d_ff apply only to a mixture of experts: set n_experts > 0"):
        LadderSettings(expert_d_ff=128).validate()
    with pytest.raises(ValueError, match="not both"):
        LadderSettings(n_experts=4, expert_d_ff=128, expert_ffn_ratio=1.0).validate()
    with pytest.raises(ValueError, match="must divide by tp 2"):
        LadderSettings(n_experts=4, expert_d_ff=97, n_shared_experts=1, tp=2).validate()


def test_plan_cli_checks_the_base_config(tmp_path, capsys):
    args = ["--isoflop", "3e13", "--sizes-per-budget", "2", "--head-dim", "16", "--aspect", "32",
            "--batch-multiple", "8"]
    assert main(["scaling", "plan", str(tmp_path / "dense-on-moe"), *args, "--base-config", "moe-tiny"]) == 2
    err = capsys.readouterr().err
    assert "error: base config moe-tiny" in err and "(ffn kind moe)" in err and "--n-experts" in err
    assert not (tmp_path / "dense-on-moe" / "plan.json").exists()
    moe = ["--n-experts", "8", "--top-k", "2"]
    assert main(["scaling", "plan", str(tmp_path / "moe"), *args, *moe, "--base-config", "moe-tiny"]) == 0
    assert "n_experts" in capsys.readouterr().out
    plan = json.loads((tmp_path / "moe" / "plan.json").read_text())
    assert plan["description"]["settings"]["n_experts"] == 8
    assert main(["scaling", "plan", str(tmp_path / "bad"), *args, "--top-k", "3"]) == 2
    assert "top_k apply only to a mixture of experts" in capsys.readouterr().err


def test_collect_records_total_and_active(tmp_path):
    runs = isoflop_grid([3e13], 2, 2.0, SMALL)
    plan = write_plan(tmp_path / "sweep", runs, "tiny", {"kind": "test"})
    run = runs[0]
    (plan.run_dir(run)).mkdir(parents=True)
    (plan.run_dir(run) / "metrics.jsonl").write_text(
        json.dumps({"step": run.max_steps, "loss": 4.5}) + "\n" + json.dumps({"step": run.max_steps, "valid_loss": 4.7})
    )
    assert main(["scaling", "collect", str(plan.directory)]) == 0
    with open(plan.directory / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    expected = formula(int(row["d_model"]), int(row["n_layers"]), int(row["d_ff"]), SMALL)
    assert int(row["N"]) == expected["N"] and int(row["N_total"]) == expected["N_total"]
    assert int(row["N_active"]) == expected["N_active"]
    assert (int(row["n_experts"]), int(row["top_k"])) == (8, 2)
    assert float(row["C"]) == pytest.approx(6 * expected["N"] * int(row["D"]))
    assert collect(plan)[0][0]["N"] == expected["N"]


SYNTH = LadderSettings(vocab_size=32000, seq_len=2048, head_dim=64, kv_ratio=2, n_experts=8, top_k=2)


def write_results(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def synthetic_rows(law: LossLaw, s: LadderSettings, targets) -> list[dict]:
    """One MoE shape per target (its N from the formula), each at 4 to 120 tokens per active
    parameter, with the law's loss at (active N, D)."""
    rows = []
    for target in targets:
        config = shape_for_params(target, s)
        counts = formula(config.d_model, config.n_layers, config.ffn.d_ff, s)
        for ratio in (4, 10, 20, 50, 120):
            n, d = counts["N"], ratio * counts["N"]
            rows.append({"N": n, "N_total": counts["N_total"], "D": d, "C": 6 * n * d,
                         "loss": float(law.loss(n, d)), "n_experts": s.n_experts, "top_k": s.top_k})
    return rows


def test_fit_recovers_the_law_from_moe_shapes(tmp_path, capsys):
    law = LossLaw.from_dict(BESIROGLU)
    rows = synthetic_rows(law, SYNTH, np.logspace(7, 9.5, 6))
    assert len({r["N"] for r in rows}) == 6
    path = tmp_path / "moe.csv"
    write_results(path, rows)
    assert main(["scaling", "fit", str(path), "--json", "--bootstrap", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["architectures"] == ["MoE E=8 k=2"]
    for key in PARAMS:
        assert result[key] == pytest.approx(getattr(law, key), rel=2e-3), key


def test_fit_refuses_mixed_architectures(tmp_path, capsys):
    law = LossLaw.from_dict(BESIROGLU)
    moe = synthetic_rows(law, SYNTH, [1e7, 1e8])
    dense = [{**r, "n_experts": 0, "top_k": 0} for r in synthetic_rows(law, SYNTH, [3e7])]
    path = tmp_path / "mixed.csv"
    write_results(path, moe + dense)
    assert main(["scaling", "fit", str(path), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "mixes architectures: MoE E=8 k=2 (10 rows), dense (5 rows)" in err and "--allow-mixed" in err
    plots = ["--plots", str(tmp_path / "plots")]
    assert main(["scaling", "fit", str(path), "--bootstrap", "0", "--json", "--allow-mixed", *plots]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["architectures"] == ["MoE E=8 k=2", "dense"] and len(result["plots"]) >= 4
    other = [{**r, "n_experts": 16} for r in moe[:5]]
    write_results(path, moe[5:] + other)
    assert main(["scaling", "fit", str(path), "--bootstrap", "0"]) == 2
    assert "MoE E=16 k=2 (5 rows), MoE E=8 k=2 (5 rows)" in capsys.readouterr().err
    write_results(path, moe[:9] + [{**moe[9], "n_experts": "2.5"}])
    assert main(["scaling", "fit", str(path), "--bootstrap", "0"]) == 2
    assert "line 11: column n_experts must be a whole number >= 0, got 2.5" in capsys.readouterr().err


def test_accounting_of_moe_tiny():
    """moe-tiny (docs/moe.md): 8 layers of d 256, 8 heads of 32 and 4 KV heads, 8 experts of 512,
    top-2, vocabulary 4096, sequence 256. 6N uses the active parameters; the exact count adds causal
    attention and leaves out the norms; the dense-only conventions are None."""
    from tools.scaling.accounting import account

    config = load_config("moe-tiny").model
    d, v, kv, f, layers = 256, 4096, 4 * 32, 512, 8
    block_active = (2 * d * d + 2 * d * kv) + 8 * d + 2 * 3 * d * f + 2 * d
    n = layers * block_active + d + v * d
    report = account(config, 256)
    assert report.n == n and report.params.active == n + v * d == 9_982_208
    assert report.params.total == n + layers * 6 * 3 * d * f + v * d == 28_856_576
    assert report.six_n == 6 * n
    assert report.exact == 3 * (2 * (n - layers * 2 * d - d) + layers * 2 * 256 * d)
    assert report.kaplan is None and report.chinchilla is None


def test_a_csv_without_architecture_columns_is_one_dense_family(tmp_path, capsys):
    moe = synthetic_rows(LossLaw.from_dict(BESIROGLU), SYNTH, [1e7, 1e8])
    path = tmp_path / "plain.csv"
    write_results(path, [{k: r[k] for k in ("N", "D", "C", "loss")} for r in moe])
    assert main(["scaling", "fit", str(path), "--bootstrap", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architectures"] == ["dense"]
