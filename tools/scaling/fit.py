"""Chinchilla scaling-law fits: approach 3 (parametric L(N, D)) and approach 2 (IsoFLOP parabolas).

Approach 3 (Hoffmann et al. 2022, as corrected by Besiroglu et al. 2024): with θ = (a, b, e, α, β),
minimise Σ_i Huber_δ(LSE(a − α ln N_i, b − β ln D_i, e) − ln L_i), δ = 1e-3, by L-BFGS from every
point of the grid α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}; keep the
best. A = e^a, B = e^b, E = e^e. The sum (not the mean) keeps the gradients large enough that
L-BFGS does not stop early. The grid's 4,500 points are scored in one vectorised pass and by
default L-BFGS runs from the 64 best (``n_starts=None``: from all of them, as Chinchilla did;
~100× slower, and on our tests it finds the same optimum). Confidence intervals: percentiles of refits on rows resampled with
replacement; each refit starts from the full-data optimum and the 8 grid points with the lowest
objective on the resample.

Approach 2: runs whose C agree within 5% form one budget. For each budget with at least three
distinct N, fit loss = c0 + c1·ln N + c2·(ln N)² and take N_opt = exp(−c1/(2c2)); then fit
ln N_opt = a·ln C + k and ln D_opt = b·ln C + k' with D_opt = C/(6·N_opt). Intervals come from a
parametric bootstrap: the parabolas' fitted values plus Gaussian noise with the residual variance
pooled over all budgets, refitted end to end (resamples whose parabola opens downwards are
dropped and counted).

Both fits run BLAS single-threaded: on problems this small, OpenBLAS's threads only spin, and on a
busy machine they made a fit 30-70x slower.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BESIROGLU = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
PUBLISHED = {"hoffmann": HOFFMANN, "besiroglu": BESIROGLU}
PARAMS = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3
MIN_ROWS = 6


class ScalingDataError(ValueError):
    """Input that cannot be fitted: a bad CSV, too few runs, non-positive values."""


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A/N^α + B/D^β."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @classmethod
    def from_dict(cls, values: dict) -> LossLaw:
        return cls(**{k: float(values[k]) for k in PARAMS})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in PARAMS}

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def has_optimum(self) -> bool:
        """Whether L falls with both N and D, so that a compute-optimal allocation exists."""
        return self.alpha > 0 and self.beta > 0 and self.A > 0 and self.B > 0

    @property
    def G(self) -> float:
        if not self.has_optimum:
            raise ValueError(f"no compute-optimal allocation: alpha={self.alpha:.3g}, beta={self.beta:.3g} "
                             "(both must be positive)")
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def optimal(self, budget):
        """Compute-optimal (N, D) for C = 6ND: N = G·(C/6)^a, D = (C/6)/N."""
        n = self.G * np.power(np.asarray(budget, dtype=float) / 6, self.a)
        return n, np.asarray(budget, dtype=float) / 6 / n


# ---------------------------------------------------------------------------------- input


def load_csv(path) -> dict[str, np.ndarray]:
    """Columns N, D, loss (and C when present) as float arrays, and with columns n_experts / top_k
    each row's architecture as ``family`` (see ``check_one_family``); clear errors for bad input."""
    path = Path(path)
    if not path.is_file():
        raise ScalingDataError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("N", "D", "loss") if c not in header]
        if missing:
            raise ScalingDataError(
                f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'no header'} "
                "(need N = parameters, D = tokens, loss; C = FLOPs is optional)"
            )
        columns = ["N", "D", "loss"] + (["C"] if "C" in header else [])
        values = {c: [] for c in columns}
        families = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            families.append(_family(row, f"{path} line {line}"))
            for c in columns:
                text = (row.get(c) or "").strip()
                try:
                    x = float(text)
                except ValueError:
                    raise ScalingDataError(f"{path} line {line}: column {c} is {text!r}, not a number") from None
                if not (math.isfinite(x) and x > 0):
                    raise ScalingDataError(f"{path} line {line}: column {c} must be positive and finite, got {text}")
                values[c].append(x)
    data = {c: np.asarray(v, dtype=float) for c, v in values.items()}
    if {"n_experts", "top_k"} & set(header):
        data["family"] = np.asarray(families, dtype=object)
    check_rows(data["N"], where=str(path))
    return data


