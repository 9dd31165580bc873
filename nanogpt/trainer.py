"""The training loop: one function per rank, from a typed config to a trained checkpoint.

train() reads as a table of contents: where (ranks, device), what (data and model, wrapped by
distributed.parallelize), how (optimizers, schedule, batches), from where (a checkpoint), then
the loop. The loop is nanoGPT's: evaluate and checkpoint every eval_interval, one train_step per
iteration (micro-steps with gradient accumulation, clipping, the optimizer step, the EMA), a log
line every log_interval; a loss spike is warned about, skipped or rolled back (nanogpt/spikes.py).
train_step is also what bench.py times. To change training, edit the loop.
"""

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from omegaconf import OmegaConf

from nanogpt import distributed
from nanogpt.averaging import EMA
from nanogpt.checkpoint import (BEST, Checkpointer, TrainState, latest_checkpoint, load_model, model_from_state,
                                read_checkpoint, resume_state)
from nanogpt.config import SystemConfig, TrainConfig, build, to_dict
from nanogpt.debug import instruments, oom_snapshot, read_back, train_batches
from nanogpt.device import autocast, configure_backends, memory_mb, resolve_device, resolve_dtype, use_compile
from nanogpt.dropout import set_parallel_dropout
from nanogpt.errors import Diverged, Interrupted, UserError
from nanogpt.evaluation import Evaluator
from nanogpt.flops import budget_iters, flops_per_token, params, params_non_embedding, peak_flops
from nanogpt.model import GPT, padded_vocab_size
from nanogpt.optim import set_lr
from nanogpt.protocol import as_optimizers, as_schedule, check_model
from nanogpt.rundir import (MetricsLog, RunInfo, provenance, read_status, seconds_since_process_start, update_status,
                            write_status, writer_lock)
from nanogpt.spikes import Spike, SpikeMonitor, describe
from nanogpt.targets import trusted_names
from nanogpt.tokenizer import definition, tokenizer_from_meta
from nanogpt.tracking import Recorder, start_trackers

log = logging.getLogger("nanogpt")


def launch(config: TrainConfig, run: RunInfo) -> float:
    """Train in this process, or start system.nproc_per_node ranks and wait for them (holding the
    run folder's lock for them). A compute budget becomes max_iters first, before the run folder
    is touched."""
    config = budgeted(config, run.overrides)
    nproc = config.system.nproc_per_node
    if distributed.is_rank_process() or nproc == 1:
        return train(config, run)
    with writer_lock(run.run_dir):
        return distributed.spawn(_rank_entry, (config, run), nproc, config.system)


