"""What nanogpt asks of the code a `_target_` names: the model protocol and each group's builder
contract. nanogpt's GPT (model.py) and its builders (optim.py, data.py, tasks.py, tracking.py)
are the reference implementations; a user's own class or function meets the same contract and
is named in config (docs/extend.md).

The model: an nn.Module built as `Model(config)` from its config dataclass, with

    config        the dataclass: block_size, vocab_size (None in the YAML: the data's), n_layer
    blocks        an nn.ModuleList of the repeated layers: FSDP shards each, activation
                  checkpointing wraps each (system.activation_checkpointing)
    forward(idx, targets=None, cache=None, **optional) -> (logits, loss)
                  idx, targets (B, T) token ids, -1 in targets ignored; cache a model.KVCache
                  (sampling: layer i attends over cache.update(i, k, v), the model adds T to
                  cache.lengths); optional inputs have defaults (room for e.g. document starts)
    param_groups() -> list[ParamGroup]
                  how every optimizer builder treats each parameter (default_param_groups:
                  GPT's decay / no-decay split)

and, used when present: reset_buffers() (recompute non-persistent buffers after FSDP builds
the model on the meta device), crop_block_size(n) (a shorter model.block_size than a loaded
checkpoint's), flops_per_token() (MFU and the FLOPs records; else nanogpt.flops counts).

The builders, each called with its group's option (a dataclass, or an untyped option read by
attribute) and keywords: see BUILDER_KEYWORDS. An optimizer builder returns one
torch.optim.Optimizer or a list, built from model.param_groups(); its option has a
`learning_rate` (the schedule multiplies it). A schedule builder returns a function of the
iteration giving a multiplier of each group's peak rate.
"""

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from nanogpt.errors import UserError

KINDS = ("embedding", "hidden", "head", "vector")
MODEL_CONFIG_KEYS = ("block_size", "vocab_size", "n_layer")
# the keywords each group's builder is called with, beside its option (nanogpt.config.build)
BUILDER_KEYWORDS = {
    "model": (),
    "data": (),
    "optim": ("model", "device_type"),
    "schedule": ("learning_rate",),
    "logger": ("config", "run", "resume_id", "resume_iter"),
    "eval": ("name", "cache_dir"),
}


@dataclass
class ParamGroup:
    """Parameters an optimizer treats alike. The model says what they are and how their rates
    differ from the option's; every optimizer builder honours it (nanogpt.optim.torch_groups).

    kind: muP's classes of weights (Tensor Programs V), which also say who steps what:
      embedding  lookup tables (token, position): AdamW's under Muon
      hidden     matrices inside the blocks, both dimensions growing with width: Muon's
      head       the readout (an untied LM head): AdamW's under Muon
      vector     biases, norm gains, other 1-D parameters: never decayed by default
    """

    params: list[nn.Parameter]
    kind: str
    lr_scale: float = 1.0  # this group's peak rate = the option's rate x lr_scale (muP: base_width / width)
    weight_decay_scale: float = 1.0  # its weight decay = the option's x this (0: not decayed)
    extra: dict[str, Any] = field(default_factory=dict)  # more torch param-group keys, passed as they are

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ParamGroup kind {self.kind!r} is not one of {', '.join(KINDS)}")


@runtime_checkable
class LanguageModel(Protocol):
    """The model protocol (module docstring); GPT is its reference implementation."""

    config: Any
    blocks: nn.ModuleList

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None,
                **optional) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def param_groups(self) -> list[ParamGroup]: ...


def default_param_groups(model: nn.Module) -> list[ParamGroup]:
    """GPT-2's treatment, told by structure: Embedding tables, 2-D weights inside model.blocks
    (hidden), other 2-D weights (the head), 1-D parameters (vectors, not decayed). Each group in
    parameter order; a tied weight counts once, as the embedding it is."""
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    in_blocks = {id(p) for p in model.blocks.parameters()}
    by_kind: dict[str, list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        kind = ("vector" if p.dim() < 2 else "embedding" if id(p) in embedding
                else "hidden" if id(p) in in_blocks else "head")
        by_kind.setdefault(kind, []).append(p)
    return [ParamGroup(params, kind, weight_decay_scale=0.0 if kind == "vector" else 1.0)
            for kind, params in by_kind.items()]


def check_model(model: object, target: str) -> None:
    """One line naming what a built model lacks of the protocol."""
    missing = []
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        missing.append("config (its config dataclass)")
    elif absent := [k for k in MODEL_CONFIG_KEYS if not hasattr(config, k)]:
        missing.append(f"config.{'/'.join(absent)}")
    if not isinstance(model, nn.Module):
        missing.append("nn.Module as its base")
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        missing.append("blocks (an nn.ModuleList of the repeated layers)")
    if not _accepts(getattr(model, "forward", None), None, targets=None, cache=None):
        missing.append("forward(idx, targets=None, cache=None)")
    if not callable(getattr(model, "param_groups", None)):
        missing.append("param_groups() (e.g. return nanogpt.protocol.default_param_groups(self))")
    if missing:
        raise UserError(f"model._target_={target} lacks {', '.join(missing)}: the model protocol, docs/extend.md")


def check_builder(builder: Callable, key: str, target: str) -> None:
    """One line when a builder cannot take its group's arguments (before it is ever called)."""
    keywords = BUILDER_KEYWORDS[key.split(".")[0]]
    if not _accepts(builder, None, **dict.fromkeys(keywords)):
        wanted = f"(option{', *, ' + ', '.join(keywords) if keywords else ''})"
        raise UserError(f"{key}._target_={target} does not take a {key.split('.')[0]} builder's arguments {wanted}: "
                        "docs/extend.md")


def as_optimizers(built, target: str) -> list[torch.optim.Optimizer]:
    """An optimizer builder's result as a list; anything else is one line."""
    optimizers = list(built) if isinstance(built, (list, tuple)) else [built]
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise UserError(f"optim._target_={target} returned {type(built).__name__}, not a torch.optim.Optimizer or a list of them")
    return optimizers


def as_schedule(built, target: str) -> Callable[[int], float]:
    if not callable(built):
        raise UserError(f"schedule._target_={target} returned {type(built).__name__}, not a function of the iteration")
    return built


def _accepts(fn, *args, **kwargs) -> bool:
    if not callable(fn):
        return False
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):  # ValueError: no signature to read (some builtins)
        return False
    return True