def _family(row: dict, where: str) -> str:
    """"dense", or "MoE E=8 k=2" from the optional columns n_experts and top_k (blank or 0
    experts: dense)."""
    counts = {}
    for c in ("n_experts", "top_k"):
        text = (row.get(c) or "").strip()
        try:
            counts[c] = int(float(text)) if text else 0
        except ValueError:
            raise ScalingDataError(f"{where}: column {c} is {text!r}, not a whole number") from None
        if counts[c] < 0 or (text and float(text) != counts[c]):
            raise ScalingDataError(f"{where}: column {c} must be a whole number >= 0, got {text}")
    if not counts["n_experts"]:
        return "dense"
    return f"MoE E={counts['n_experts']} k={counts['top_k']}"


def families(data: dict) -> np.ndarray:
    """Each row's architecture; rows of a CSV without n_experts / top_k columns are dense."""
    return data.get("family", np.full(len(data["N"]), "dense", dtype=object))


def check_one_family(data: dict, where: str = "data") -> None:
    """Refuse rows of different architectures (dense and MoE, or MoEs of different E or k): N is
    active parameters, and a law in active N differs between them (docs/scaling.md)."""
    labels, counts = np.unique(families(data), return_counts=True)
    if len(labels) > 1:
        found = ", ".join(f"{label} ({count} rows)" for label, count in zip(labels, counts))
        raise ScalingDataError(
            f"{where} mixes architectures: {found}. N is active parameters and one L(N, D) does not fit "
            "them all: fit each separately (filter the CSV), or pass --allow-mixed to fit them together"
        )


def check_rows(n, where: str = "data") -> None:
    if len(n) < MIN_ROWS:
        raise ScalingDataError(f"{where}: {len(n)} row(s); the 5-parameter fit needs at least {MIN_ROWS}")


# ------------------------------------------------------------------------------ approach 3


def start_grid() -> np.ndarray:
    """Chinchilla's initialisations as rows (a, b, e, α, β)."""
    exps = np.arange(0, 2.01, 0.5)
    es = np.arange(-1, 1.01, 0.5)
    abs_ = np.arange(0, 25.1, 5)
    return np.array([(a, b, e, al, be) for a, b, e, al, be in itertools.product(abs_, abs_, es, exps, exps)])


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def _terms(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray) -> np.ndarray:
    """The three log-terms, shape (..., 3, rows), for θ of shape (..., 5)."""
    theta = np.asarray(theta, dtype=float)
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    return np.stack([a - alpha * ln_n, b - beta * ln_d, np.broadcast_to(e, (a - alpha * ln_n).shape)], axis=-2)


def objective(theta, ln_n, ln_d, ln_l, delta: float = HUBER_DELTA):
    """Summed Huber loss of the log-space residuals, for one θ or a stack of them."""
    t = _terms(theta, ln_n, ln_d)
    lse = np.logaddexp.reduce(t, axis=-2)
    return huber(lse - ln_l, delta)[0].sum(axis=-1)


def _objective_and_grad(theta, ln_n, ln_d, ln_l, delta):
    a, b, e, alpha, beta = theta
    t1 = a - alpha * ln_n
    t2 = b - beta * ln_d
    m = np.maximum(np.maximum(t1, t2), e)
    x1, x2, x3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    total = x1 + x2 + x3
    value, dr = huber(m + np.log(total) - ln_l, delta)
    dr = dr / total
    w1, w2 = x1 * dr, x2 * dr
    grad = np.array([w1.sum(), w2.sum(), (x3 * dr).sum(), -(w1 * ln_n).sum(), -(w2 * ln_d).sum()])
    return value.sum(), grad