def budgeted(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """The config with max_iters, and so the schedule's end, set by tokens_per_param or
    flops_budget from the model's size: the model is built on the meta device (no memory, no
    weights) with the data's vocabulary, the data prepared here on first use. No budget: as it is."""
    key = "tokens_per_param" if config.tokens_per_param is not None else "flops_budget"
    if getattr(config, key) is None:
        return config
    explicit = [o for o in overrides if o.lstrip("+~").startswith("max_iters=")]
    if explicit:
        raise UserError(f"{key}={getattr(config, key):g} sets max_iters: drop {explicit[0]}")
    if config.init_from not in ("scratch", "resume"):
        raise UserError(f"{key} sizes a run trained from scratch, not from init_from={config.init_from}: set max_iters")
    data = build(config.data)
    data.prepare()
    with torch.device("meta"):
        model = build_model(dataclasses.replace(config, init_from="scratch"), data.meta, None)
    max_iters = budget_iters(params_non_embedding=params_non_embedding(model), flops_per_token=flops_per_token(model),
                             tokens_per_iter=tokens_per_iter(config, model.config.block_size),
                             tokens_per_param=config.tokens_per_param, flops_budget=config.flops_budget)
    schedule = dataclasses.replace(config.schedule, lr_decay_iters=max_iters)  # its end follows max_iters (a rule)
    return dataclasses.replace(config, max_iters=max_iters, schedule=schedule)


def _rank_entry(config: TrainConfig, run: RunInfo) -> float:
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(train)(config, run, hold_lock=False)  # record: the launcher shows this rank's error


def train(config: TrainConfig, run: RunInfo, hold_lock: bool = True) -> float:
    """Train on this rank; return the best val loss. Rank 0 writes the run folder, holding its
    lock (hold_lock=False: a parent process holds it)."""
    # 1) where: this process's rank, device and precision, and the run folder
    dist = distributed.setup(config.system, resolve_device(config.system).type)  # checks the device early
    with writer_lock(run.run_dir) if dist.is_main and hold_lock else nullcontext():
        return _train(config, run, dist)


def _train(config: TrainConfig, run: RunInfo, dist: distributed.DistInfo) -> float:
    run_dir = open_run_dir(run, dist)
    with recorded_status(run_dir, dist), oom_snapshot(config.debug.memory_history, run_dir, dist.rank):
        device, dtype = set_up_rank(config.system, dist)

        # 2) what: the data (rank 0 prepares it on first use), the model, wrapped for this world
        data = build(config.data)
        if dist.is_main:
            data.prepare()
        distributed.broadcast_object(None, dist)  # a barrier that works on every backend
        saved = resume_state(run_dir, config.init_from)
        if saved is not None:
            warn_unused_overrides(config, run.overrides, saved)
        # 3) how: the model built and wrapped for this world, optimizers, loss scaling, schedule, batches
        training = build_training(config, lambda: build_model(config, data.meta, saved), device, dtype, dist)
        raw_model = training.raw_model
        lr_scale = as_schedule(build(config.schedule, learning_rate=config.optim.learning_rate), config.schedule._target_)
        loader = data.loader(block_size=raw_model.config.block_size, device=device, seed=config.system.seed,
                             rank=dist.rank, world_size=dist.world_size, micro_steps=training.micro_steps,
                             documents=getattr(raw_model.config, "doc_mask", False), max_iters=config.max_iters)
        # the eval group's tasks, resolved now: a task file that cannot be had stops the run here
        evaluator = None
        if config.eval.tasks and (config.eval.interval or config.eval_only):
            evaluator = Evaluator(config.eval, tokenizer_from_meta(data.meta), raw_model.config.vocab_size,
                                  raw_model.config.block_size, loader.streams, dist)

        spikes = SpikeMonitor(config.spike, dist, device)  # of loss spikes: spike.policy says what they do

        # 4) from where: this run's checkpoint, if it has one; what rank 0 records
        config_dict = to_dict(config)
        checkpointer = Checkpointer(run_dir, raw_model, training.optimizers, training.scaler, dist,
                                    sharded=distributed.sharded(config.system, dist), keep=config.keep_checkpoints,
                                    ema=training.ema, monitor=spikes, config=config_dict, meta=data.meta,
                                    provenance=provenance() if dist.is_main else None)
        state = checkpointer.restore(saved) if saved is not None else TrainState()
        recorder = start_recording(config, config_dict, run, run_dir, state if saved is not None else None, dist)
        state.tracker_ids = recorder.run_ids()
        if saved is None:  # a resumed run's metrics.jsonl keeps its start record (its iteration 0)
            recorder.log(start_record(config, raw_model))
        log_setup(config, training, state, run_dir, dist)
        log.info(loader.describe(config.max_iters))

        # 5) the loop, inside the debug presets' instruments (profiler, anomaly checks)
        try:
            with instruments(config.debug, raw_model, device, run_dir, dist.rank, state.iter_num) as after_step:
                best = loop(config, training, loader, evaluator, lr_scale, state, checkpointer, recorder, dist, run_dir,
                            spikes, after_step)
        finally:
            # DDP's reducer holds the process group: freed after teardown, it would run gloo's
            # destructor with the GIL held while gloo's worker thread waits for the GIL (a hang at
            # exit, about one run in 15). Freed here, the group is still registered and outlives it.
            training.model = None
        if config.debug.read_back:
            read_back(run_dir, raw_model, data.meta, config.debug.sample_tokens, dist.is_main)
        return best


def loop(config: TrainConfig, t: "Training", loader, evaluator: Evaluator | None, lr_scale: Callable[[int], float],
         state: TrainState, checkpointer: Checkpointer, recorder: Recorder, dist: distributed.DistInfo,
         run_dir: Path, spikes: SpikeMonitor, after_step: Callable[[], None] | None = None) -> float:
    """Iterations state.iter_num .. max_iters; returns the best val loss. after_step follows each
    training step (the profiler's step)."""
    resume_hint = f"resume with: python train.py resume={run_dir}"
    progress = Progress(config, t, tokens_per_iter(config, t.raw_model.config.block_size), dist, state.iter_num)
    bad_iter = torch.tensor(-1, device=t.device)  # first iteration with a non-finite loss or grad norm
    steps = Iterations(loader, state.iter_num, config.max_iters, config.debug.overfit, state.skipped_windows)
    phases = {p["start"]: p for p in loader.phases(config.max_iters)}  # a mixture's weights, by first iteration
    exit_code = 0
    try:
        with StopSignals() as stop:
            for it in steps:
                state.iter_num = it
                last_step = it == config.max_iters
                evaluate = due(it, config.eval_interval, steps.start, config)
                # checked without a per-step device sync: on log steps, and before anything is saved
                if evaluate or it % config.log_interval == 0:
                    settle(bad_iter, spikes, state, recorder, run_dir, dist)
                if it in phases and (it == 0 or it > steps.start):  # a resumed run's start was recorded before
                    record_phase(phases, it, recorder)
                if evaluate:
                    losses = record_losses(config, t, loader, it, progress, state, recorder)
                if evaluator is not None and due(it, config.eval.interval, steps.start, config):
                    # the raw model: any shape, no recompiles
                    scores = scored(t, lambda: evaluator(t.raw_model, t.device, t.autocast), ema=config.eval.ema)
                    log.info(f"step {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                    recorder.log({"iter": it, "kind": "tasks", **scores, **progress.spent(it),
                                  "train_time_s": state.train_time_s})
                    progress.restart(it)
                if evaluate:
                    improved = losses["val_loss"] < state.best_val_loss
                    state.best_val_loss = min(state.best_val_loss, losses["val_loss"])
                    if it > 0 and not config.eval_only:
                        checkpointer.save(state)
                        if improved and not config.always_save_checkpoint:
                            checkpointer.save(state, BEST)
                    progress.restart(it)  # eval and saving are not training time
                if config.eval_only or last_step:
                    break
                if stop.requested(t.device, dist):
                    settle(bad_iter, spikes, state, recorder, run_dir, dist)
                    checkpointer.save(state)
                    log.warning(f"checkpoint saved at iteration {it}; {resume_hint}")
                    requeued = stop.pass_on()
                    raise Interrupted(stop.signum, "requeued, resumes by itself" if requeued else resume_hint, requeued)

                t_step = time.perf_counter()
                set_lr(t.optimizers, lr_scale(it))
                loss, grad_norm, finite, spike = train_step(t, steps.batches, it, config.nan_policy == "skip", spikes,
                                                            after_step)
                if config.nan_policy == "stop":
                    bad_iter.masked_fill_((bad_iter < 0) & ~finite, it + 1)  # a scalar fill: no host-to-device copy
                elif not finite.item():
                    log.warning(f"iteration {it}: non-finite loss or gradient norm, step skipped")
                state.train_time_s += time.perf_counter() - t_step
                spikes.observe(it + 1, loss)  # spike.policy=warn: judged at the next log line
                if spike is not None and config.spike.policy == "rollback" and latest_checkpoint(run_dir) is not None:
                    settle(bad_iter, spikes, state, recorder, run_dir, dist)
                    back = roll_back(spike, config, state, checkpointer, recorder, run_dir, dist)
                    steps.go_back(back, state.skipped_windows)
                    progress.restart(steps.start)
                    continue
                if spike is not None:  # skip (or rollback before any checkpoint): the update was not applied
                    note_spike(spike.record("skip"), state, recorder, run_dir, dist)

                if (it + 1) % config.log_interval == 0 or it == steps.start:
                    rec = progress.record(it + 1, loss, grad_norm, lr_scale(it) * config.optim.learning_rate, state)
                    recorder.log(rec)
    except BaseException:
        exit_code = 1
        raise
    finally:
        steps.close()
        recorder.finish(exit_code, summary={"best_val_loss": state.best_val_loss})
    return state.best_val_loss


