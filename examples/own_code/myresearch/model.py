"""GPT with a SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"): everything else is
nanogpt's GPT, which this class extends. The model protocol (nanogpt/protocol.py) comes with
it: config, blocks, forward, param_groups."""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from nanogpt.model import GPT, GPTConfig


@dataclass
class SwiGLUConfig(GPTConfig):
    _target_: str = "myresearch.model.SwiGLUGPT"
    hidden_multiple: int = 32  # the hidden width, 8/3 n_embd (as many weights as GELU's 4 n_embd), rounded up to this


class SwiGLU(nn.Module):
    def __init__(self, config: SwiGLUConfig):
        super().__init__()
        m = config.hidden_multiple
        hidden = m * math.ceil(8 * config.n_embd / 3 / m)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # the gate and the value, in one matmul
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        # GPT-2's init: N(0, 0.02), the projection into the residual stream scaled by 1/sqrt(2 n_layer)
        nn.init.normal_(self.c_fc.weight, std=0.02)
        nn.init.normal_(self.c_proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))
        for linear in (self.c_fc, self.c_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * value)


class SwiGLUGPT(GPT):
    def __init__(self, config: SwiGLUConfig):
        super().__init__(config)
        for block in self.blocks:
            block.mlp = SwiGLU(config)
