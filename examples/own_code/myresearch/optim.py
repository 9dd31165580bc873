"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675) and
the inverse-square-root schedule (Vaswani et al. 2017) it is often paired with."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nanogpt.checks import NON_NEGATIVE, PROBABILITY, valid
from nanogpt.optim import torch_groups


class Lion(torch.optim.Optimizer):
    """The sign of an interpolation of momentum and gradient, so every update has the same size
    per element: one state tensor per parameter (AdamW keeps two). Its rate is usually 3-10x
    below AdamW's and its weight decay 3-10x above (the paper's section 5)."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as AdamW's
                p.add_(m.lerp(p.grad, 1 - beta1).sign_(), alpha=-group["lr"])  # sign(b1 m + (1 - b1) g)
                m.lerp_(p.grad, 1 - beta2)  # m = b2 m + (1 - b2) g
        return loss


@dataclass
class LionConfig:
    _target_: str = "myresearch.optim.build_lion"
    learning_rate: float = valid(2e-4, NON_NEGATIVE)  # peak rate: AdamW's 1e-3 / 5
    weight_decay: float = valid(0.5, NON_NEGATIVE)  # AdamW's 0.1 x 5 (the model's groups say which weights decay)
    beta1: float = valid(0.9, PROBABILITY)
    beta2: float = valid(0.99, PROBABILITY)


def build_lion(c: LionConfig, *, model: nn.Module, device_type: str) -> Lion:
    """Lion over the model's parameter groups: their kinds, rate scales and decay (nanogpt's ParamGroup)."""
    return Lion(torch_groups(model, model.param_groups(), c.learning_rate, c.weight_decay),
                lr=c.learning_rate, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay)


@dataclass
class InverseSqrtConfig:
    _target_: str = "myresearch.optim.inverse_sqrt"
    warmup_iters: int = valid(100, NON_NEGATIVE)
    min_lr: float = valid(0.0, NON_NEGATIVE)  # a floor under the decay


def inverse_sqrt(c: InverseSqrtConfig, *, learning_rate: float) -> Callable[[int], float]:
    """Linear warmup, then the rate falls as 1/sqrt(iteration): no horizon, so a run can go on."""
    floor = c.min_lr / learning_rate if learning_rate else 0.0

    def lr_scale(it: int) -> float:
        if it < c.warmup_iters:
            return (it + 1) / (c.warmup_iters + 1)
        return max(floor, math.sqrt(max(c.warmup_iters, 1) / max(it, 1)))

    return lr_scale
