"""The GPT language model: GPT-2 as in nanoGPT, plus the newer options of the modern recipe.

Pure PyTorch: this file knows nothing about Hydra, files or training. Defaults are GPT-2's.
References: GPT-2 (Radford et al. 2019), nanoGPT (Karpathy), rotary embeddings (Su et al. 2021),
QK-norm (Dehghani et al. 2023), ReLU^2 (So et al. 2021), logit soft-capping (Gemma 2),
document masking (doc_mask: attention within each document of a packed window, as Llama 3),
the maximal-update parametrization (muP: Yang et al. 2022, Tensor Programs V; docs/mup.md).
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from nanogpt.checks import NON_NEGATIVE, POSITIVE, PROBABILITY, OneOf, Rule, check, valid
from nanogpt.dropout import Dropout
from nanogpt.errors import UserError
from nanogpt.protocol import ParamGroup, default_param_groups


@dataclass
class GPTConfig:
    block_size: int = valid(1024, POSITIVE)  # longest context the model attends over
    vocab_size: int | None = valid(None, POSITIVE)  # None: taken from the data's vocabulary
    vocab_pad_multiple: int = valid(1, POSITIVE)  # pad the vocabulary to a multiple of this (64: GPT-2's 50304, faster matmuls)
    n_layer: int | None = valid(12, POSITIVE)  # None: set by depth
    n_head: int | None = valid(12, POSITIVE)
    n_embd: int | None = valid(768, POSITIVE)
    dropout: float = valid(0.0, PROBABILITY)
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2; False is a little better and faster
    activation: str = valid("gelu", OneOf("gelu", "gelu_tanh", "relu2"))  # gelu: exact (nanoGPT); gelu_tanh: Hugging Face GPT-2's
    norm: str = valid("layernorm", OneOf("layernorm", "rmsnorm"))
    pos_emb: str = valid("learned", OneOf("learned", "rope"))
    rope_base: float = valid(10000.0, POSITIVE)
    qk_norm: bool = False  # normalise queries and keys per head before attention
    tie_embeddings: bool = True  # share the token embedding with the LM head
    logit_softcap: float = valid(0.0, NON_NEGATIVE)  # >0: logits = c * tanh(logits / c)
    zero_init_proj: bool = False  # output projections (and an untied head) start at zero: blocks begin as the identity
    # the depth dial (model=depth, nanochat's --depth): one number sizes the model, the other keys still apply
    depth: int | None = valid(None, POSITIVE)  # n_layer = depth, n_embd = depth x aspect_ratio rounded up to head_dim's multiple
    aspect_ratio: int | None = valid(None, POSITIVE)  # with depth: width per layer (model=depth: 64)
    head_dim: int | None = valid(None, POSITIVE)  # with depth: channels per head, n_head = n_embd / head_dim (model=depth: 64)
    doc_mask: bool = False  # the trainer feeds each token's place in its document: attention within documents only
    parametrization: str = valid("sp", OneOf("sp", "mup"))  # sp: GPT-2's; mup: rates tuned at mup_base_width transfer (docs/mup.md)
    mup_base_width: int | None = valid(None, POSITIVE)  # the width at which muP is SP; None: this n_embd
    mup_zero_readout: bool = False  # muP: the untied LM head starts at zero (microsoft/mup's usual choice)
    _target_: str = "nanogpt.model.GPT"  # the model class this config builds; a user's own subclass: docs/extend.md

    # rules that join keys; {prefix} is where the config sits ("model." in a run's config)
    RULES: ClassVar[list[Rule]] = [
        ("{prefix}n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head})",
         lambda c: None in (c.n_embd, c.n_head) or c.n_embd % c.n_head == 0),
        ("{prefix}aspect_ratio and head_dim size a model by its depth: set {prefix}depth too (model=depth)",
         lambda c: c.depth is not None or (c.aspect_ratio is None and c.head_dim is None)),
        ("{prefix}mup_base_width ({c.mup_base_width}) must be divisible by n_head ({c.n_head}): muP's base head size",
         lambda c: None in (c.mup_base_width, c.n_head) or c.mup_base_width % c.n_head == 0),
        ("{prefix}mup_base_width and mup_zero_readout are muP's: set {prefix}parametrization=mup",
         lambda c: c.parametrization == "mup" or (c.mup_base_width is None and not c.mup_zero_readout)),
        ("{prefix}mup_zero_readout=true zeroes the LM head, which tied embeddings share with the token embedding: "
         "set {prefix}tie_embeddings=false", lambda c: not (c.mup_zero_readout and c.tie_embeddings)),
    ]

    @property
    def width_mult(self) -> float:
        """muP's width multiplier n_embd / mup_base_width (1 under SP and at the base width)."""
        if self.parametrization != "mup" or self.mup_base_width is None:
            return 1.0
        return self.n_embd / self.mup_base_width

    def __post_init__(self):
        try:
            check(self, "model.")
            if self.depth is not None:
                self._size_by_depth()
            unset = [k for k in ("n_layer", "n_head", "n_embd") if getattr(self, k) is None]
            if unset:
                raise UserError(f"model.{unset[0]} is not set: set it, or size the model with model.depth")
            check(self, "model.")
        except UserError as e:
            raise ValueError(str(e)) from None  # a constructor's bad argument

    def _size_by_depth(self) -> None:
        """n_layer, n_embd and n_head from depth (written here, once); each must be unset or agree."""
        if self.aspect_ratio is None or self.head_dim is None:
            raise UserError("model.depth needs model.aspect_ratio and model.head_dim (model=depth sets both to 64)")
        width = math.ceil(self.depth * self.aspect_ratio / self.head_dim) * self.head_dim
        for key, value in {"n_layer": self.depth, "n_embd": width, "n_head": width // self.head_dim}.items():
            given = getattr(self, key)
            if given is not None and given != value:
                raise UserError(f"model.depth={self.depth} sets model.{key}={value}, so model.{key}={given} conflicts: "
                                "set the depth or the shape, not both (model=depth leaves the shape to depth)")
            setattr(self, key, value)


def padded_vocab_size(config: GPTConfig, data_vocab_size: int) -> int:
    """The vocabulary a new model gets: its own vocab_size, else the data's, rounded up to a
    multiple of vocab_pad_multiple (64: GPT-2's 50257 -> 50304, faster matmuls)."""
    vocab, multiple = config.vocab_size or data_vocab_size, getattr(config, "vocab_pad_multiple", 1)  # any model's config
    return math.ceil(vocab / multiple) * multiple


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim)
    return nn.LayerNorm(dim, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embedding: rotates pairs of query/key channels by position-dependent angles,
    so q.k depends only on the distance between positions."""

    def __init__(self, head_dim: int, block_size: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("cos", torch.empty(block_size, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(block_size, head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The tables, computed where the buffers are (a model built on the meta device and
        materialised later needs them again: they are not in the state dict)."""
        arange = lambda n: torch.arange(n, dtype=torch.float32, device=self.cos.device)  # noqa: E731
        inv_freq = self.base ** (-arange(self.head_dim)[::2] / self.head_dim)
        angles = torch.outer(arange(self.cos.size(0)), inv_freq)  # (T, hs/2)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, x: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, nh, T, hs) at positions offset.. or, per row, positions (B, T)."""
        T = x.size(-2)
        if positions is None:
            cos, sin = self.cos[offset : offset + T], self.sin[offset : offset + T]
        else:
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (B, 1, T, hs/2)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def document_mask(positions: torch.Tensor, flex: bool = False):
    """Which keys each query sees when a window holds several documents: itself and the earlier
    tokens of its own document; a document starts where its position (B, T) is 0. A block-diagonal
    causal mask (B, 1, T, T) for scaled_dot_product_attention; flex: a flex_attention BlockMask,
    whose kernel skips the blocks no query of a document sees (fast on CUDA under torch.compile)."""
    docs = (positions == 0).cumsum(1)  # (B, T): each token's document
    B, T = positions.shape
    if flex:

        def same_document(b, h, q, kv):
            return (docs[b, q] == docs[b, kv]) & (q >= kv)

        return create_block_mask(same_document, B, None, T, T, device=positions.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        head_dim = config.n_embd // config.n_head
        # scores x 1/sqrt(d) (SP); muP: sqrt(d_base)/d, which keeps q.k's scale as q and k align
        # while training, and is 1/sqrt(d) at the base width (d_base = head size there)
        self.scale = None if config.parametrization == "sp" else 1.0 / math.sqrt(head_dim) / math.sqrt(config.width_mult)
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = Dropout(config.dropout)  # on the attention weights, as SDPA's dropout_p
        self.resid_dropout = Dropout(config.dropout)
        self.rotary = Rotary(head_dim, config.block_size, config.rope_base) if config.pos_emb == "rope" else None
        # QK-norm with the model's norm: LayerNorm as Dehghani et al., RMSNorm as modded-nanogpt
        self.q_norm = make_norm(config, head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, head_dim) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cache: "KVCache | None" = None, layer: int = 0,
                positions: torch.Tensor | None = None, mask=None) -> torch.Tensor:
        """positions (B, T) and mask (document_mask's): tokens of one document attend to each other only."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = cache.positions(T) if cache is not None else positions
        if self.rotary is not None:
            q, k = self.rotary(q, positions=positions), self.rotary(k, positions=positions)
        if cache is not None:
            k, v, visible = cache.update(layer, k, v)  # every cached token: (B, nh, L, hs); (B, 1, T, L)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.scale)
        elif isinstance(mask, BlockMask):  # documents, on CUDA under torch.compile: only their blocks computed
            y = flex_attention(q, k, v, block_mask=mask, scale=self.scale)
        elif self.attn_dropout.draws_own_mask(q):
            # SDPA's math path (which dropout forces on CPU anyway), with the mask drawn on all threads
            # scaling q (not q k^T) and adding the mask (not filling it in) leave less work for backward
            if mask is None:
                causal = torch.full((T, T), float("-inf"), device=q.device).triu(1)
            else:  # documents: -inf outside each one's causal block
                causal = torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
            att = ((q * (self.scale or 1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1) + causal).softmax(dim=-1)
            y = self.attn_dropout(att) @ v
        else:
            # fused attention kernels where the device has them; dropout on CPU forces the unfused math path
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_dropout.p if self.training else 0.0, is_causal=mask is None,
                scale=self.scale,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        if self.activation == "relu2":
            x = F.relu(x).square()
        else:
            x = F.gelu(x, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: "KVCache | None" = None, layer: int = 0,
                positions: torch.Tensor | None = None, mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, positions, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2, and the reference implementation of the model protocol (nanogpt.protocol)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size must be set (the trainer takes it from the data)")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=make_norm(config, config.n_embd),
            )
        )
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        self._init_residual_projections()
        if config.parametrization == "mup":
            self._init_mup()

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: Linear and Embedding weights N(0, 0.02), biases zero; norms keep ones/zeros."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _init_residual_projections(self) -> None:
        """Projections into the residual stream: std 0.02/sqrt(2*n_layer) (GPT-2 paper), or zero.
        zero_init_proj also zeroes an untied LM head (modded-nanogpt): uniform predictions at the
        start; measured on the char CPU recipe, 0.01-0.02 lower val loss after 300 Muon steps."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if self.config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        if self.config.zero_init_proj and not self.config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    @torch.no_grad()
    def _init_mup(self) -> None:
        """muP's init on top of SP's, equal to it at the base width: hidden matrices' variance
        x base/width (variance proportional to 1/fan_in: all their fan-ins grow with the width);
        embeddings, vectors and the stored readout as SP (the logits' multiplier carries the
        width), or a zero readout (mup_zero_readout)."""
        for g in default_param_groups(self):
            if g.kind == "hidden":
                for p in g.params:
                    p.mul_(1.0 / math.sqrt(self.config.width_mult))
        if self.config.mup_zero_readout:
            nn.init.zeros_(self.lm_head.weight)

    @property
    def blocks(self) -> nn.ModuleList:
        """The repeated layers: FSDP shards each, activation checkpointing wraps each."""
        return self.transformer.h

    def param_groups(self) -> list[ParamGroup]:
        """How every optimizer treats each parameter (nanogpt.protocol.ParamGroup): 2-D weights
        decay, 1-D ones do not; embeddings and the head stay with AdamW under Muon. muP (Adam's
        rule): hidden matrices' rate x base/width and their decay x width/base, so that AdamW's
        per-step shrink (rate x decay) stays put, as microsoft/mup's MuAdamW; the rest at the
        option's rate."""
        groups = default_param_groups(self)
        m = self.config.width_mult
        if self.config.parametrization == "mup":
            for g in groups:
                if g.kind == "hidden":
                    g.lr_scale, g.weight_decay_scale = 1.0 / m, g.weight_decay_scale * m
        return groups

    @torch.no_grad()
    def as_sp(self) -> "GPT":
        """The same function in SP form, for formats that know only SP (GPT-2's): muP's
        multipliers folded into the weights. The queries (or, with QK-norm, their gains) take the
        attention scale's sqrt(d_base/d), the LM head the logits' base/width; a tied head that
        must change is untied. Exact up to rounding."""
        c = self.config
        if c.parametrization == "sp":
            return self
        m, tied = c.width_mult, c.tie_embeddings and c.width_mult == 1
        sp = GPT(dataclasses.replace(c, parametrization="sp", mup_base_width=None, mup_zero_readout=False, tie_embeddings=tied))
        sp.load_state_dict(self.state_dict(), strict=False)  # an untied copy takes both names of a tied weight
        sp.lm_head.weight.mul_(1.0 / m)
        for block in sp.transformer.h:
            attn = block.attn
            targets = [attn.q_norm.weight, getattr(attn.q_norm, "bias", None)] if attn.q_norm is not None else \
                [attn.c_attn.weight[: c.n_embd], attn.c_attn.bias[: c.n_embd] if attn.c_attn.bias is not None else None]
            for t in targets:
                if t is not None:
                    t.mul_(1.0 / math.sqrt(m))
        return sp

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: "KVCache | None" = None,
                positions: torch.Tensor | None = None):
        """idx (B, T) -> (logits, loss). With a cache, idx follows the tokens cached so far: their
        keys and values are attended over, and idx's are appended (sampling). With doc_mask,
        positions (B, T) is each token's place in its document (0 where one starts): a window of
        several documents runs as each of them alone would."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        mask = None
        if positions is not None:  # flex_attention has no dropout: SDPA with the dense mask then
            flex = positions.is_cuda and torch.compiler.is_compiling() and not (self.training and self.config.dropout)
            mask = document_mask(positions, flex)
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if "wpe" in self.transformer:
            own = torch.arange(T, device=idx.device) if cache is None else cache.positions(T)
            x = x + self.transformer.wpe(own if positions is None else positions)  # (T or B x T, n_embd), broadcast
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, positions, mask)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.lengths += T

        if targets is None:
            # inference: only the last position's logits are needed
            return self._logits(x[:, [-1], :]), None
        logits = self._logits(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        if self.config.parametrization == "mup":
            logits = logits * (1.0 / self.config.width_mult)  # muP's readout multiplier (mup's MuReadout)
        if self.config.logit_softcap > 0:
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits.float() / c)
        return logits

    def reset_buffers(self) -> None:
        """Recompute the buffers a state dict does not hold (after materialising a meta-device model)."""
        for module in self.modules():
            if isinstance(module, Rotary):
                module.reset_buffers()

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context, e.g. to finetune GPT-2 (1024) with a shorter block."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            if block.attn.rotary is not None:
                block.attn.rotary.cos = block.attn.rotary.cos[:block_size]
                block.attn.rotary.sin = block.attn.rotary.sin[:block_size]


class KVCache:
    """The keys and values of the tokens a batch has seen, per layer, preallocated to block_size
    (B, n_head, block_size, head_dim), and each row's count of cached tokens. GPT.forward attends
    over it and appends to it; the model stays a pure module (the cache is an argument)."""

    def __init__(self, n_layer: int, batch_size: int, block_size: int, device: torch.device, static: bool = False):
        self.k: list[torch.Tensor | None] = [None] * n_layer  # allocated at the first write, in its dtype
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.block_size = block_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # static: attend over all block_size slots, masked, rather than up to the longest row: fixed
        # shapes, so a compiled decode step compiles once instead of once per length
        self.static = static

    @classmethod
    def empty(cls, model: "GPT", batch_size: int, device: torch.device, static: bool = False) -> "KVCache":
        return cls(model.config.n_layer, batch_size, model.config.block_size, device, static)

    def positions(self, T: int) -> torch.Tensor:
        """The positions (B, T) of T new tokens of each row."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append the new tokens' k, v (B, nh, T, hs) at each row's length; return the keys and
        values of every cached token (up to the longest row) and which of them each new token
        sees (B, 1, T, L): itself and those before it in its row."""
        B, nh, T, hs = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, nh, self.block_size, hs)
            self.v[layer] = v.new_zeros(B, nh, self.block_size, hs)
        at = self.positions(T)  # (B, T)
        rows = torch.arange(B, device=k.device)[:, None]
        self.k[layer][rows, :, at] = k.transpose(1, 2)  # indexed (B, T, nh, hs)
        self.v[layer][rows, :, at] = v.transpose(1, 2)
        L = self.block_size if self.static else int(at.max()) + 1
        visible = torch.arange(L, device=k.device) <= at[:, :, None]  # (B, T, L)
        return self.k[layer][:, :, :L], self.v[layer][:, :, :L], visible[:, None]

    def keep(self, rows: list[int]) -> None:
        """Only these rows, in this order, from now on."""
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.k = [None if t is None else t[index] for t in self.k]
        self.v = [None if t is None else t[index] for t in self.v]
        self.lengths = self.lengths[index]

    def fill(self, rows: list[int], one: "KVCache") -> None:
        """Copy a cache of one row into these rows (a prompt prefilled once, for each sample)."""
        for layer, (k, v) in enumerate(zip(one.k, one.v)):
            if self.k[layer] is None:
                self.k[layer] = k.new_zeros(len(self.lengths), *k.shape[1:])
                self.v[layer] = v.new_zeros(len(self.lengths), *v.shape[1:])
            self.k[layer][rows] = k
            self.v[layer][rows] = v
        self.lengths[rows] = one.lengths
