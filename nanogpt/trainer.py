"""The training loop: one function per rank, from a typed config to a trained checkpoint.

Everything is built here, after the rank and device are known. The loop is nanoGPT's: evaluate
and checkpoint every eval_interval, gradient accumulation over micro-steps (gradients synchronised
on the last one only), clipping, a step, a log line every log_interval. To change training, edit
the loop.
"""

import dataclasses
import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt import checkpoint as ckpt
from nanogpt import distributed
from nanogpt.config import ConfigError, TrainConfig
from nanogpt.device import autocast, configure_backends, peak_flops, resolve_device, resolve_dtype, use_compile
from nanogpt.dropout import set_parallel_dropout
from nanogpt.model import GPT, GPTConfig
from nanogpt.optim import set_lr
from nanogpt.prepare import data_dir, load_meta, prepare
from nanogpt.rundir import MetricsLog, RunInfo, provenance, read_status, seconds_since_process_start, write_status
from nanogpt.tracking import build_tracker

log = logging.getLogger("nanogpt")


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run after a checkpoint. A BaseException, as KeyboardInterrupt is, so a
    sweep stops too instead of recording a failure and going on."""

    def __init__(self, signum: int, resume_hint: str, requeued: bool = False):
        super().__init__(f"stopped by {signal.Signals(signum).name}; {resume_hint}")
        self.signum = signum
        self.requeued = requeued  # SLURM will start the job again: it resumes from the checkpoint


class Diverged(ConfigError):
    """A non-finite loss or gradient norm; the message names the iteration."""


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


def train(config: TrainConfig, run: RunInfo) -> float:
    """Train on this rank; return the best val loss. Rank 0 writes the run folder."""
    device = resolve_device(config.system, 0)  # checks early; the rank's own device comes below
    dist = distributed.setup(config.system, device.type)
    status, error = "failed", None
    if dist.is_main:  # before the other ranks learn the folder: any failure they record comes later
        write_status(Path(run.run_dir), "running", iter=None)
    run_dir = Path(distributed.broadcast_object(run.run_dir, dist))
    if not dist.is_main:
        log.setLevel(logging.WARNING)
    elif not logging.getLogger().handlers:  # a spawned rank 0: Hydra configured only its parent
        _log_to(run_dir / "train.log")
    try:
        best = _train(config, run, run_dir, dist)
        status = "finished"
        return best
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


def _train(config: TrainConfig, run: RunInfo, run_dir: Path, dist: distributed.DistInfo) -> float:
    # 1) where and how: device, precision, seeds, per-rank share of the accumulation
    device = resolve_device(config.system, dist.local_rank)
    dtype = resolve_dtype(config.system, device)
    if config.gradient_accumulation_steps % dist.world_size:
        raise ConfigError(
            f"gradient_accumulation_steps={config.gradient_accumulation_steps} must be divisible by the "
            f"world size {dist.world_size}"
        )
    micro_steps = config.gradient_accumulation_steps // dist.world_size
    torch.manual_seed(config.system.seed + dist.rank)  # each rank its own dropout masks
    configure_backends(config.system, device)
    ctx = autocast(device, dtype)

    # 2) data: rank 0 prepares it on first use while the others wait
    path = data_dir(config.data)
    if dist.is_main:
        prepare(config.data)
    distributed.broadcast_object(None, dist)  # a barrier that works on every backend
    meta = load_meta(path)

    # 3) model: a checkpoint in the run folder wins over init_from, so a requeued job resumes itself
    state = _initial_state(config, run_dir, meta)
    if state is not None:
        model_config = GPTConfig(**state["model_args"])
        model = GPT(model_config)
        model.load_state_dict(ckpt.strip_prefixes(state["model"]))
        if model_config.block_size > config.model.block_size:
            model.crop_block_size(config.model.block_size)
            model_config = model.config
    elif config.init_from == "scratch":
        vocab = config.model.vocab_size or meta["vocab_size"]
        vocab = math.ceil(vocab / config.model.vocab_pad_multiple) * config.model.vocab_pad_multiple
        model_config = dataclasses.replace(config.model, vocab_size=vocab)
        model = GPT(model_config)
    else:
        from nanogpt.pretrained import load_pretrained

        model = load_pretrained(config.init_from, config.model)
        model_config = model.config
    if meta["vocab_size"] > model_config.vocab_size:
        raise ConfigError(
            f"the data's vocabulary ({meta['vocab_size']} tokens, {path}) is larger than the model's "
            f"({model_config.vocab_size}): use data with the model's tokenizer"
        )
    set_parallel_dropout(model, config.system.parallel_dropout)
    model.to(device)
    raw_model = model  # saved and evaluated: never carries _orig_mod. or module. prefixes
    if use_compile(config.system, device):
        model = torch.compile(model)
    ddp_model = DDP(model, device_ids=[dist.local_rank] if device.type == "cuda" else None) if dist.enabled else model

    # 4) optimizer, schedule, loss scaling, batches
    optimizers = build(config.optim, model=raw_model, device_type=device.type)
    lr_scale = build(config.schedule, learning_rate=config.optim.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loader = build(
        config.data,
        block_size=model_config.block_size,
        device=device,
        seed=config.system.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        micro_steps=micro_steps,
    )
    start_iter, best_val = 0, float("inf")
    if state is not None and "optimizers" in state:
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        scaler.load_state_dict(state["scaler"])
        start_iter, best_val = state["iter_num"], state["best_val_loss"]
        rng = state["rng"]
        if dist.rank < len(rng):
            ckpt.set_rng_state(rng[dist.rank])

    # 5) what rank 0 writes: metrics (cut back to the checkpoint), tracker, the start-up summary
    config_dict = dataclasses.asdict(config)
    tokens_per_iter = config.gradient_accumulation_steps * config.data.batch_size * model_config.block_size
    metrics = tracker = None
    if dist.is_main:
        metrics = MetricsLog(run_dir, resume_iter=start_iter if state is not None else None)
        resume_id = state.get("wandb_id") if state is not None else None
        log.info(f"config:\n{OmegaConf.to_yaml(config_dict).rstrip()}")
        tracker = build_tracker(config.logger, config_dict, run, resume_id)
        log.info(
            f"run folder {run_dir}\n"
            f"device {device}, dtype {str(dtype).replace('torch.', '')}, world size {dist.world_size}, "
            f"compile {model is not raw_model}, threads {torch.get_num_threads()}\n"
            f"model {raw_model.get_num_params(non_embedding=False) / 1e6:.2f}M parameters, "
            f"vocabulary {model_config.vocab_size}, block {model_config.block_size}\n"
            f"tokens per iteration {tokens_per_iter:,} "
            f"({config.gradient_accumulation_steps} micro-steps x {config.data.batch_size} x {model_config.block_size})"
            + (f"\nresuming at iteration {start_iter} (best val loss {best_val:.4f})" if start_iter else "")
        )
    prov = provenance() if dist.is_main else None

    def save(it: int, path: Path) -> None:
        rng = distributed.gather_objects(ckpt.rng_state(), dist)  # a collective: every rank calls it
        if dist.is_main:
            state = {
                "model": raw_model.state_dict(),
                "optimizers": [opt.state_dict() for opt in optimizers],
                "scaler": scaler.state_dict(),
                "iter_num": it,
                "best_val_loss": best_val,
                "config": config_dict,
                "model_args": dataclasses.asdict(model_config),
                "meta": meta,
                "rng": rng,
                "provenance": prov,
                "wandb_id": tracker.run_id if tracker else None,
            }
            ckpt.save_checkpoint(state, path)

    def record(rec: dict) -> None:
        if metrics:
            metrics.write(rec)
        if tracker:
            tracker.log(rec)

    # 6) the loop
    resume_hint = f"resume with: python train.py resume={run_dir}"
    params = [p for p in raw_model.parameters() if p.requires_grad]
    bad_iter = torch.tensor(-1, device=device)  # first iteration with a non-finite loss or grad norm
    batches = loader.train_batches(start_iter)
    loss_acc = torch.zeros((), device=device)
    t_log, it_log, train_time = time.perf_counter(), start_iter, 0.0
    startup_s = seconds_since_process_start()  # imports, composition, data, model: up to the loop
    exit_code = 0
    try:
        with StopSignals() as stop:
            for it in range(start_iter, config.max_iters + 1):
                last_step = it == config.max_iters
                evaluate = config.eval_only or last_step or (
                    it % config.eval_interval == 0 and (it > start_iter or (it == 0 and config.eval_at_start))
                )
                # checked without a per-step device sync: on log steps, and before anything is saved
                if (evaluate or it % config.log_interval == 0) and bad_iter.item() >= 0:
                    raise Diverged(
                        f"non-finite loss or gradient norm at iteration {bad_iter.item()}: lower optim.learning_rate, "
                        "raise warmup, or set nan_policy=skip"
                    )
                if evaluate:
                    losses = estimate_loss(model, loader, config.eval_iters, ctx)
                    if dist.is_main:
                        log.info(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    record({"iter": it, "kind": "eval", "train_loss": losses["train"], "val_loss": losses["val"],
                            "tokens": it * tokens_per_iter, "train_time_s": train_time})
                    improved = losses["val"] < best_val
                    best_val = min(best_val, losses["val"])
                    if it > 0 and not config.eval_only:
                        save(it, run_dir / ckpt.LAST)
                        if improved and not config.always_save_checkpoint:
                            save(it, run_dir / ckpt.BEST)
                    t_log = time.perf_counter()  # eval time is not training time
                if config.eval_only or last_step:
                    break
                stop_now = stop.signum  # a plain int: one process needs no tensor, hence no device sync per step
                if dist.enabled:  # every rank stops together
                    flag = torch.tensor(float(stop.signum), device=device)
                    distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    stop_now = int(flag.item())
                if stop_now:
                    save(it, run_dir / ckpt.LAST)
                    log.warning(f"checkpoint saved at iteration {it}; {resume_hint}")
                    stop.signum = stop.signum or stop_now
                    requeued = stop.pass_on()
                    raise Interrupted(stop.signum, "requeued, resumes by itself" if requeued else resume_hint, requeued)

                # the step: accumulate micro-batches, then clip and update
                t_step = time.perf_counter()
                set_lr(optimizers, lr_scale(it))
                for micro_step in range(micro_steps):
                    x, y = next(batches)
                    sync = micro_step == micro_steps - 1
                    with ddp_model.no_sync() if dist.enabled and not sync else nullcontext(), ctx:
                        _, loss = ddp_model(x, y)
                        loss = loss / micro_steps  # the mean over the whole accumulation
                    scaler.scale(loss).backward()
                    loss_acc += loss.detach()
                if scaler.is_enabled():
                    for opt in optimizers:
                        scaler.unscale_(opt)
                max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                finite = torch.isfinite(loss_acc) & torch.isfinite(grad_norm)
                if scaler.is_enabled():
                    finite = torch.isfinite(loss_acc)  # inf gradients are fp16 overflow: the scaler skips them
                if config.nan_policy == "skip" and not finite.item():
                    log.warning(f"iteration {it}: non-finite loss or gradient norm, step skipped")
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    scaler.update()
                else:
                    bad_iter.masked_fill_((bad_iter < 0) & ~finite, it + 1)  # a scalar fill: no host-to-device copy
                    for opt in optimizers:
                        scaler.step(opt)
                    scaler.update()
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                train_time += time.perf_counter() - t_step

                if (it + 1) % config.log_interval == 0 or it == start_iter:
                    if dist.enabled:  # the global mean, comparable with a single process's
                        distributed.all_reduce(loss_acc)  # gloo has no AVG
                    loss_f = loss_acc.item() / dist.world_size
                    now = time.perf_counter()
                    n = it + 1 - it_log
                    dt = (now - t_log) / max(n, 1)
                    tok_s = tokens_per_iter / dt
                    # the peak is measured at the first log line, after the first step: not at start-up
                    peak, peak_source = peak_flops(device, dtype)
                    mfu = raw_model.estimate_mfu(tok_s / dist.world_size, peak)
                    eta = (config.max_iters - it - 1) * dt
                    if dist.is_main:
                        if it == start_iter:
                            startup = "" if startup_s is None else f"start-up {startup_s:.1f} s to the first iteration; "
                            log.info(f"{startup}MFU against a peak of {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
                        log.info(
                            f"iter {it + 1}/{config.max_iters}: loss {loss_f:.4f}, lr {lr_scale(it) * config.optim.learning_rate:.2e}, "
                            f"{dt * 1000:.1f} ms/iter, {tok_s:,.0f} tok/s, mfu {mfu * 100:.1f}%, eta {_hms(eta)}"
                        )
                    record({"iter": it + 1, "kind": "train", "loss": loss_f, "lr": lr_scale(it) * config.optim.learning_rate,
                            "grad_norm": grad_norm.item(), "ms_per_iter": dt * 1000, "tokens_per_s": tok_s, "mfu": mfu,
                            "tokens": (it + 1) * tokens_per_iter, "train_time_s": train_time})
                    t_log, it_log = time.perf_counter(), it + 1  # the peak's measurement is not training time
                loss_acc.zero_()
    except BaseException:
        exit_code = 1
        raise
    finally:
        batches.close()
        if metrics:
            metrics.close()
        if tracker:
            tracker.finish(exit_code, summary={"best_val_loss": best_val})
    return best_val


def build(node, **runtime):
    """hydra.utils.instantiate of a group's `_target_`, with runtime dependencies as keywords;
    our own errors come through unwrapped so they stay one clear line."""
    try:
        return instantiate(node, **runtime)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


def _initial_state(config: TrainConfig, run_dir: Path, meta: dict) -> dict | None:
    """The checkpoint to start from, if any: this run's own, or one named by init_from."""
    own = ckpt.find_checkpoint(run_dir)
    if own is None and config.init_from == "resume":
        raise ConfigError(f"init_from=resume but there is no checkpoint in {run_dir}: resume with python train.py resume=<run folder>")
    source = own
    if source is None and config.init_from not in ("scratch", "resume") and _is_checkpoint_path(config.init_from):
        source = Path(config.init_from)
        source = source / ckpt.LAST if source.is_dir() else source
    if source is None:
        return None
    state = ckpt.load_checkpoint(source)
    if source != own:  # someone else's checkpoint: weights only, a fresh optimizer and iteration count
        state = {k: state[k] for k in ("model", "model_args", "meta") if k in state}
        if "model_args" not in state:
            raise ConfigError(f"{source} has no model_args: not a nanoGPT or nanogpt checkpoint")
    saved_meta = state.get("meta")
    if saved_meta and {k: saved_meta.get(k) for k in ("tokenizer", "chars")} != {k: meta.get(k) for k in ("tokenizer", "chars")}:
        raise ConfigError(
            f"the data folder {data_dir(config.data)} has a different vocabulary ({meta['tokenizer']}) "
            f"from the checkpoint {source} ({saved_meta.get('tokenizer')}): train on the same data"
        )
    return state


def _is_checkpoint_path(init_from: str) -> bool:
    p = Path(init_from).expanduser()
    return p.is_file() and p.suffix == ".pt" or (p.is_dir() and (p / ckpt.LAST).exists())


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, loader, eval_iters: int, ctx) -> dict[str, float]:
    """Mean loss over the same eval_iters batches per split, shared among ranks and all-reduced."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        total = torch.zeros(2, device=loader.device)  # (sum of losses, count)
        for x, y in loader.eval_batches(split, eval_iters):
            with ctx:
                _, loss = model(x, y)
            total += torch.stack([loss.float(), torch.ones((), device=loader.device)])
        distributed.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


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
