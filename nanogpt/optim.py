"""Optimizers over the model's parameter groups, and learning-rate schedules.

Builders take their group's config dataclass plus runtime dependencies as keywords, and are named
by the group's `_target_` (the contract: nanogpt.protocol). Every optimizer takes its parameters
from model.param_groups() through torch_groups, so a group's kind, rate scale and decay reach it
(muP's per-parameter rates included). Optimizers come as a list: Muon needs AdamW beside it. A
schedule is a multiplier of each parameter group's own peak rate, the rate it was built with (set_lr).
"""

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn as nn

from nanogpt.config import AdamWConfig, CosineScheduleConfig, MuonConfig, WSDScheduleConfig
from nanogpt.protocol import ParamGroup


def torch_groups(model: nn.Module, groups: list[ParamGroup], learning_rate: float, weight_decay: float) -> list[dict]:
    """torch param groups of the model's ParamGroups at an option's rate and decay: groups of the
    same scales and extra keys merged, each in the model's parameter order (GPT's: the decayed
    weights, then the rest)."""
    order = {id(p): i for i, p in enumerate(model.parameters())}
    merged: dict[tuple, dict] = {}
    for g in groups:
        key = (g.lr_scale, g.weight_decay_scale, *sorted(g.extra.items()))
        settings = {"lr": learning_rate * g.lr_scale, "weight_decay": weight_decay * g.weight_decay_scale, **g.extra}
        merged.setdefault(key, {"params": [], **settings})["params"].extend(g.params)
    for group in merged.values():
        group["params"].sort(key=lambda p: order[id(p)])
    return [g for g in merged.values() if g["params"]]


def use_fused(fused: bool | None, device_type: str) -> bool:
    # fused AdamW runs on CUDA and, since PyTorch 2.4, on CPU
    return device_type in ("cuda", "cpu") if fused is None else fused


def adamw(model: nn.Module, groups: list[ParamGroup], c: AdamWConfig, device_type: str) -> torch.optim.AdamW:
    return torch.optim.AdamW(torch_groups(model, groups, c.learning_rate, c.weight_decay), lr=c.learning_rate,
                             betas=(c.beta1, c.beta2), fused=use_fused(c.fused, device_type))


def build_adamw(c: AdamWConfig, *, model: nn.Module, device_type: str) -> list[torch.optim.Optimizer]:
    return [adamw(model, model.param_groups(), c, device_type)]


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same arguments, state and state_dict) with two changes for CPUs:
    - Newton-Schulz in float32 off CUDA. torch's runs in bfloat16 everywhere, and CPUs without
      bf16 matrix units (AVX2, e.g. AMD EPYC) do those matmuls about 20x slower than float32:
      measured 80 ms vs 4 ms per 128x512 matrix, more than the CPU recipe's whole training step.
    - matrices of one shape are orthogonalised together, one batched matmul for all layers: 4
      calls instead of 16 per step at the CPU recipe's size. Each matmul is a parallel region,
      and on a busy machine every region waits for a descheduled thread."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum = group["momentum"]
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)  # torch's EMA form of momentum
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                by_shape.setdefault(p.shape, []).append((p, update))
            for (rows, cols), pairs in by_shape.items():
                ortho = newton_schulz(
                    torch.stack([u for _, u in pairs]), group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                if group["adjust_lr_fn"] == "match_rms_adamw":
                    scale = 0.2 * math.sqrt(max(rows, cols))  # the update's RMS becomes AdamW's typical 0.2
                else:
                    scale = math.sqrt(max(1.0, rows / cols))  # Keller Jordan's original
                for (p, _), o in zip(pairs, ortho):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(o.to(p.dtype), alpha=-group["lr"] * scale)
        return loss


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Approximately U V^T of each matrix g = U S V^T of a batch (B, m, n), by torch.optim.Muon's
    quintic Newton-Schulz iteration: singular values land roughly in [0.7, 1.2] after 5 steps,
    which trains as well as exact UV^T."""
    a, b, c = coefficients
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide side: the Gram matrix is the smaller square
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius >= spectral norm: singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def build_muon(c: MuonConfig, *, model: nn.Module, device_type: str) -> list[torch.optim.Optimizer]:
    """Muon (Jordan et al. 2024) orthogonalises the momentum of the hidden 2-D weights with
    Newton-Schulz iterations; embeddings, the LM head and 1-D parameters stay with AdamW."""
    hidden, rest = [], []
    for g in model.param_groups():
        matrices = [p for p in g.params if g.kind == "hidden" and p.dim() == 2]
        others = [p for p in g.params if not (g.kind == "hidden" and p.dim() == 2)]
        hidden += [dataclasses.replace(g, params=matrices)] if matrices else []
        rest += [dataclasses.replace(g, params=others)] if others else []
    muon = Muon(
        torch_groups(model, hidden, c.muon_learning_rate, c.muon_weight_decay),
        lr=c.muon_learning_rate,
        momentum=c.muon_momentum,
        weight_decay=c.muon_weight_decay,
        adjust_lr_fn="match_rms_adamw",  # scale the update to AdamW's RMS, so rates transfer across shapes
    )
    return [muon, adamw(model, rest, c, device_type)]


def warmup_iters(c: CosineScheduleConfig | WSDScheduleConfig) -> int:
    """The warmup's length: warmup_iters, or warmup_fraction of the schedule (a budgeted run's
    length is known only at start-up)."""
    return c.warmup_iters if c.warmup_fraction is None else round(c.warmup_fraction * c.lr_decay_iters)


def cosine_schedule(c: CosineScheduleConfig, *, learning_rate: float) -> Callable[[int], float]:
    """nanoGPT's get_lr, as a multiplier of each group's peak rate."""
    floor = c.min_lr / learning_rate
    warmup = warmup_iters(c)

    def lr_scale(it: int) -> float:
        # 1) linear warmup for warmup steps; (it + 1) so the first step does not get lr 0
        if it < warmup:
            return (it + 1) / (warmup + 1)
        if not c.decay_lr:
            return 1.0
        # 2) past lr_decay_iters, the floor
        if it > c.lr_decay_iters:
            return floor
        # 3) in between, cosine decay from 1 down to the floor
        ratio = (it - warmup) / max(1, c.lr_decay_iters - warmup)
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1 - floor)

    return lr_scale


def wsd_schedule(c: WSDScheduleConfig, *, learning_rate: float) -> Callable[[int], float]:
    """Warmup-stable-decay (trapezoid): linear warmup, flat, then linear decay to min_lr over the
    last decay_fraction of lr_decay_iters (Hägele et al. 2024)."""
    decay_start = c.lr_decay_iters - int(c.decay_fraction * c.lr_decay_iters)
    floor = c.min_lr / learning_rate
    warmup = warmup_iters(c)

    def lr_scale(it: int) -> float:
        if it < warmup:
            return (it + 1) / (warmup + 1)
        if it < decay_start:
            return 1.0
        if it >= c.lr_decay_iters:
            return floor
        return floor + (1 - floor) * (c.lr_decay_iters - it) / max(1, c.lr_decay_iters - decay_start)

    return lr_scale


def set_lr(optimizers: list[torch.optim.Optimizer], scale: float) -> None:
    """Each group's rate = its peak rate x scale. The peak is the rate a group had when first seen
    here, kept in the group as "base_lr" (so in the optimizer's state_dict, and a resume keeps it):
    an optimizer builder needs to know nothing of schedules."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * scale
