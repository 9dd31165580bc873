"""Process roles for data parallelism, on torch.distributed.

A training process is one of:
- a rank that joins: started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT set), by this
  module's own spawn, or one task of a multi-task `srun` step (a submitit job with
  tasks_per_node > 1), whose rendezvous submitit's TorchDistributedEnvironment provides;
- a launcher: `system.nproc_per_node > 1` in a plain process (a Hydra job, a multirun job, a
  SLURM array task) starts that many ranks with PyTorch's elastic launcher and waits;
- a single process.
SLURM_PROCID/SLURM_NTASKS alone do not make a rank: a `sbatch -n2` batch script has them with
no peers, so only an srun step (SLURM_STEP_NUM_TASKS > 1) joins.
"""

import os
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt.config import SystemConfig, build
from nanogpt.device import use_compile
from nanogpt.dropout import set_parallel_dropout
from nanogpt.errors import UserError
from nanogpt.model import GPT


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    # in a process group: every rank torchrun, srun or the in-job spawn started, a lone one too
    # (as nanoGPT's: `torchrun --nproc_per_node=1` trains through DDP, on NCCL where CUDA is)
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def srun_step_env() -> bool:
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ


def is_rank_process() -> bool:
    return torchrun_env() or srun_step_env()


def setup(system: SystemConfig, device_type: str) -> DistInfo:
    """Join the process group if this process is a rank; set its CPU threads either way."""
    if not torchrun_env() and srun_step_env():
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if not torchrun_env():
        info = DistInfo()
    else:
        info = DistInfo(
            rank=int(os.environ["RANK"]),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            enabled=True,
        )
    torch.set_num_threads(num_threads(system, info.local_world_size))
    if info.enabled:
        backend = system.backend if system.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=system.dist_timeout_s))
    return info


def parallelize(model: GPT, system: SystemConfig, device: torch.device, info: DistInfo) -> nn.Module:
    """The one place that wraps a model for training, in torchtitan's order: activation
    checkpointing, torch.compile, then DDP (or, for system.parallelism=fsdp, see shard()). The
    result runs forward and backward (and evaluation, as in nanoGPT); the model passed in stays
    the plain module that is saved, so checkpoints never carry _orig_mod. or module. prefixes."""
    checkpoint_activations(model, system.activation_checkpointing)
    if use_compile(system, device):
        model = torch.compile(model)
    if info.enabled:
        model = DDP(model, device_ids=[info.local_rank] if device.type == "cuda" else None)
    return model


def sharded(system: SystemConfig, info: DistInfo) -> bool:
    """Whether the model is sharded over the ranks (FSDP2); one process holds it whole anyway."""
    return system.parallelism == "fsdp" and info.enabled


def shard(build_whole: Callable[[], GPT], system: SystemConfig, device: torch.device, dtype: torch.dtype, info: DistInfo) -> GPT:
    """A model built whole on rank 0 only (new, pretrained or from a checkpoint) and sharded over
    the ranks with FSDP2, per block and at the root: every rank materialises its shards of a
    meta-device copy, then takes rank 0's weights by broadcast, so the weights equal an unsharded
    build of the same seed and no other rank ever holds the whole model. The returned module is
    both what runs forward and backward and what is saved (its parameters are DTensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    whole, error = None, None
    if info.is_main:
        try:
            whole = build_whole()
        except UserError as e:  # every rank stops with rank 0's message, none waits for it
            error = str(e)
    config, error = broadcast_object((whole.config if whole is not None else None, error), info)
    if error:
        raise UserError(error)
    with torch.device("meta"):
        model = build(config)
    set_parallel_dropout(model, system.parallel_dropout)
    checkpoint_activations(model, system.activation_checkpointing)
    # on CUDA, parameters gathered in the autocast dtype and gradients reduced in fp32
    low = dtype if device.type == "cuda" and dtype != torch.float32 else None
    options = dict(mesh=init_device_mesh(device.type, (info.world_size,)), reshard_after_forward=system.reshard_after_forward,
                   mp_policy=MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None))
    for block in model.blocks:
        if use_compile(system, device):
            block.compile()  # in place: no _orig_mod. prefix in the saved names
        fully_shard(block, **options)
    fully_shard(model, **options)
    model.to_empty(device=device)
    if hasattr(model, "reset_buffers"):  # buffers a state dict does not hold (the model protocol)
        model.reset_buffers()
    set_model_state_dict(model, whole.state_dict() if whole is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def checkpoint_activations(model: GPT, every: int) -> None:
    """Recompute every k-th block's activations in backward instead of keeping them (k=0: none).
    The blocks are wrapped in place; their saved names stay the same (the wrapper strips its
    prefix), and the recomputation replays the forward's RNG state, so dropout masks match."""
    if every <= 0:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.blocks
    for i in range(0, len(blocks), every):
        blocks[i] = checkpoint_wrapper(blocks[i])


def gradient_sync(model: nn.Module, enabled: bool) -> AbstractContextManager:
    """Whether this micro-step's backward synchronises gradients across ranks: with gradient
    accumulation only the last micro-step of an iteration needs to (FSDP then keeps whole
    gradients until it: see system.reduce_every_micro_step)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return model.no_sync() if isinstance(model, DDP) and not enabled else nullcontext()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def num_threads(system: SystemConfig, local_world_size: int) -> int:
    """CPU threads per rank: the CPUs this process may use, shared by the ranks on this node
    (torchrun sets OMP_NUM_THREADS=1 for several ranks; the elastic API and submitit do not)."""
    if system.num_threads:
        return system.num_threads
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
    sharing = 1 if srun_step_env() else local_world_size  # srun gives each task its own CPUs
    return max(1, cpus // sharing)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of obj on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's obj, in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


MONITOR_INTERVAL_S = 0.2  # how often the in-job launcher looks for dead ranks: a fraction of a second


def outlive_first_failure() -> None:
    """Called by a rank that failed after a peer did. The in-job launcher, finding several ranks
    dead at one look, reports the lowest: outliving the peer's exit by a few looks makes it report
    the peer's error, not this rank's vaguer one ("connection closed by peer")."""
    time.sleep(5 * MONITOR_INTERVAL_S)


def spawn(fn: Callable, args: tuple, nproc: int, system: SystemConfig):
    """Run fn(*args) in nproc local ranks with PyTorch's elastic launcher; return rank 0's result.
    A failing rank ends the others and raises ChildFailedError with its error."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"nanogpt-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=MONITOR_INTERVAL_S,
        start_method="spawn",
    )
    if nproc > torch.cuda.device_count() and system.device.startswith("cuda"):
        raise UserError(f"system.nproc_per_node={nproc} but only {torch.cuda.device_count()} CUDA devices")
    return elastic_launch(config, fn)(*args)[0]
