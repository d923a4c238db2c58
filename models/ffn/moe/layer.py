"""The MoE layer: routed experts (router → dispatch → experts → combine) plus optional shared
experts every token goes through, with its auxiliary losses, post-step hook, metrics and counts.

    out = RoutedExperts(x) + SharedSwiGLU(x)

``RoutedExperts`` does all per-token routing work on plain tensors (tensor parallelism runs it
redundantly on every TP rank: ``LocalInputs``; its router projection and experts are
``Replicated``); the shared experts, one SwiGLU of width n_shared · d_ff (the sum of n_shared
SwiGLUs of width d_ff is that SwiGLU), are sharded like a dense FFN.

Statistics: each training forward (grad enabled, module in training mode) adds to ``_stats``
(per-expert assignments before the capacity, dropped and total assignments, the loss terms, the
number of forwards). ``post_step`` sums them over the data-parallel ranks, keeps the result for
``step_metrics`` and clears them; the aux-loss-free bias update uses the summed loads. Every
metric is a ratio of two such sums, so a forward recomputed in backward (activation
checkpointing), which counts every micro-batch twice, changes no metric and no sign in the bias
update.
"""

from __future__ import annotations

import torch
from torch import nn

from models.aux_loss import attach_aux_loss
from models.context import ForwardContext
from models.ffn.moe.balancing import compete_loss, switch_loss, update_bias, z_loss
from models.ffn.moe.config import MoEConfig
from models.ffn.moe.dispatch import combine, dispatch, expert_capacity, plan_dispatch
from models.ffn.moe.experts import GroupedExperts
from models.ffn.moe.routers import HashRouter, Routing, SigmoidBias, build_router
from models.ffn.swiglu import SwiGLU
from models.plans import LocalInputs

# Positions after the E per-expert loads in the statistics vector.
_DROPPED, _ASSIGNED, _AUX, _Z, _COMPETE, _FORWARDS = range(6)
_TERMS = {"aux_loss": _AUX, "z_loss": _Z, "compete_loss": _COMPETE}