def record_losses(config: TrainConfig, t: "Training", loader, it: int, progress: "Progress", state: TrainState,
                  recorder: Recorder) -> dict[str, float]:
    """The loss estimate at iteration it (and the EMA's, if kept), in the log and metrics.jsonl."""
    losses = scored(t, lambda: estimate_loss(t.model, loader, config.eval_iters, t.autocast, it), ema=True)
    log.info(f"step {it}: " + ", ".join(f"{k.replace('_loss', ' loss').replace('_ema', ' ema')} {v:.4f}"
                                        for k, v in losses.items()))
    recorder.log({"iter": it, "kind": "eval", **losses, **progress.spent(it), "train_time_s": state.train_time_s})
    return losses


def record_phase(phases: dict[int, dict], it: int, recorder: Recorder) -> None:
    """A mixture's weights from iteration it on, in the log and as a "data" record."""
    weights = phases[it]["weights"]
    log.info(f"iteration {it}: data mix phase {list(phases).index(it) + 1} of {len(phases)} (to iteration "
             f"{phases[it]['end']}): " + ", ".join(f"{name} {w:.3f}" for name, w in weights.items()))
    recorder.log({"iter": it, "kind": "data", **{f"mix/{name}": w for name, w in weights.items()}})


class Iterations:
    """The loop's iterations, start .. last, and their batches; a rollback sends both back."""

    def __init__(self, loader, start: int, last: int, overfit: bool, skipped: list[list[int]]):
        self.loader, self.last, self.overfit, self.batches = loader, last, overfit, None
        self.go_back(start, skipped)

    def __iter__(self) -> Iterator[int]:
        while self.next <= self.last:
            self.next += 1
            yield self.next - 1

    def go_back(self, it: int, skipped: list[list[int]]) -> None:
        """Iterate from it again, on the batches past the windows rollbacks skipped."""
        self.close()
        self.start = self.next = it
        self.batches = train_batches(self.loader, it, self.overfit, skipped)

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()  # stops the prefetch thread


