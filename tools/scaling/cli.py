"""``pretrain scaling plan | launch | collect | fit | predict``: the scaling-law sweep loop."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HELP = {
    "plan": "plan a sweep: an IsoFLOP grid, a size ladder or one compute-optimal run",
    "launch": "run a plan's runs locally one after another, or submit them as a Slurm job array",
    "collect": "gather the runs' final losses into one CSV, naming missing and failed runs",
    "fit": "fit L(N, D) = E + A/N^alpha + B/D^beta (approach 3) and IsoFLOP parabolas (approach 2)",
    "predict": "compute-optimal N, D and the loss for a compute budget",
}


def _numbers(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"expected positive numbers, got {text!r}")
    return values


def add_scaling_commands(commands) -> None:
    scaling = commands.add_parser("scaling", help="scaling-law sweeps: " + " | ".join(HELP),
                                  description=__doc__.splitlines()[0])
    sub = scaling.add_subparsers(dest="scaling_command", required=True, metavar="STEP")

    plan = sub.add_parser("plan", help=HELP["plan"], description=HELP["plan"])
    plan.add_argument("sweep_dir", help="directory for plan.json, plan.csv and later the runs")
    kind = plan.add_mutually_exclusive_group(required=True)
    kind.add_argument("--isoflop", metavar="C1,C2,...", help="budgets (6ND FLOPs) of an IsoFLOP grid")
    kind.add_argument("--ladder", metavar="N1,N2,...", help="target sizes (active non-embedding parameters)")
    kind.add_argument("--budget", type=float, help="one compute-optimal run for this budget")
    plan.add_argument("--sizes-per-budget", type=int, default=4)
    plan.add_argument("--spread", type=float, default=3.0, help="IsoFLOP sizes span N*/spread .. N*·spread")
    plan.add_argument("--multiples", default="1", help="ladder: token multiples of tokens_per_param·N")
    plan.add_argument("--base-config", default="tiny", help="preset or YAML the run overrides apply to")
    plan.add_argument("--vocab-size", type=int, default=4096)
    plan.add_argument("--seq-len", type=int, default=256)
    plan.add_argument("--head-dim", type=int, default=64)
    plan.add_argument("--kv-ratio", type=int, default=2, help="query heads per key/value head")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel degree the shapes must divide by")
    plan.add_argument("--aspect", type=float, default=64.0, help="preferred d_model / n_layers")
    plan.add_argument("--aspect-range", default="16,256")
    plan.add_argument("--min-layers", type=int, default=2)
    plan.add_argument("--ffn-multiple", type=int, default=64)
    plan.add_argument("--size-tolerance", type=float, default=0.05,
                      help="shapes within this relative distance of a target size compete on aspect ratio")
    plan.add_argument("--tokens-per-param", type=float, default=20.0)
    plan.add_argument("--batch-multiple", type=int, default=32, help="global batch granularity (sequences)")
    plan.add_argument("--micro-batch", type=int, default=8)
    plan.add_argument("--lr-scale", type=float, default=1.0, help="multiplies OLMo's learning-rate rule")
    plan.add_argument("--min-steps", type=int, default=20)
    plan.add_argument("--tie-embeddings", action="store_true")
    moe = plan.add_argument_group("mixture of experts (N is then the active non-embedding parameters)")
    moe.add_argument("--n-experts", type=int, default=0, help="routed experts per block (0: dense, the default)")
    moe.add_argument("--top-k", type=int, default=2, help="experts per token")
    width = moe.add_mutually_exclusive_group()
    width.add_argument("--expert-d-ff", type=int, default=0, help="every expert's hidden width, for every shape")
    width.add_argument("--expert-ffn-ratio", type=float, default=None,
                       help="expert width = this x d_model, rounded up (default 8/3 / top_k)")
    moe.add_argument("--shared-experts", type=int, default=0, help="always-on experts of the expert width")
    plan.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                      help="an extra override for every run (repeatable), e.g. --set train.eval_batches=16")
    plan.add_argument("--force", action="store_true", help="replace an existing plan")
    plan.set_defaults(run=_guard(_plan))

    launch = sub.add_parser("launch", help=HELP["launch"], description=HELP["launch"])
    launch.add_argument("sweep_dir")
    launch.add_argument("--slurm", action="store_true", help="one sbatch job array through cluster/train.sh")
    launch.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    launch.add_argument("--only", nargs="+", metavar="NAME", help="these runs only")
    launch.add_argument("--force", action="store_true", help="local: rerun complete runs from scratch")
    launch.add_argument("--max-parallel", type=int, default=None, help="Slurm: at most this many tasks at once")
    launch.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                        help="Slurm: an extra #SBATCH line, e.g. --sbatch-arg=--gpus-per-node=1 (repeatable)")
    launch.set_defaults(run=_guard(_launch))

    collect = sub.add_parser("collect", help=HELP["collect"], description=HELP["collect"])
    collect.add_argument("sweep_dir")
    collect.add_argument("--out", default=None, help="CSV path (default SWEEP_DIR/results.csv)")
    collect.add_argument("--metric", choices=("valid", "train"), default="valid",
                         help="loss = the validation loss at the last step (default) or the last training loss")
    collect.set_defaults(run=_guard(_collect))

    fit = sub.add_parser("fit", help=HELP["fit"], description=HELP["fit"])
    fit.add_argument("csv", help="columns N, D, loss (C optional; default 6ND)")
    fit.add_argument("--json", action="store_true", help="print one JSON object (keys E, A, B, alpha, beta, ...)")
    fit.add_argument("--bootstrap", type=int, default=200, help="approach 3 bootstrap resamples")
    fit.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--all-starts", action="store_true", help="L-BFGS from all 4,500 grid starts (slow)")
    fit.add_argument("--plots", default=None, metavar="DIR", help="write PNG and SVG plots here")
    fit.add_argument("--allow-mixed", action="store_true",
                     help="fit rows of different architectures (dense and MoE, or different n_experts/top_k) together")
    fit.set_defaults(run=_guard(_fit))

    predict = sub.add_parser("predict", help=HELP["predict"], description=HELP["predict"])
    predict.add_argument("--budget", required=True, help="FLOPs (6ND), comma-separated for several")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--fit", help="the JSON that `pretrain scaling fit --json` printed")
    source.add_argument("--law", choices=("hoffmann", "besiroglu"), help="a published parameter set")
    source.add_argument("--params", metavar="E,A,B,ALPHA,BETA")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(run=_guard(_predict))


def _guard(handler):
    """User errors print one ``error:`` line and exit 2 (pretrain.cli's convention)."""

    def run(args) -> int:
        try:
            return handler(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def _plan(args) -> int:
    from tools.scaling.ladder import LadderSettings, budget_run, isoflop_grid, size_ladder
    from tools.scaling.runner import format_table, write_plan

    low, high = _numbers(args.aspect_range)
    settings = LadderSettings(
        vocab_size=args.vocab_size, seq_len=args.seq_len, head_dim=args.head_dim, kv_ratio=args.kv_ratio,
        tp=args.tp, aspect=args.aspect, aspect_range=(low, high), min_layers=args.min_layers,
        ffn_multiple=args.ffn_multiple, size_tolerance=args.size_tolerance, tie_embeddings=args.tie_embeddings, tokens_per_param=args.tokens_per_param,
        batch_multiple=args.batch_multiple, micro_batch=args.micro_batch, lr_scale=args.lr_scale,
        min_steps=args.min_steps, n_experts=args.n_experts, top_k=args.top_k, expert_d_ff=args.expert_d_ff,
        expert_ffn_ratio=args.expert_ffn_ratio, n_shared_experts=args.shared_experts, extra=list(args.extra),
    )
    settings.validate()
    if args.isoflop:
        runs = isoflop_grid(_numbers(args.isoflop), args.sizes_per_budget, args.spread, settings)
        description = {"kind": "isoflop", "budgets": _numbers(args.isoflop), "spread": args.spread}
    elif args.ladder:
        runs = size_ladder(_numbers(args.ladder), _numbers(args.multiples), settings)
        description = {"kind": "ladder", "sizes": _numbers(args.ladder), "multiples": _numbers(args.multiples)}
    else:
        runs = [budget_run(args.budget, settings)]
        description = {"kind": "budget", "budget": args.budget}
    description["settings"] = {k: v for k, v in vars(settings).items()}
    base = str(Path(args.base_config).resolve()) if Path(args.base_config).is_file() else args.base_config
    check_base_config(base, runs)
    plan = write_plan(args.sweep_dir, runs, base, description, force=args.force)
    print(format_table(runs))
    total = sum(r.flops_exact for r in runs)
    print(f"{len(runs)} runs, {total:.3g} FLOPs in all (exact count); plan in {plan.directory / 'plan.json'}")
    return 0


def check_base_config(base: str, runs) -> None:
    """Every run's overrides applied to the base config must build the model the plan counted
    (a dense plan on an MoE base, or a ``--set`` that changes the model, would not)."""
    from pretrain.config import load_config
    from tools.scaling.ladder import active_non_embedding

    for run in runs:
        model = load_config(base, run.overrides(None)).model
        n = active_non_embedding(model)
        if n != run.n:
            kind = getattr(model.ffn, "kind", type(model.ffn).__name__)
            raise ValueError(
                f"base config {base} with run {run.name}'s overrides builds a model with N = {n:,} active "
                f"non-embedding parameters (ffn kind {kind}), not the planned {run.n:,}: plan MoE shapes with "
                "--n-experts for an MoE base, use a base whose model the ladder's keys fully set, or drop "
                "--set overrides that change the model"
            )


def _launch(args) -> int:
    from tools.scaling.runner import launch_local, launch_slurm, read_plan

    plan = read_plan(args.sweep_dir)
    if args.slurm:
        return launch_slurm(plan, args.only, args.dry_run, args.max_parallel, args.sbatch_arg)
    failed = launch_local(plan, args.only, args.dry_run, args.force)
    if failed:
        print(f"{failed} run(s) failed; `pretrain scaling collect {args.sweep_dir}` lists them", file=sys.stderr)
    return 1 if failed else 0


def _collect(args) -> int:
    from tools.scaling.runner import collect, read_plan, write_results

    plan = read_plan(args.sweep_dir)
    rows, problems = collect(plan, args.metric)
    for state in problems:
        print(f"{state.status}: {state.name} ({state.detail})", file=sys.stderr)
    if not rows:
        raise ValueError(f"no complete runs in {plan.directory} ({len(problems)} missing or failed)")
    path = write_results(rows, args.out or plan.directory / "results.csv")
    print(f"collected {len(rows)} of {len(plan.runs)} runs ({args.metric} loss) into {path}")
    if problems:
        counts = {}
        for state in problems:
            counts[state.status] = counts.get(state.status, 0) + 1
        print("not collected: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


def _interval(intervals: dict, key: str) -> str:
    lo_hi = intervals.get(key)
    return "" if lo_hi is None else f"  [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]"


def _finite(value):
    """JSON has no inf or nan: such numbers (a degenerate bootstrap bound) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fit(args) -> int:
    from tools.scaling.fit import (
        ScalingDataError, check_one_family, families, fit_approach2, fit_approach3, has_isoflop_structure, load_csv,
    )

    if not 0 < args.level < 1:
        raise ValueError(f"--level must lie in (0, 1), got {args.level}")
    data = load_csv(args.csv)
    if not args.allow_mixed:
        check_one_family(data, args.csv)
    three = fit_approach3(data["N"], data["D"], data["loss"], n_boot=args.bootstrap, level=args.level,
                          seed=args.seed, n_starts=None if args.all_starts else 64)
    law = three.law
    c = data.get("C")
    two, skipped = None, "needs two or more budgets with three or more sizes each"
    if has_isoflop_structure(data["N"], 6 * data["N"] * data["D"] if c is None else c):
        try:
            two = fit_approach2(data["N"], data["D"], data["loss"], c, level=args.level, seed=args.seed)
        except ScalingDataError as e:
            skipped = str(e)
    result = {
        **law.to_dict(), "a": law.a, "b": law.b, "G": law.G if law.has_optimum else None,
        "architectures": sorted(set(families(data))),
        "intervals": {k: list(v) for k, v in three.intervals.items()}, "level": args.level,
        "bootstrap": args.bootstrap, "rows": three.rows, "objective": three.objective, "huber_delta": 1e-3,
        "approach2_skipped": None if two is not None else skipped,
        "approach2": None if two is None else {
            "a": two.a, "a_interval": two.a_interval and list(two.a_interval), "b": two.b,
            "b_interval": two.b_interval and list(two.b_interval), "k": two.k,
            "budgets": [{"C": b.C, "N_opt": b.n_opt, "loss_opt": b.loss_opt, "runs": len(b.n),
                         "inside_range": b.inside} for b in two.budgets],
            "bootstrap_kept": two.kept, "bootstrap_dropped": two.dropped, "notes": two.notes,
        },
    }
    if args.plots:
        from tools.scaling.plots import make_plots

        result["plots"] = [str(p) for p in make_plots(data, law, two, args.plots)]
    if args.json:
        print(json.dumps(_finite(result), indent=1))
        return 0
    pct = f"{args.level:.0%}"
    print(f"approach 3: {three.rows} runs, Huber delta 1e-3 on ln L, {args.bootstrap} bootstrap resamples, {pct} intervals")
    print("  L(N, D) = E + A/N^alpha + B/D^beta")
    for key in ("E", "A", "B", "alpha", "beta"):
        print(f"  {key:<6} {getattr(law, key):>10.4g}{_interval(three.intervals, key)}")
    if law.has_optimum:
        print(f"  N_opt ∝ C^{law.a:.3f}{_interval(three.intervals, 'a')}, D_opt ∝ C^{law.b:.3f}{_interval(three.intervals, 'b')}")
    else:
        print("  alpha or beta is not positive: the data do not follow the law and there is no compute-optimal frontier")
    if two is None:
        print(f"approach 2: skipped ({skipped})")
    else:
        print(f"approach 2: {len(two.budgets)} IsoFLOP budgets")
        for b in two.budgets:
            flag = "" if b.inside else "  (minimum outside the sampled sizes)"
            print(f"  C = {b.C:.3g}: N_opt = {b.n_opt:.4g}, loss {b.loss_opt:.4f} ({len(b.n)} runs){flag}")
        a_int = "" if two.a_interval is None else f"  [{two.a_interval[0]:.3f}, {two.a_interval[1]:.3f}]"
        b_int = "" if two.b_interval is None else f"  [{two.b_interval[0]:.3f}, {two.b_interval[1]:.3f}]"
        print(f"  N_opt ∝ C^{two.a:.3f}{a_int}, D_opt ∝ C^{two.b:.3f}{b_int}")
        for note in two.notes:
            print(f"  note: {note}")
    for path in result.get("plots", []):
        print(f"wrote {path}")
    return 0


def _predict(args) -> int:
    from tools.scaling.fit import PUBLISHED, LossLaw

    if args.fit:
        path = Path(args.fit)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        try:
            law = LossLaw.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a fit JSON with keys E, A, B, alpha, beta ({e})") from None
    elif args.law:
        law = LossLaw.from_dict(PUBLISHED[args.law])
    else:
        values = [float(x) for x in args.params.split(",")]
        if len(values) != 5:
            raise ValueError(f"--params needs five numbers E,A,B,alpha,beta, got {args.params!r}")
        law = LossLaw(*values)
    rows = []
    for budget in _numbers(args.budget):
        n, d = law.optimal(budget)
        rows.append({"C": budget, "N_opt": float(n), "D_opt": float(d), "tokens_per_param": float(d / n),
                     "loss": float(law.loss(n, d))})
    if args.json:
        print(json.dumps({"law": law.to_dict(), "predictions": rows}, indent=1))
        return 0
    print(f"L(N, D) = {law.E:.4g} + {law.A:.4g}/N^{law.alpha:.4g} + {law.B:.4g}/D^{law.beta:.4g}")
    print(f"{'C':>10} {'N_opt':>10} {'D_opt':>10} {'D/N':>7} {'loss':>7}")
    for r in rows:
        print(f"{r['C']:>10.3g} {r['N_opt']:>10.3g} {r['D_opt']:>10.3g} {r['tokens_per_param']:>7.1f} {r['loss']:>7.4f}")
    return 0
