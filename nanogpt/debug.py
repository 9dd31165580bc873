"""What the debug presets (conf/debug/) switch on, each also a key of its own (DebugConfig):

- debug.overfit: the first iteration's batches, again and again: the loss must fall towards zero;
- debug.profile: torch.profiler over a window of steps; a Chrome/Perfetto trace in the run folder
  and the top operators by time in the log;
- debug.anomaly: autograd's anomaly detection, and the first module whose output is not finite
  stops the run, named;
- debug.read_back: after the last step, the checkpoint loaded back must hold the trained weights,
  and a few tokens are sampled from it;
- debug.memory_history: CUDA allocations recorded; an out-of-memory error writes a snapshot.

The trainer wraps its loop in instruments() and its run in oom_snapshot(); the loop takes its
batches from train_batches() and calls the profiler's step after each train_step.
"""

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from nanogpt.checkpoint import latest_checkpoint, model_from_state, read_checkpoint
from nanogpt.config import DebugConfig, ProfileConfig
from nanogpt.errors import Diverged
from nanogpt.model import GPT
from nanogpt.sampling import Sampling, generate
from nanogpt.tokenizer import tokenizer_from_meta

log = logging.getLogger("nanogpt")


def train_batches(loader, start_iter: int, overfit: bool,
                  skipped: list[list[int]] = ()) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's micro-batches from start_iter on (past the windows rollbacks skipped);
    overfit: iteration 0's, again and again."""
    return _first_iteration_repeated(loader) if overfit else loader.train_batches(start_iter, skipped)


def _first_iteration_repeated(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    batches = loader.train_batches(0)
    try:
        first = [next(batches) for _ in range(loader.micro_steps)]
    finally:
        batches.close()  # stops its prefetch thread
    while True:
        yield from first


@contextmanager
def instruments(debug: DebugConfig, model: GPT, device: torch.device, run_dir: Path, rank: int,
                start_iter: int) -> Iterator[Callable[[], None] | None]:
    """Around the loop, which starts at start_iter: anomaly detection and the non-finite checks, the
    profiler. Yields what to call after each training step (the profiler's step), or None."""
    with ExitStack() as stack:
        if debug.anomaly:
            stack.enter_context(torch.autograd.detect_anomaly())
            stack.enter_context(nonfinite_checks(model))
        yield stack.enter_context(profiling(debug.profile, device, run_dir, rank, start_iter)) if debug.profile else None


@contextmanager
def nonfinite_checks(model: torch.nn.Module) -> Iterator[None]:
    """The first module where a NaN or an inf arises, named, in forward or in backward.

    Forward: a hook on every module raises when its output is not finite. A module's hook runs as
    it returns, inner modules before the outer ones that call them, so the first hook to see a
    non-finite value names the module where it arose. Backward: as a module returns, the autograd
    nodes its forward made (those numbered since it was called, not yet claimed by an inner
    module) are marked with its name and get a hook that raises when a gradient they compute is
    not finite; the engine runs it before anomaly mode's own check, whose forward traceback (a
    warning) is then not printed."""

    def check(name: str):
        def hook(module, args, output):
            outputs = output if isinstance(output, tuple) else (output,)
            if any(isinstance(o, torch.Tensor) and not torch.isfinite(o).all() for o in outputs):
                raise Diverged(f"debug.anomaly: the first output that is not finite is {name}'s "
                               f"({type(module).__name__}): look at its weights, its inputs and the learning rate")
            if torch.is_grad_enabled():
                claim_nodes(outputs, starts.pop(id(module), None), f"{name}'s ({type(module).__name__})")

        return hook

    starts: dict[int, int] = {}  # module -> the first autograd node number of its running forward

    def start(module, args):
        if torch.is_grad_enabled():
            starts[id(module)] = _next_node_number()

    handles = []
    for name, m in model.named_modules():
        handles += [m.register_forward_pre_hook(start), m.register_forward_hook(check(name or "the model"))]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Error detected in ")  # anomaly mode's forward traceback
            yield
    except RuntimeError as e:  # anomaly mode's own check, for a node no module made
        if "returned nan values" not in str(e):
            raise
        raise Diverged(f"debug.anomaly: {str(e).splitlines()[0]}") from None
    finally:
        for h in handles:
            h.remove()


def _next_node_number() -> int:
    """The sequence number the next autograd node of this thread gets (it takes this one)."""
    return torch.empty(0, requires_grad=True).view(0).grad_fn._sequence_nr() + 1


def claim_nodes(outputs: tuple, first: int | None, owner: str) -> None:
    """Mark the unclaimed autograd nodes numbered first or later behind outputs as owner's, each
    with a hook that raises when a gradient it computes is not finite."""
    if first is None:
        return
    stack = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node._sequence_nr() < first:
            continue
        seen.add(node)
        stack += [n for n, _ in node.next_functions]
        if "nanogpt_module" not in node.metadata:
            node.metadata["nanogpt_module"] = owner
            node.register_hook(_gradient_check(node, owner))


def _gradient_check(node, owner: str):
    def hook(grad_inputs, grad_outputs):
        if any(g is not None and not torch.isfinite(g).all() for g in grad_inputs):
            raise Diverged(f"debug.anomaly: the first gradient that is not finite comes from {owner} backward "
                           f"({node.name()}): look at its inputs, its weights and the learning rate")

    return hook


@contextmanager
def profiling(p: ProfileConfig, device: torch.device, run_dir: Path, rank: int,
              start_iter: int) -> Iterator[Callable[[], None]]:
    """torch.profiler on this rank over the training steps wait+warmup+1 .. wait+warmup+active
    after start_iter; yields its step. When the window closes: trace_rank<r>.json (Chrome trace
    format, opened by Perfetto) and the operators taking the most time, by their own time (not
    their callees')."""
    first = start_iter + p.wait + p.warmup + 1  # as the log lines count: "iter n" follows the n-th step
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    trace = Path(run_dir) / f"trace_rank{rank}.json"

    def ready(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(trace))
        table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=p.row_limit)
        log.info(f"profile of iterations {first}-{first + p.active - 1} in {trace}: "
                 f"open it in https://ui.perfetto.dev (or chrome://tracing)\n{table}")

    schedule = torch.profiler.schedule(wait=p.wait, warmup=p.warmup, active=p.active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=ready) as prof:
        yield prof.step


