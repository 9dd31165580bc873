"""Weight averages: an exponential moving average (EMA) of a model's parameters kept during
training, and the mean of several checkpoints' weights.

During a constant or slowly decaying learning rate the raw weights look worse than they are: an
EMA shows, and often gives, the better model (the stable phase of a WSD schedule). The EMA lives
beside the parameters on each rank, shard by shard under FSDP (no communication), is updated after
every applied optimizer step, and is saved in every checkpoint (nanogpt/checkpoint.py). At iteration
`start` it is a copy of the weights; after each later step

    ema <- decay * ema + (1 - decay) * weights

an average over about 1 / (1 - decay) iterations. It works with any optimizer: it reads the
parameters, not the optimizer.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters by their state-dict names (wrappers' prefixes stripped, as a state
    dict strips them), a tied parameter once, under its first name."""
    seen, out = set(), {}
    for name, p in model.state_dict(keep_vars=True).items():
        if isinstance(p, nn.Parameter) and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's shard (a view: writing it writes the DTensor)."""
    return t._local_tensor if isinstance(t, DTensor) else t


class EMA:
    """The exponential moving average of a model's parameters, in their dtype, device and sharding."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        self.decay, self.start = decay, start
        self.params = named_parameters(model)
        with torch.no_grad():
            self.averages = {name: p.detach().clone() for name, p in self.params.items()}

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [_local(a) for a in self.averages.values()], [_local(p) for p in self.params.values()]

    @torch.no_grad()
    def update(self, iter_num: int) -> None:
        """After the step that completed iteration iter_num: a copy of the weights up to `start`,
        then a step towards them. One fused kernel per dtype and device (torch._foreach_*)."""
        averages, params = self._pairs()
        if iter_num <= self.start:
            torch._foreach_copy_(averages, params)
        else:
            torch._foreach_lerp_(averages, params, 1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """The averages set to the weights as they are now (a resumed run that turns the EMA on)."""
        torch._foreach_copy_(*self._pairs())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (DTensors under FSDP: Distributed Checkpoint reshards them)."""
        return dict(self.averages)

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        """Whole tensors (a ckpt.pt), each rank taking its own shard of a sharded parameter."""
        for name, average in self.averages.items():
            value = saved[name].to(device=average.device, dtype=average.dtype)
            if isinstance(average, DTensor):  # every rank holds the whole tensor: no communication
                value = distribute_tensor(value, average.device_mesh, average.placements, src_data_rank=None)
            average.copy_(value)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """The model runs with the averages as its weights inside the block (evaluation); its own
        come back after. Swapped tensor by tensor, in place: no second copy of the model, and
        compiled and sharded wrappers see the same tensors."""
        self._swap(model)
        try:
            yield
        finally:
            self._swap(model)

    @torch.no_grad()
    def _swap(self, model: nn.Module) -> None:
        for average, param in zip(*self._pairs()):
            held = param.clone()
            param.copy_(average)
            average.copy_(held)
        _drop_gathered(model)


def _drop_gathered(model: nn.Module) -> None:
    """FSDP may keep whole weights gathered from the shards after a forward without backward:
    dropped, the next forward gathers the shards as they are now."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def load_averages(model: nn.Module, averages: dict[str, torch.Tensor]) -> None:
    """Give a whole (unsharded) model the weights of an EMA's state dict."""
    with torch.no_grad():
        for name, p in named_parameters(model).items():
            p.copy_(averages[name])


def mean_state_dict(state_dicts: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts, read one at a time: summed in float64 in the order
    given, divided by their count, rounded once to each tensor's dtype. Tensors that are not
    floating point (counters) are the last dict's."""
    total, count, last = {}, 0, {}
    for sd in state_dicts:
        count += 1
        for k, v in sd.items():
            if v.is_floating_point():
                total[k] = total[k] + v.double() if k in total else v.double()
            last[k] = v
    return {k: (total[k] / count).to(v.dtype) if k in total else v for k, v in last.items()}