class RoutedExperts(nn.Module):
    def __init__(self, config: MoEConfig, d_model: int):
        super().__init__()
        self.config = config
        self.n_experts, self.top_k, self.d_model = config.n_experts, config.top_k, d_model
        self.router = build_router(config, d_model)
        self.experts = GroupedExperts(
            config.n_experts, d_model, config.d_ff, config.grouped_gemm, exchangeable=config.router != "compete"
        )
        self.aux_loss_scale = 1.0
        self.sequence_reduce = None  # models/aux_loss.py: set under context parallelism
        size = config.n_experts + _FORWARDS + 1
        self.register_buffer("_stats", torch.zeros(size, dtype=torch.float64), persistent=False)
        self.register_buffer("_last", torch.zeros(size, dtype=torch.float64), persistent=False)
        if config.router == "compete":
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # saved: the schedule resumes

    def tp_plan(self) -> dict:
        return {"": LocalInputs((True, False))}  # (x, ctx); router and experts declare Replicated

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.router.init_weights(init_std)
        self.experts.init_weights(init_std, out_std)
        self._stats.zero_()
        self._last.zero_()
        if hasattr(self, "steps"):
            self.steps.zero_()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        flat = x.reshape(-1, self.d_model)
        token_ids = ctx.token_ids if ctx is not None else None
        routing = self.router(flat, token_ids)
        recording = self.training and torch.is_grad_enabled()
        terms: dict[str, torch.Tensor] = {}
        if self.config.router == "compete" and recording and int(self.steps) % self.config.compete_every == 0:
            out, routing, terms["compete_loss"] = self._compete(flat, routing)
            routed, dropped = torch.bincount(routing.experts.reshape(-1), minlength=self.n_experts), None
        else:
            capacity = expert_capacity(flat.shape[0], self.top_k, self.n_experts, self.config.capacity_factor)
            plan = plan_dispatch(routing.experts, routing.weights, self.n_experts, capacity)
            out = combine(self.experts(dispatch(flat, plan), counts=plan.counts), routing.weights, plan)
            routed, dropped = plan.routed, plan.dropped
        if self.config.aux_loss_coef > 0 and routing.probs is not None:
            rows = x.shape[0] if self.config.aux_loss_scope == "sequence" and x.dim() == 3 else 1
            terms["aux_loss"] = self.config.aux_loss_coef * switch_loss(
                routing.probs, routing.experts, rows, self.sequence_reduce
            )
        if self.config.z_loss_coef > 0 and routing.logits is not None:
            terms["z_loss"] = self.config.z_loss_coef * z_loss(routing.logits)
        if recording:
            self._record(routed, dropped, routing.experts.numel(), terms)
        if terms:
            out = attach_aux_loss(out, sum(terms.values()), self.aux_loss_scale)
        return out.view_as(x)

    def _compete(self, flat: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, Routing, torch.Tensor]:
        """CompeteSMoE: every expert runs every token; each token takes the k experts with the
        largest output norms, weighted by a softmax over those k norms; the router learns the
        outcome through ``compete_loss``."""
        outputs = self.experts(flat)  # [E, T, d]
        response = outputs.float().norm(dim=-1).t()  # [T, E]
        top, experts = response.topk(self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        tokens = torch.arange(flat.shape[0], device=flat.device)
        chosen = outputs[experts.t(), tokens]  # [k, T, d]
        out = (chosen * weights.t().unsqueeze(-1).to(chosen.dtype)).sum(0)
        loss = self.config.compete_loss_coef * compete_loss(routing.probs, response, self.top_k)
        return out, Routing(experts, weights, routing.probs, routing.logits), loss

    @torch.no_grad()
    def _record(self, routed: torch.Tensor, dropped, assigned: int, terms: dict) -> None:
        stats = self._stats
        stats[: self.n_experts] += routed.to(stats.dtype)
        base = self.n_experts
        if dropped is not None:
            stats[base + _DROPPED] += dropped.to(stats.dtype)
        stats[base + _ASSIGNED] += assigned
        for name, index in _TERMS.items():
            if name in terms:
                stats[base + index] += terms[name].detach().to(stats.dtype)
        stats[base + _FORWARDS] += 1

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def post_step(self, reduce) -> None:
        """Sum this step's statistics over the data-parallel ranks, keep them for the metrics,
        update the aux-loss-free bias from the summed loads, advance the competition schedule."""
        totals = reduce(self._stats.clone(), "sum")
        self._last.copy_(totals)
        self._stats.zero_()
        if isinstance(self.router, SigmoidBias) and self.config.bias_update_rate > 0 and totals[-1] > 0:
            update_bias(self.router.bias, totals[: self.n_experts], self.config.bias_update_rate)
        if hasattr(self, "steps"):
            self.steps += 1

    def step_metrics(self, reduce) -> dict[str, float]:
        """The last step's load of the most and least used expert over the mean, the fraction of
        assignments dropped by the capacity, the mean loss terms, and the bias range."""
        last = self._last
        base = self.n_experts
        forwards = float(last[base + _FORWARDS])
        if forwards == 0:
            return {}
        load = last[:base]
        mean = float(load.mean())
        metrics = {
            "max_load": float(load.max()) / mean if mean else 0.0,
            "min_load": float(load.min()) / mean if mean else 0.0,
            "dropped": float(last[base + _DROPPED]) / max(float(last[base + _ASSIGNED]), 1.0),
        }
        for name, index in _TERMS.items():
            if self._has_term(name):
                metrics[name] = float(last[base + index]) / forwards
        if isinstance(self.router, SigmoidBias):
            metrics["bias_range"] = float(self.router.bias.max() - self.router.bias.min())
        return metrics

    def _has_term(self, name: str) -> bool:
        learned = not isinstance(self.router, HashRouter)
        return {
            "aux_loss": learned and self.config.aux_loss_coef > 0,
            "z_loss": learned and self.config.z_loss_coef > 0,
            "compete_loss": self.config.router == "compete",
        }[name]

    # ------------------------------------------------------------------ counting
    def _expert_flops(self) -> int:
        return 2 * 3 * self.d_model * self.config.d_ff

    def inactive_params_per_token(self) -> int:
        """The (E − k) experts a token does not use."""
        return (self.n_experts - self.top_k) * 3 * self.d_model * self.config.d_ff

    def linear_flops_per_token(self) -> int:
        """Forward: the router projection (2·d·E; none for hash) and k experts; with compete, the
        other E − k experts on the 1/compete_every of the steps that run the competition."""
        router = 0 if isinstance(self.router, HashRouter) else 2 * self.d_model * self.n_experts
        flops = router + self.top_k * self._expert_flops()
        if self.config.router == "compete":
            flops += (self.n_experts - self.top_k) * self._expert_flops() // self.config.compete_every
        return flops


class MoE(nn.Module):
    """Routed experts plus optional shared experts: ``forward(x, ctx)``."""

    takes_context = True  # the block passes its ForwardContext (the hash router reads token ids)

    def __init__(self, config: MoEConfig, d_model: int):
        super().__init__()
        self.routed = RoutedExperts(config, d_model)
        shared = config.n_shared_experts * config.d_ff
        self.shared = SwiGLU(d_model, shared) if shared else None

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.routed.init_weights(init_std, out_std)
        if self.shared is not None:
            self.shared.init_weights(init_std, out_std)

    def tp_plan(self) -> dict:
        return {}  # the routed part and the shared SwiGLU declare their own

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        out = self.routed(x, ctx)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


def build_moe(config: MoEConfig, d_model: int, layer_id: int) -> nn.Module:
    """The FFN of block ``layer_id``: a dense SwiGLU of width ``dense_d_ff`` for the first
    ``first_dense_layers`` blocks, the MoE layer after."""
    if layer_id < config.first_dense_layers:
        return SwiGLU(d_model, config.dense_d_ff)
    return MoE(config, d_model)
