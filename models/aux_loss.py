"""Auxiliary losses computed inside a module (load balancing of experts, ...), added to the
gradient where they arise — on whichever pipeline stage the module lives.

A module with an auxiliary loss keeps an ``aux_loss_scale`` attribute (the trainer sets it to
each micro-batch's share of the global batch, so the terms of a step add up to one global
batch's worth, under any layout and gradient accumulation) and returns

    x = attach_aux_loss(x, aux)      # aux: a scalar with a graph to the module's parameters

from its forward. The output is ``x`` unchanged; in backward, ``aux`` receives the gradient
``aux_loss_scale`` (times 1: it is a loss term of its own, independent of the output's
gradient), exactly as if ``aux_loss_scale · aux`` had been added to the step's loss. Outside
autograd (evaluation, no_grad) it does nothing.

A loss term that is not a mean over positions (the Switch loss: a product of two means) needs
the statistics of whole sequences. Under context parallelism each rank holds chunks of the
sequences; a module with such a term keeps a ``sequence_reduce`` attribute (None), which context
parallelism sets to a differentiable sum over the ranks holding the other chunks: the module
sums its statistics with it. Terms that are means over positions (z-loss) need nothing: the
trainer's ``aux_loss_scale`` already divides each rank's share by cp.
"""

from __future__ import annotations

import torch


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def attach_aux_loss(x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    """``x``, with ``scale · aux`` joining the loss in backward (see the module docstring)."""
    if not (torch.is_grad_enabled() and aux.requires_grad):
        return x
    return _AttachAuxLoss.apply(x, aux, scale)
