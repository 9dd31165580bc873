"""Optimizers with weight-decay groups, and learning-rate schedules.

Builders take the optim/schedule group's keys plus runtime dependencies as keywords, and are
named by the group's `_target_`. Optimizers come as a list: Muon needs AdamW beside it.
Each parameter group keeps its peak rate in "base_lr"; the schedule scales all of them alike.
"""

import math
from collections.abc import Callable

import torch
import torch.nn as nn


def decay_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float, lr: float) -> list[dict]:
    """2-D tensors (matmul weights, embeddings) decay; biases, norms and gains (1-D) do not."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr},
    ]
    return [g for g in groups if g["params"]]


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights appear once


def use_fused(fused: bool | None, device_type: str) -> bool:
    # fused AdamW runs on CUDA and, since PyTorch 2.4, on CPU
    return device_type in ("cuda", "cpu") if fused is None else fused


def build_adamw(
    learning_rate: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    fused: bool | None,
    *,
    model: nn.Module,
    device_type: str,
) -> list[torch.optim.Optimizer]:
    groups = decay_groups(trainable(model), weight_decay, learning_rate)
    return [torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=use_fused(fused, device_type))]


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


def build_muon(
    learning_rate: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    fused: bool | None,
    muon_learning_rate: float,
    muon_momentum: float,
    muon_weight_decay: float,
    *,
    model: nn.Module,
    device_type: str,
) -> list[torch.optim.Optimizer]:
    """Muon (Jordan et al. 2024) orthogonalises the momentum of the hidden 2-D weights with
    Newton-Schulz iterations; embeddings, the LM head and 1-D parameters stay with AdamW."""
    params = trainable(model)
    hidden = [(n, p) for n, p in params if p.dim() == 2 and n.startswith("transformer.h.")]
    hidden_ids = {id(p) for _, p in hidden}
    rest = [(n, p) for n, p in params if id(p) not in hidden_ids]
    muon = Muon(
        [{"params": [p for _, p in hidden], "lr": muon_learning_rate, "base_lr": muon_learning_rate}],
        lr=muon_learning_rate,
        momentum=muon_momentum,
        weight_decay=muon_weight_decay,
        adjust_lr_fn="match_rms_adamw",  # scale the update to AdamW's RMS, so rates transfer across shapes
    )
    adamw = torch.optim.AdamW(
        decay_groups(rest, weight_decay, learning_rate),
        lr=learning_rate,
        betas=(beta1, beta2),
        fused=use_fused(fused, device_type),
    )
    return [muon, adamw]


def cosine_schedule(
    decay_lr: bool, warmup_iters: int, lr_decay_iters: int, min_lr: float, *, learning_rate: float
) -> Callable[[int], float]:
    """nanoGPT's get_lr, as a multiplier of each group's peak rate."""

    def lr_scale(it: int) -> float:
        # 1) linear warmup for warmup_iters steps; (it + 1) so the first step does not get lr 0
        if it < warmup_iters:
            return (it + 1) / (warmup_iters + 1)
        if not decay_lr:
            return 1.0
        floor = min_lr / learning_rate
        # 2) past lr_decay_iters, the floor
        if it > lr_decay_iters:
            return floor
        # 3) in between, cosine decay from 1 down to the floor
        ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1 - floor)

    return lr_scale


def wsd_schedule(
    warmup_iters: int, lr_decay_iters: int, decay_fraction: float, min_lr: float, *, learning_rate: float
) -> Callable[[int], float]:
    """Warmup-stable-decay (trapezoid): linear warmup, flat, then linear decay to min_lr over the
    last decay_fraction of lr_decay_iters (Hägele et al. 2024)."""
    decay_start = lr_decay_iters - int(decay_fraction * lr_decay_iters)

    def lr_scale(it: int) -> float:
        floor = min_lr / learning_rate
        if it < warmup_iters:
            return (it + 1) / (warmup_iters + 1)
        if it < decay_start:
            return 1.0
        if it >= lr_decay_iters:
            return floor
        return floor + (1 - floor) * (lr_decay_iters - it) / max(1, lr_decay_iters - decay_start)

    return lr_scale


def set_lr(optimizers: list[torch.optim.Optimizer], scale: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