def read_back(run_dir: Path, model: GPT, meta: dict, tokens: int, is_main: bool) -> None:
    """debug.read_back, on every rank (a sharded model's weights are gathered): the run's latest
    checkpoint, loaded as sample.py and a resume load it, must equal the trained weights; rank 0
    then samples a few tokens from it."""
    trained = {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in model.state_dict().items()}
    if not is_main:
        return
    path = latest_checkpoint(run_dir)
    if path is None:
        log.warning("debug.read_back: this run wrote no checkpoint (eval_only, or max_iters=0)")
        return
    loaded = model_from_state(read_checkpoint(path), trusted=[model.config._target_])  # the run's own class
    differ = [k for k, v in loaded.state_dict().items() if not torch.equal(v, trained[k])]
    if differ:
        raise RuntimeError(f"debug.read_back: {path} differs from the trained weights in {', '.join(differ)}")
    (row,) = generate(loaded, [[0]], 1, tokens, Sampling(top_k=200))  # from token 0, as any vocabulary has one
    log.info(f"debug.read_back: {path} holds the trained weights ({len(trained)} tensors); sampled from it: "
             f"{tokenizer_from_meta(meta).decode(row.tokens[1:])!r}")


@contextmanager
def oom_snapshot(enabled: bool, run_dir: Path, rank: int) -> Iterator[None]:
    """debug.memory_history on CUDA: every allocation is recorded with its stack; a CUDA
    out-of-memory error writes them to memory_snapshot_rank<r>.pickle in the run folder (drop it on
    https://pytorch.org/memory_viz) and says what to lower."""
    if not (enabled and torch.cuda.is_available()):
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        yield
    except torch.OutOfMemoryError:
        path = Path(run_dir) / f"memory_snapshot_rank{rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        log.error(f"CUDA out of memory; what held the memory: {path} (open in https://pytorch.org/memory_viz). Lower "
                  "data.batch_size (raise gradient_accumulation_steps to keep the tokens per iteration), or "
                  "model.block_size, or set system.activation_checkpointing=1 or system.parallelism=fsdp")
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