def _minimize(start, ln_n, ln_d, ln_l, delta):
    return minimize(
        _objective_and_grad, start, args=(ln_n, ln_d, ln_l, delta), jac=True, method="L-BFGS-B",
        options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9},
    )


@threadpool_limits.wrap(limits=1, user_api="blas")
def _best(starts, ln_n, ln_d, ln_l, delta) -> np.ndarray:
    best = None
    for start in starts:
        result = _minimize(start, ln_n, ln_d, ln_l, delta)
        if np.all(np.isfinite(result.x)) and (best is None or result.fun < best.fun):
            best = result
    return best.x


def _law(theta) -> LossLaw:
    """θ → LossLaw; a degenerate bootstrap refit may put a, b or e beyond exp's range (→ inf)."""
    a, b, e, alpha, beta = (float(x) for x in theta)
    with np.errstate(over="ignore"):
        E, A, B = (float(np.exp(x)) for x in (e, a, b))
    return LossLaw(E=E, A=A, B=B, alpha=alpha, beta=beta)


@dataclass
class Approach3:
    law: LossLaw
    objective: float
    intervals: dict = field(default_factory=dict)
    level: float = 0.95
    n_boot: int = 0
    rows: int = 0


def fit_approach3(n, d, loss, delta: float = HUBER_DELTA, n_boot: int = 200, level: float = 0.95,
                  seed: int = 0, n_starts: int | None = 64, boot_starts: int = 8) -> Approach3:
    """Fit L(N, D) by approach 3 with bootstrap intervals for E, A, B, α, β, a and b.
    ``n_starts``: L-BFGS from that many grid points with the lowest objective (None: all)."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    check_rows(n)
    ln_n, ln_d, ln_l = np.log(n), np.log(d), np.log(loss)
    grid = start_grid()
    ranked = grid[np.argsort(objective(grid, ln_n, ln_d, ln_l, delta))]
    theta = _best(ranked if n_starts is None else ranked[:n_starts], ln_n, ln_d, ln_l, delta)
    law = _law(theta)
    samples = []
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        idx = rng.integers(0, len(n), len(n))
        bn, bd, bl = ln_n[idx], ln_d[idx], ln_l[idx]
        ranked = grid[np.argsort(objective(grid, bn, bd, bl, delta))[:boot_starts]]
        boot = _law(_best(np.vstack([theta, ranked]), bn, bd, bl, delta))
        samples.append([boot.E, boot.A, boot.B, boot.alpha, boot.beta, boot.a, boot.b])
    intervals = {}
    if samples:
        lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
        arr = np.array(samples)
        for i, key in enumerate(PARAMS + ("a", "b")):
            column = arr[:, i]
            intervals[key] = (float(np.percentile(column, lo, method="lower")),
                              float(np.percentile(column, hi, method="higher")))
    return Approach3(law=law, objective=float(objective(theta, ln_n, ln_d, ln_l, delta)), intervals=intervals,
                     level=level, n_boot=n_boot, rows=len(n))


# ------------------------------------------------------------------------------ approach 2


def isoflop_groups(c, rel_tol: float = 0.05) -> list[np.ndarray]:
    """Indices of runs grouped by budget: sorted by C, a new group whenever C exceeds the
    group's first C by more than ``rel_tol``."""
    c = np.asarray(c, dtype=float)
    order = np.argsort(c)
    groups, current = [], [order[0]]
    for i in order[1:]:
        if c[i] > c[current[0]] * (1 + rel_tol):
            groups.append(np.array(current))
            current = []
        current.append(i)
    groups.append(np.array(current))
    return groups


@dataclass
class Budget:
    C: float
    n: np.ndarray
    loss: np.ndarray
    coeffs: np.ndarray
    n_opt: float
    loss_opt: float
    inside: bool


@dataclass
class Approach2:
    budgets: list[Budget]
    a: float
    k: float
    b: float
    a_interval: tuple | None
    b_interval: tuple | None
    level: float
    kept: int
    dropped: int
    notes: list[str]

    def n_opt(self, budget):
        return np.exp(self.k) * np.power(budget, self.a)