def settle(bad_iter: torch.Tensor, spikes: SpikeMonitor, state: TrainState, recorder: Recorder, run_dir: Path,
           dist: distributed.DistInfo) -> None:
    """What the loop checks at its sync points (log lines, evaluations, saves), not every step: a
    non-finite loss since the last one stops the run; spike.policy=warn's losses are judged."""
    if bad_iter.item() >= 0:
        raise Diverged(
            f"non-finite loss or gradient norm at iteration {bad_iter.item()}: lower optim.learning_rate, "
            "raise warmup, or set nan_policy=skip"
        )
    for spike in spikes.flush():
        note_spike(spike.record("warn"), state, recorder, run_dir, dist)


def note_spike(record: dict, state: TrainState, recorder: Recorder, run_dir: Path, dist: distributed.DistInfo) -> None:
    """A loss spike in the state a checkpoint keeps, and told (tell_spike)."""
    state.spikes.append(record)
    tell_spike(record, state, recorder, run_dir, dist)


def tell_spike(record: dict, state: TrainState, recorder: Recorder, run_dir: Path, dist: distributed.DistInfo) -> None:
    """A loss spike in the log, metrics.jsonl and status.json."""
    recorder.log(record)
    if dist.is_main:
        log.warning(describe(record))
        update_status(run_dir, spikes=len(state.spikes), last_spike=record)


def roll_back(spike: Spike, config: TrainConfig, state: TrainState, checkpointer: Checkpointer, recorder: Recorder,
              run_dir: Path, dist: distributed.DistInfo) -> int:
    """PaLM's answer to a spike (Chowdhery et al. 2022, 5.1): back to the last checkpoint, and on
    past the windows of the iterations from there to the spike, that checkpoint re-saved with the
    shift (a later resume keeps it); metrics.jsonl is cut back there. Returns the iteration to go
    on from. One spike past spike.max_rollbacks stops the run."""
    done = sum(r["action"] == "rollback" for r in state.spikes)
    if done >= config.spike.max_rollbacks:
        raise Diverged(f"{describe(spike.record(f'stopped after {done} rollbacks'))} (spike.max_rollbacks="
                       f"{config.spike.max_rollbacks}): lower optim.learning_rate, or look at the data")
    back = checkpointer.restore(read_checkpoint(latest_checkpoint(run_dir)), weights=True)
    skipped = spike.iter - back.iter_num  # the windows of iterations back.iter_num .. the spike's
    record = spike.record("rollback") | {"iter": back.iter_num, "spike_iter": spike.iter, "windows_skipped": skipped}
    # the checkpoint's weights, optimizer, EMA, RNGs and spike window; this run's time, trackers and spikes
    state.iter_num, state.best_val_loss = back.iter_num, back.best_val_loss
    state.skipped_windows = [*back.skipped_windows, [back.iter_num, skipped]]
    state.spikes.append(record)
    checkpointer.save(state)
    recorder.rewind(back.iter_num)
    tell_spike(record, state, recorder, run_dir, dist)
    return back.iter_num


def due(it: int, interval: int, start_iter: int, config: TrainConfig) -> bool:
    """Whether an evaluation run every `interval` iterations runs at iteration it: at its multiples
    and at the last iteration, but not at the one a resumed run starts at (done before that
    checkpoint, the last iteration's too: a run killed after its final save adds no second record),
    and always with eval_only. interval 0: only with eval_only."""
    if config.eval_only:
        return True
    if not interval:
        return False
    if start_iter > 0 and it == start_iter:
        return False
    return it == config.max_iters or (it % interval == 0 and (it > 0 or config.eval_at_start))