def _parabola_minimum(ln_n, loss):
    coeffs = np.polyfit(ln_n, loss, 2)
    if coeffs[0] <= 0:
        return coeffs, None
    x = -coeffs[1] / (2 * coeffs[0])
    return coeffs, x


def has_isoflop_structure(n, c, rel_tol: float = 0.05) -> bool:
    """At least two budgets with three or more distinct N each."""
    groups = isoflop_groups(c, rel_tol)
    return sum(len(np.unique(np.asarray(n)[g])) >= 3 for g in groups) >= 2


@threadpool_limits.wrap(limits=1, user_api="blas")
def fit_approach2(n, d, loss, c=None, level: float = 0.95, n_boot: int = 1000, seed: int = 0,
                  rel_tol: float = 0.05) -> Approach2:
    """Approach 2 on runs grouped into IsoFLOP budgets (C = 6ND when ``c`` is None)."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    c = 6 * n * d if c is None else np.asarray(c, dtype=float)
    notes, budgets, residuals, dof = [], [], [], 0
    for g in isoflop_groups(c, rel_tol):
        budget = float(np.exp(np.log(c[g]).mean()))
        if len(np.unique(n[g])) < 3:
            notes.append(f"budget {budget:.3g}: {len(np.unique(n[g]))} distinct N, need 3; skipped")
            continue
        ln_n = np.log(n[g])
        coeffs, x = _parabola_minimum(ln_n, loss[g])
        if x is None:
            notes.append(f"budget {budget:.3g}: loss vs ln N opens downwards (no minimum); skipped")
            continue
        inside = bool(ln_n.min() <= x <= ln_n.max())
        if not inside:
            notes.append(f"budget {budget:.3g}: the parabola's minimum N={math.exp(x):.3g} lies outside the runs' N range")
        budgets.append(Budget(C=budget, n=n[g], loss=loss[g], coeffs=coeffs, n_opt=math.exp(x),
                              loss_opt=float(np.polyval(coeffs, x)), inside=inside))
        residuals.append(loss[g] - np.polyval(coeffs, ln_n))
        dof += len(g) - 3
    if len(budgets) < 2:
        raise ScalingDataError(
            "approach 2 needs at least two IsoFLOP budgets with three or more sizes each and a convex "
            "loss curve; " + ("; ".join(notes) or f"found {len(budgets)}")
        )
    ln_c = np.log([bu.C for bu in budgets])
    a, k = np.polyfit(ln_c, np.log([bu.n_opt for bu in budgets]), 1)
    b = np.polyfit(ln_c, np.log([bu.C / (6 * bu.n_opt) for bu in budgets]), 1)[0]
    a_int = b_int = None
    kept = dropped = 0
    if dof > 0 and n_boot > 0:
        sigma = math.sqrt(sum(float((r**2).sum()) for r in residuals) / dof)
        rng = np.random.default_rng(seed)
        a_s, b_s = [], []
        for _ in range(n_boot):
            opts = []
            for bu in budgets:
                ln_n = np.log(bu.n)
                _, x = _parabola_minimum(ln_n, np.polyval(bu.coeffs, ln_n) + rng.normal(0, sigma, len(ln_n)))
                if x is None:
                    break
                opts.append(x)
            if len(opts) < len(budgets):
                dropped += 1
                continue
            kept += 1
            a_s.append(np.polyfit(ln_c, opts, 1)[0])
            b_s.append(np.polyfit(ln_c, ln_c - math.log(6) - np.array(opts), 1)[0])
        if kept:
            lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
            a_int = (float(np.percentile(a_s, lo)), float(np.percentile(a_s, hi)))
            b_int = (float(np.percentile(b_s, lo)), float(np.percentile(b_s, hi)))
    elif n_boot > 0:
        notes.append("every budget has exactly three sizes: no residual variance, so no interval")
    return Approach2(budgets=budgets, a=float(a), k=float(k), b=float(b), a_interval=a_int, b_interval=b_int,
                     level=level, kept=kept, dropped=dropped, notes=notes)