@dataclasses.dataclass
class Training:
    """What one iteration works with: built once in train(), stepped by train_step."""

    model: torch.nn.Module  # what runs forward and backward: raw_model compiled and wrapped (parallelize)
    raw_model: GPT  # the plain module: saved, measured, never prefixed
    optimizers: list[torch.optim.Optimizer]
    device: torch.device
    dtype: torch.dtype  # of the autocast region; float16 also scales the loss
    micro_steps: int  # this rank's share of gradient_accumulation_steps
    grad_clip: float  # 0: no clipping
    sync_every_micro_step: bool = False  # FSDP's reduce-scatter on every micro-step, not the last only
    ema: EMA | None = None  # the weights' moving average, updated after each applied step (ema_decay)

    def __post_init__(self):
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        set_lr(self.optimizers, 1.0)  # each group's peak rate recorded as "base_lr", as a saved state holds it
        self.autocast = autocast(self.device, self.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def train_step(
    t: Training,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    it: int,
    skip_nonfinite: bool = False,
    spikes: SpikeMonitor | None = None,
    after_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Spike | None]:
    """Iteration it: accumulate the micro-batches' gradients, clip, step the optimizers, update the
    EMA. The update is not applied (weights, optimizer state and EMA untouched) to a non-finite
    step with skip_nonfinite, nor to a loss spike when the monitor judges each step (spike.policy
    skip or rollback). Returns (loss, gradient norm, finite) as device tensors, whose reading waits
    for the device, so the caller decides when, and the spike if any. after_step is called last
    (e.g. a profiler's step)."""
    loss_sum = torch.zeros((), device=t.device)
    for micro_step in range(t.micro_steps):
        batch = next(batches)
        with distributed.gradient_sync(t.model, t.sync_every_micro_step or micro_step == t.micro_steps - 1), t.autocast:
            loss = batch_loss(t.model, batch)
            loss = loss / t.micro_steps  # the mean over the whole accumulation
        t.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if t.scaler.is_enabled():
        for opt in t.optimizers:
            t.scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(t.params, t.grad_clip if t.grad_clip > 0 else math.inf)
    if isinstance(grad_norm, DTensor):  # sharded parameters: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    # with fp16, inf gradients are overflow, which the scaler skips by itself
    finite = torch.isfinite(loss_sum) if t.scaler.is_enabled() else torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
    spike = spikes.judge(it + 1, loss_sum) if spikes is not None and spikes.judges_each_step else None
    if spike is None and not (skip_nonfinite and not finite.item()):
        for opt in t.optimizers:
            t.scaler.step(opt)
        if t.ema is not None:
            t.ema.update(it + 1)
    t.scaler.update()
    for opt in t.optimizers:
        opt.zero_grad(set_to_none=True)
    if after_step is not None:
        after_step()
    return loss_sum, grad_norm, finite, spike


def set_up_rank(system: SystemConfig, dist: distributed.DistInfo) -> tuple[torch.device, torch.dtype]:
    """This rank's device and precision; its seed (each rank its own dropout masks) and the
    process-wide switches of the system group."""
    device = resolve_device(system, dist.local_rank)
    dtype = resolve_dtype(system, device)
    torch.manual_seed(system.seed + dist.rank)
    configure_backends(system, device)
    return device, dtype


def build_training(config: TrainConfig, build_model: Callable[[], GPT], device: torch.device, dtype: torch.dtype,
                   dist: distributed.DistInfo) -> Training:
    """What train_step needs: the model built and wrapped for this world (distributed.parallelize,
    or built on rank 0 and sharded: distributed.shard), its optimizers, this rank's share of the
    micro-steps."""
    sharded = distributed.sharded(config.system, dist)
    if sharded:
        model = wrapped = distributed.shard(build_model, config.system, device, dtype, dist)
    else:
        model = build_model().to(device)
        wrapped = distributed.parallelize(model, config.system, device, dist)
    return Training(
        model=wrapped,
        raw_model=model,
        optimizers=as_optimizers(build(config.optim, model=model, device_type=device.type), config.optim._target_),
        device=device,
        dtype=dtype,
        micro_steps=per_rank_micro_steps(config.gradient_accumulation_steps, dist.world_size),
        grad_clip=config.grad_clip,
        sync_every_micro_step=sharded and config.system.reduce_every_micro_step,
        ema=EMA(model, config.ema_decay, config.ema_start) if config.ema_decay > 0 else None,
    )


def tokens_per_iter(config: TrainConfig, block_size: int) -> int:
    """Tokens in one iteration, over all ranks: micro-steps x batch x block."""
    return config.gradient_accumulation_steps * config.data.batch_size * block_size


def per_rank_micro_steps(gradient_accumulation_steps: int, world_size: int) -> int:
    if gradient_accumulation_steps % world_size:
        raise UserError(
            f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the world size {world_size}"
        )
    return gradient_accumulation_steps // world_size


def build_model(config: TrainConfig, meta: dict, saved: dict | None) -> GPT:
    """The model to train: from this run's checkpoint, else from init_from's weights, else new
    and sized to the data's vocabulary. Checked against the model protocol and the data it will see."""
    source, trained_on, trusted = config.init_from, None, trusted_names(config)
    if saved is not None:
        # a sharded checkpoint's tensors are read later, by every rank (Checkpointer.restore)
        model = model_from_state(saved, read_shards=False, trusted=trusted)
        source, trained_on = "this run's checkpoint", saved.get("meta")
    elif config.init_from == "scratch":
        if config.weights == "ema":
            raise UserError("weights=ema reads the EMA of init_from's run: set init_from=<run folder or checkpoint>")
        model = build(dataclasses.replace(config.model, vocab_size=padded_vocab_size(config.model, meta["vocab_size"])))
    else:
        model, trained_on = load_model(config.init_from, config.model, config.weights, trusted)
    check_model(model, model.config._target_ if hasattr(model, "config") else config.model._target_)
    if trained_on and definition(trained_on) != definition(meta):
        raise UserError(
            f"the data folder {config.data.root}/{config.data.name} has a different vocabulary ({meta['tokenizer']}) "
            f"from {source} ({trained_on.get('tokenizer')}): train on the same data"
        )
    if config.model.block_size < model.config.block_size:
        if not hasattr(model, "crop_block_size"):
            raise UserError(f"model.block_size={config.model.block_size} is shorter than {source}'s "
                            f"({model.config.block_size}) and {type(model).__qualname__} has no crop_block_size()")
        model.crop_block_size(config.model.block_size)
    if meta["vocab_size"] > model.config.vocab_size:
        raise UserError(
            f"the data's vocabulary ({meta['vocab_size']} tokens, {config.data.root}/{config.data.name}) is larger than "
            f"the model's ({model.config.vocab_size}): use data with the model's tokenizer"
        )
    set_parallel_dropout(model, config.system.parallel_dropout)
    return model


def warn_unused_overrides(config: TrainConfig, overrides: list[str], saved: dict) -> None:
    """A resumed run's model is its checkpoint's: a model.* override that differs is named, not
    dropped silently (a shorter block_size applies: the positions are cropped)."""
    for key in dict.fromkeys(o.partition("=")[0].lstrip("+~") for o in overrides if o.lstrip("+~").startswith("model.")):
        name = key.removeprefix("model.")
        ours, theirs = getattr(config.model, name, None), saved["model_args"].get(name)
        if ours != theirs and not (name == "block_size" and ours < theirs):
            log.warning(f"{key}={ours} is not used: a resumed run keeps its checkpoint's model ({key}={theirs})")
    if config.weights == "ema":
        log.warning("weights=ema is not used: a resumed run goes on from its own weights (init_from reads the EMA)")


def start_recording(config: TrainConfig, config_dict: dict, run: RunInfo, run_dir: Path,
                    resumed: TrainState | None, dist: distributed.DistInfo) -> Recorder:
    """Rank 0 records to metrics.jsonl (cut back to the checkpoint's iteration on resume) and the
    trackers (continuing their runs); other ranks record nothing."""
    if not dist.is_main:
        return Recorder()
    resume_iter = resumed.iter_num if resumed else None
    metrics = MetricsLog(run_dir, resume_iter=resume_iter)
    log.info(f"config:\n{OmegaConf.to_yaml(config_dict).rstrip()}")
    ids = resumed.tracker_ids if resumed else {}
    return Recorder(metrics, start_trackers(config.logger, config=config_dict, run=run, resume_ids=ids,
                                            resume_iter=resume_iter))


def start_record(config: TrainConfig, model: torch.nn.Module) -> dict:
    """What the run trains and for how long: the metrics.jsonl record of kind "start", at iteration 0."""
    budget = {k: getattr(config, k) for k in ("tokens_per_param", "flops_budget") if getattr(config, k) is not None}
    return {"iter": 0, "kind": "start", "params": params(model), "params_non_embedding": params_non_embedding(model),
            "flops_per_token": flops_per_token(model), "tokens_per_iter": tokens_per_iter(config, model.config.block_size),
            "max_iters": config.max_iters, **budget, "tokens": 0, "flops": 0, "train_time_s": 0.0}  # the counters' start


def log_setup(config: TrainConfig, t: Training, state: TrainState, run_dir: Path, dist: distributed.DistInfo) -> None:
    m, fpt = t.raw_model.config, flops_per_token(t.raw_model)
    tokens = tokens_per_iter(config, m.block_size)
    budget = [f"{k}={getattr(config, k):g}" for k in ("tokens_per_param", "flops_budget") if getattr(config, k) is not None]
    log.info(
        f"run folder {run_dir}\n"
        f"device {t.device}, dtype {str(t.dtype).replace('torch.', '')}, world size {dist.world_size}, "
        f"compile {use_compile(config.system, t.device)}, threads {torch.get_num_threads()}\n"
        f"model {params(t.raw_model):,} parameters ({params_non_embedding(t.raw_model):,} without embeddings), "
        f"{fpt:.3g} FLOPs a token trained, vocabulary {m.vocab_size}, block {m.block_size}\n"
        f"tokens per iteration {tokens:,} "
        f"({config.gradient_accumulation_steps} micro-steps x {config.data.batch_size} x {m.block_size})"
        + (f"\n{budget[0]}: max_iters {config.max_iters:,} ({config.max_iters * tokens:,} tokens, "
           f"{config.max_iters * tokens * fpt:.3g} FLOPs)" if budget else "")
        + (f"\nresuming at iteration {state.iter_num} (best val loss {state.best_val_loss:.4f})" if state.iter_num else "")
    )


class Progress:
    """The log line and train record every log_interval: loss (the global mean over ranks),
    speed and MFU since the last line, ETA. Evaluation and saving are not counted as speed."""

    def __init__(self, config: TrainConfig, t: Training, tokens_per_iter: int, dist: distributed.DistInfo, start_iter: int):
        self.config, self.t, self.tokens_per_iter, self.dist = config, t, tokens_per_iter, dist
        self.flops_per_token = flops_per_token(t.raw_model)  # the numerator of MFU, and of the flops records
        self.first = True
        self.startup_s = seconds_since_process_start()  # imports, composition, data, model: up to the loop
        self.restart(start_iter)

    def restart(self, it: int) -> None:
        self.t_log, self.it_log = time.perf_counter(), it

    def spent(self, it: int) -> dict:
        """What the first `it` iterations trained on: tokens and FLOPs, cumulative over ranks."""
        tokens = it * self.tokens_per_iter
        return {"tokens": tokens, "flops": tokens * self.flops_per_token}

    def record(self, done: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, state: TrainState) -> dict:
        if self.dist.enabled:  # the global mean, comparable with a single process's (gloo has no AVG)
            distributed.all_reduce(loss)
        loss_f = loss.item() / self.dist.world_size
        dt = (time.perf_counter() - self.t_log) / max(done - self.it_log, 1)
        tok_s = self.tokens_per_iter / dt
        # the peak is measured at the first log line, after the first step: not at start-up
        peak, peak_source = peak_flops(self.t.device, self.t.dtype)
        mfu = self.flops_per_token * tok_s / self.dist.world_size / peak  # achieved FLOP/s per device over its peak
        if self.first:
            startup = "" if self.startup_s is None else f"start-up {self.startup_s:.1f} s to the first iteration; "
            log.info(f"{startup}MFU against a peak of {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
            self.first = False
        mem = memory_mb(self.t.device)  # rank 0's
        mem_text = (f"{mem['mem_allocated_mb']:,.0f}/{mem['mem_reserved_mb']:,.0f} MiB allocated/reserved"
                    if "mem_reserved_mb" in mem else f"{mem['mem_peak_mb']:,.0f} MiB peak rss")
        log.info(
            f"iter {done}/{self.config.max_iters}: loss {loss_f:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
            f"{tok_s:,.0f} tok/s, mfu {mfu * 100:.1f}%, {mem_text}, eta {_hms((self.config.max_iters - done) * dt)}"
        )
        self.restart(done)  # the peak's measurement is not training time
        return {"iter": done, "kind": "train", "loss": loss_f, "lr": lr, "grad_norm": grad_norm.item(),
                "ms_per_iter": dt * 1000, "tokens_per_s": tok_s, "mfu": mfu, **self.spent(done),
                "train_time_s": state.train_time_s, **mem}


def batch_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The model's loss on a batch: (x, y), or (x, y, positions) for a model that masks documents."""
    x, y, *positions = batch
    return (model(x, y, positions=positions[0]) if positions else model(x, y))[1]


def scored(t: Training, score: Callable[[], dict[str, float]], ema: bool) -> dict[str, float]:
    """score() of the model's weights and, with ema and an EMA kept, of the EMA's (keys + _ema)."""
    out = score()
    if ema and t.ema is not None:
        with t.ema.swapped_in(t.raw_model):
            out |= {f"{k}_ema": v for k, v in score().items()}
    return out


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, loader, eval_iters: int, ctx, iteration: int = 0) -> dict[str, float]:
    """{"train_loss", "val_loss"}: the mean loss over the same eval_iters batches per split, shared
    among ranks and all-reduced. A mixture adds each source's ("train_loss/<name>", "val_loss/<name>"),
    its own being their mean weighted by the weights the step before `iteration` trained with."""
    model.eval()
    out, per_source = {}, {}
    sources = loader.eval_sources(iteration)  # (name, weight, a source's loader); one unnamed for one folder
    for split in ("train", "val"):
        losses = {}
        for name, _, part in sources:
            total = torch.zeros(2, device=part.device)  # (sum of losses, count)
            for batch in part.eval_batches(split, eval_iters):
                with ctx:
                    loss = batch_loss(model, batch)
                total += torch.stack([loss.float(), torch.ones((), device=part.device)])
            distributed.all_reduce(total)
            losses[name] = (total[0] / total[1]).item()
        out[f"{split}_loss"] = sum(w * losses[name] for name, w, _ in sources) / sum(w for _, w, _ in sources)
        per_source |= {f"{split}_loss/{name}": loss for name, loss in losses.items() if name is not None}
    model.train()
    return out | per_source


class StopSignals:
    """SIGINT/SIGTERM/SIGUSR1/SIGUSR2 set a flag the loop reads at the next step boundary; a
    second SIGINT raises at once. SIGUSR1/2 is SLURM's warning before a time limit or preemption
    (submitit >= 1.5 asks for USR2, `sbatch --signal=USR1` is common too)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum
        log.warning(f"{signal.Signals(signum).name} received: stopping at the next step boundary with a checkpoint")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self, device: torch.device, dist: distributed.DistInfo) -> bool:
        """Whether any rank got a signal: every rank stops together. One process reads a plain
        int, so no device sync per step."""
        if dist.enabled:
            flag = torch.tensor(float(self.signum), device=device)
            distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signum = self.signum or int(flag.item())
        return bool(self.signum)

    def pass_on(self) -> bool:
        """After our checkpoint, hand a SLURM warning to the handler we took it from: submitit's
        requeues the job (global rank 0 only) and exits. True when the job was requeued."""
        handler = self.previous.get(self.signum)
        if self.signum in self.WARNINGS and callable(handler):
            try:
                handler(self.signum, None)
            except SystemExit:  # requeued; Interrupted ends this process the same way, with our status
                return True
        return False


def open_run_dir(run: RunInfo, dist: distributed.DistInfo) -> Path:
    """The run folder, chosen by rank 0 and told to the others; rank 0 marks it running and logs
    into it, other ranks log warnings only."""
    if dist.is_main:  # before the other ranks learn the folder: any failure they record comes later
        write_status(Path(run.run_dir), "running", iter=None)
    run_dir = Path(distributed.broadcast_object(run.run_dir, dist))
    if not dist.is_main:
        log.setLevel(logging.WARNING)
    elif not logging.getLogger().handlers:  # a spawned rank 0: Hydra configured only its parent
        _log_to(run_dir / "train.log")
    return run_dir


@contextmanager
def recorded_status(run_dir: Path, dist: distributed.DistInfo):
    """status.json says how the run ended: finished, interrupted, preempted (requeued) or failed
    with the first failing rank's error."""
    status, error = "failed", None
    try:
        yield
        status = "finished"
    except Interrupted as e:
        status, error = "preempted" if e.requeued else "interrupted", str(e)
        raise
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        if status == "failed":
            # the first rank to fail records its error before its teardown breaks the others'
            # collectives: their vaguer errors ("connection closed by peer") must not overwrite it
            if read_status(run_dir).get("status") != "failed":
                write_status(run_dir, status, error=f"rank {dist.rank}: {error}" if dist.enabled else error)
            elif distributed.is_rank_process():
                distributed.outlive_first_failure()  # ...nor be the one the launcher reports
        elif dist.is_main:
            write_status(run_dir, status, error=error)
        if status != "failed" or not distributed.is_rank_process():
            # a failing rank keeps its connections until its process exits, after the launcher has
            # its error: closing them first lets a peer fail ("connection closed") and be reported instead
            distributed.teardown()


def _log_to(path: Path) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
    root.addHandler(console)
    root.addHandler(file)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
