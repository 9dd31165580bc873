"""Checkpoints: the format of a run's saved state, and every way a command loads weights.

A checkpoint is a dict of tensors and plain Python types only, so `torch.load(weights_only=True)`
opens it without running code. Its keys: model, optimizers, scaler, model_args, config, meta,
provenance, ema (the weights' moving average, when ema_decay > 0: nanogpt/averaging.py), and the
TrainState's fields (iter_num and best_val_loss as nanoGPT names them).
Saves go to a temporary file in the same folder, are fsynced, then renamed over the old file: a
kill or a full disk mid-save leaves the previous one intact.

A run folder holds ckpt.pt, the latest state (what a resume continues), and best.pt, the weights
of the best val loss when always_save_checkpoint=false. Weights taken from a run folder
(`init_from`, sampling, export) come from best.pt when there is one, else ckpt.pt. With
keep_checkpoints=K > 1, ckpt-<iteration>.pt hard links keep the last K (ckpt.pt is the newest of
them), removed oldest first once a newer one is complete; `average` writes their mean.

A sharded run (system.parallelism=fsdp) saves Distributed Checkpoint folders instead, written by
all ranks at once: ckpt/<iteration>/ holds each rank's shards and train_state.pt (everything but
the model and optimizer tensors, written by rank 0 last), and the text files ckpt/latest and
ckpt/best name the step folder to use; each is replaced in one rename once its folder is
complete, so a kill mid-save leaves the previous checkpoint in use; keep_checkpoints keeps the
last K step folders. DCP reshards on load: a run resumes at another world size, and one process
reads the folder whole. Both formats keep the optimizers' state by parameter name
(torch.distributed.checkpoint.state_dict's layout), so either resumes from the other; the run's
newer one wins, and a save in one format removes the other's checkpoints (a history of K starts
again).
"""

import dataclasses
import math
import os
import random
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nanogpt import distributed
from nanogpt.averaging import EMA, load_averages, mean_state_dict, named_parameters
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.pretrained import GPT2_NAMES, load_pretrained
from nanogpt.rundir import DEBUG
from nanogpt.targets import NotTrusted, covered, option_type, resolve

GPT_TARGET = GPTConfig._target_  # nanoGPT's checkpoints and ours before model targets: the GPT
LAST, BEST = "ckpt.pt", "best.pt"
KEPT, KEPT_GLOB = "ckpt-{:08d}.pt", "ckpt-[0-9]*.pt"  # keep_checkpoints > 1: hard links of ckpt.pt by iteration
SHARDED = "ckpt"  # the folder of a sharded run's step folders and pointers
POINTERS = {LAST: "latest", BEST: "best"}
TRAIN_STATE = "train_state.pt"  # in a step folder: all but the sharded tensors


@dataclass
class TrainState:
    """What the training loop carries from one iteration to the next, and a resume restores."""

    iter_num: int = 0  # iterations done
    best_val_loss: float = math.inf
    train_time_s: float = 0.0  # time spent in steps so far, over every resume: metrics' time axis
    tracker_ids: dict[str, str] = field(default_factory=dict)  # tracker name -> its run id, to continue that run
    rng: list[dict] = field(default_factory=list)  # every rank's RNG states, by rank (filled when saved)
    spike_windows: list[list[float]] = field(default_factory=list)  # every rank's recent losses (nanogpt/spikes.py)
    spikes: list[dict] = field(default_factory=list)  # the loss spikes seen, as metrics.jsonl records them
    skipped_windows: list[list[int]] = field(default_factory=list)  # rollbacks' (first iteration, windows skipped)


class Checkpointer:
    """Saves and restores a run's full state in its folder. Every rank calls save (the RNG states
    and spike windows are gathered from all of them); rank 0 writes, or, for a sharded model, every
    rank writes its shards."""

    def __init__(self, run_dir: Path, model: GPT, optimizers: list, scaler, dist: distributed.DistInfo,
                 sharded: bool = False, keep: int = 1, ema: EMA | None = None, monitor=None, **extra):
        self.run_dir, self.model, self.optimizers, self.scaler, self.dist = Path(run_dir), model, optimizers, scaler, dist
        self.sharded, self.keep, self.ema, self.monitor = sharded, keep, ema, monitor  # monitor: a spikes.SpikeMonitor
        self.extra = extra  # config, meta, provenance: written as they are
        if dist.is_main:  # a save killed midway left its temporary file; rank 0 holds the folder's lock: no one else writes
            for tmp in self.run_dir.glob(".*.pt.tmp"):
                tmp.unlink()
            self._keep_last()
            remove_unused_steps(self.run_dir, keep)

    def save(self, state: TrainState, name: str = LAST) -> None:
        window = self.monitor.state() if self.monitor is not None else []
        per_rank = distributed.gather_objects((rng_state(), window), self.dist)  # a collective: every rank calls it
        state = dataclasses.replace(state, rng=[r for r, _ in per_rank], spike_windows=[w for _, w in per_rank])
        record = {
            "scaler": self.scaler.state_dict(),
            "model_args": dataclasses.asdict(self.model.config),
            **dataclasses.asdict(state),
            **self.extra,
        }
        if self.sharded:
            self._save_sharded(record, state.iter_num, name)
            return
        optimizers = optimizer_state(self.model, self.optimizers, full=True)  # not a collective: the model is whole
        if self.dist.is_main:
            ema = {"ema": self.ema.state_dict()} if self.ema is not None else {}
            save_checkpoint({"model": self.model.state_dict(), "optimizers": optimizers, **ema, **record}, self.run_dir / name)
            shutil.rmtree(self.run_dir / SHARDED, ignore_errors=True)  # the single file is newer
            if name == LAST:
                self._keep_last(state.iter_num)

    def _keep_last(self, iter_num: int | None = None) -> None:
        """keep > 1: ckpt.pt (of iter_num, else read from it) hard-linked under its iteration, then
        the oldest links past K removed; a kill between the rename and the link: the next start
        links it. keep=1: no links."""
        latest = self.run_dir / LAST
        kept = sorted(self.run_dir.glob(KEPT_GLOB))
        if self.keep > 1 and latest.is_file() and not any(os.path.samefile(latest, k) for k in kept):
            link = self.run_dir / KEPT.format(load_checkpoint(latest)["iter_num"] if iter_num is None else iter_num)
            tmp = _temporary(link)
            tmp.unlink(missing_ok=True)
            try:
                os.link(latest, tmp)
            except OSError:  # a file system without hard links: a copy
                shutil.copyfile(latest, tmp)
            os.replace(tmp, link)  # over a link of the same iteration (a stop right after an eval's save)
            _fsync_dir(self.run_dir)
            kept = sorted({*kept, link})
        for old in kept[: -self.keep] if self.keep > 1 else kept:
            old.unlink()

    def _save_sharded(self, record: dict, iter_num: int, name: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        step = self.run_dir / SHARDED / f"{iter_num:08d}"
        if not (step / TRAIN_STATE).exists():  # best.pt of the iteration just saved: the same folder
            tensors = {"model": get_model_state_dict(self.model), "optimizers": optimizer_state(self.model, self.optimizers)}
            if self.ema is not None:
                tensors["ema"] = self.ema.state_dict()
            dcp.save(tensors, checkpoint_id=step)
        if self.dist.is_main:
            save_checkpoint(record, step / TRAIN_STATE)  # again for the same folder: a rollback's new state
            write_pointer(self.run_dir / SHARDED / POINTERS[name], step.name)
            for old in (LAST, BEST, *self.run_dir.glob(KEPT_GLOB)):  # the sharded checkpoint is newer
                (self.run_dir / old).unlink(missing_ok=True)
            remove_unused_steps(self.run_dir, self.keep)

    def restore(self, saved: dict, weights: bool = False) -> TrainState:
        """Optimizers, loss scaler, EMA, spike window and this rank's RNGs from a checkpoint of this
        run (the model was built from it, or, with weights, is loaded here too: a rollback; a sharded
        checkpoint's tensors are always read here); the TrainState to continue from."""
        if "sharded_from" in saved:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

            tensors = {"model": get_model_state_dict(self.model), "optimizers": optimizer_state(self.model, self.optimizers)}
            has_ema = self.ema is not None and has_shards(saved["sharded_from"], "ema")
            if has_ema:
                tensors["ema"] = self.ema.state_dict()  # read in place
            load_shards(tensors, saved["sharded_from"])
            set_model_state_dict(self.model, tensors["model"])
            set_optimizer_state(self.model, self.optimizers, tensors["optimizers"])
        else:
            if weights:
                load_whole_model(self.model, saved["model"], self.sharded, self.dist.is_main)
            set_optimizer_state(self.model, self.optimizers, saved["optimizers"], full=True, from_rank0=self.sharded,
                                is_main=self.dist.is_main)
            has_ema = self.ema is not None and "ema" in saved
            if has_ema:
                self.ema.load_state_dict(saved["ema"])
        if self.ema is not None and not has_ema:  # a run that turns the EMA on: it starts from these weights
            self.ema.reset()
        self.scaler.load_state_dict(saved["scaler"])
        state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
        if "tracker_ids" not in saved and saved.get("wandb_id"):  # older checkpoints kept wandb's run id alone
            state.tracker_ids = {"wandb": saved["wandb_id"]}
        if self.dist.rank < len(state.rng):  # a rank the saved run did not have starts from its seed
            set_rng_state(state.rng[self.dist.rank])
        if self.monitor is not None:  # a rank's losses at another world size are of another batch: a new window
            same_world = len(state.spike_windows) == self.dist.world_size
            self.monitor.load(state.spike_windows[self.dist.rank] if same_world else [])
        return state


def load_whole_model(model: nn.Module, weights: dict, sharded: bool, is_main: bool) -> None:
    """A whole state dict (a ckpt.pt's) into the model; a sharded one takes it from rank 0."""
    if not sharded:
        model.load_state_dict(strip_prefixes(weights))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, strip_prefixes(weights) if is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def has_shards(step: str | Path, key: str) -> bool:
    """Whether a step folder holds tensors under key (e.g. "ema")."""
    from torch.distributed.checkpoint import FileSystemReader

    return any(k.startswith(f"{key}.") for k in FileSystemReader(str(step)).read_metadata().state_dict_metadata)


def load_shards(tensors: dict, step: str | Path, alone: bool = False) -> None:
    """Fill tensors (whole or sharded, for this world) from a step folder written at any world
    size: with every rank, or (alone) in this process only, whatever its process group."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process reading a checkpoint of several is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, checkpoint_id=step, no_dist=alone or not torch.distributed.is_initialized())


def optimizer_state(model: nn.Module, optimizers: list, full: bool = False) -> dict:
    """The optimizers' state keyed by parameter name, as one dict (whole tensors if full)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizers, options=StateDictOptions(full_state_dict=full, cpu_offload=full))


def set_optimizer_state(model: nn.Module, optimizers: list, saved, full: bool = False, from_rank0: bool = False,
                        is_main: bool = True) -> None:
    """Load optimizer state saved by optimizer_state, or (a list) by optimizer.state_dict() before
    checkpoints kept parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if isinstance(saved, list):
        saved = by_name(model, optimizers, saved)
    if from_rank0 and not is_main:
        saved = {}  # only rank 0 reads the whole state; it is broadcast
    set_optimizer_state_dict(model, optimizers, saved,
                             options=StateDictOptions(full_state_dict=full, broadcast_from_rank0=from_rank0))


def by_name(model: nn.Module, optimizers: list, states: list[dict]) -> dict:
    """optimizer.state_dict()s (parameters numbered in each optimizer's order) keyed by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    state, groups = {}, []
    for opt, saved in zip(optimizers, states, strict=True):
        params = [names[id(p)] for group in opt.param_groups for p in group["params"]]
        state |= {params[i]: s for i, s in saved["state"].items()}
        groups += [{**g, "params": [params[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def write_pointer(path: Path, target: str) -> None:
    tmp = _temporary(path)
    tmp.write_text(target + "\n")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_pointer(path: Path) -> Path | None:
    """The step folder a pointer file names; None without a pointer. A pointer is replaced only
    once its folder is complete, so one naming no complete step folder is damage: refused, as a
    silent None would start the run over (and remove_unused_steps delete its steps)."""
    if not path.is_file():
        return None
    try:
        name = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    step = path.parent / name
    if not name or "/" in name or not (step / TRAIN_STATE).is_file():
        raise UserError(f"{path} is damaged: it names no complete checkpoint folder in {path.parent}; remove it to "
                        "use the run's other checkpoint, if any")
    return step


def remove_unused_steps(run_dir: Path, keep: int = 1) -> None:
    """Step folders neither a pointer names nor among the last `keep` complete ones up to the
    latest: older checkpoints, and saves a kill cut short."""
    folder = Path(run_dir) / SHARDED
    if not folder.is_dir():
        return
    used = {read_pointer(folder / p) for p in POINTERS.values()}
    latest = read_pointer(folder / POINTERS[LAST])
    complete = sorted(p for p in folder.iterdir() if p.is_dir() and (p / TRAIN_STATE).is_file() and latest is not None
                      and p.name <= latest.name)
    used |= set(complete[-keep:])
    for step in folder.iterdir():
        if step.is_dir() and step not in used:
            shutil.rmtree(step, ignore_errors=True)


def kept_checkpoints(run_dir: Path) -> dict[int, Path]:
    """A run's kept checkpoints by iteration, oldest first: its ckpt-<iteration>.pt files and
    ckpt.pt, or its complete step folders up to the latest (keep_checkpoints says how many)."""
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return {}
    if latest.is_dir():
        return {int(p.name): p for p in sorted(latest.parent.iterdir())
                if p.is_dir() and (p / TRAIN_STATE).is_file() and p.name <= latest.name}
    kept = {int(p.name[5:13]): p for p in sorted(run_dir.glob(KEPT_GLOB))}
    if not any(os.path.samefile(latest, p) for p in kept.values()):  # killed before its link
        kept[load_checkpoint(latest)["iter_num"]] = latest
    return dict(sorted(kept.items()))


def latest_checkpoint(run_dir: Path, name: str = LAST) -> Path | None:
    """A run's newest checkpoint of a kind (LAST or BEST): its .pt file or its step folder."""
    file = Path(run_dir) / name
    step = read_pointer(Path(run_dir) / SHARDED / POINTERS[name])
    found = [p for p in (file if file.is_file() else None, step) if p is not None]
    # both exist only after a kill between writing one format and removing the other
    return max(found, key=lambda p: (p / TRAIN_STATE if p.is_dir() else p).stat().st_mtime, default=None)


def save_checkpoint(state: dict, path: Path) -> None:
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"could not save checkpoint {path} ({reason}): is the disk full? The previous checkpoint is intact") from None


def _fsync_dir(folder: Path) -> None:
    """Make a rename in folder durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint without running code. Pickled objects other than tensors and plain
    types are refused, which is what a malicious or foreign file would need."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        # memory-mapped: a rank that never reads the weights (FSDP takes rank 0's) never holds them
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for foreign objects; RuntimeError/EOFError for damage
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds pickled Python objects, which could run code; refused"
        raise UserError(f"cannot load checkpoint {path}: {reason}") from None
    if not isinstance(state, dict):
        raise UserError(f"cannot load checkpoint {path}: not a checkpoint dictionary")
    return state


def resume_state(run_dir: Path, init_from: str) -> dict | None:
    """This run's own latest checkpoint, if any: it wins over init_from, which is how a requeued
    job resumes by itself. A sharded one gives its train_state.pt and, under "sharded_from", the
    step folder its tensors are read from once the model is built (Checkpointer.restore)."""
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        return read_checkpoint(latest)
    if init_from == "resume":
        raise UserError(f"init_from=resume but there is no checkpoint in {run_dir}: resume with python train.py resume=<run folder>")
    return None


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file, or a step folder's train_state.pt and where its tensors are."""
    if path.is_dir():
        return load_checkpoint(path / TRAIN_STATE) | {"sharded_from": str(path)}
    return load_checkpoint(path)


def weights_file(path: Path) -> Path | None:
    """The checkpoint a path names: a file as it is; a run folder's best checkpoint, else its
    latest (a .pt file or a sharded step folder); None for a folder without either."""
    path = Path(path).expanduser()
    if not path.is_dir() or (path / TRAIN_STATE).is_file():
        return path
    return latest_checkpoint(path, BEST) or latest_checkpoint(path, LAST)


def checkpoint_model(path: Path, weights: str = "raw", trusted: Sequence[str] = ()) -> tuple[nn.Module, dict | None]:
    """The model of a checkpoint file or run folder, ours or nanoGPT's, and its data's meta;
    weights="ema": with the EMA of its weights. A model class of someone's package only when its
    module is trusted (model_from_state)."""
    file = weights_file(path)
    if file is None:
        raise UserError(f"no checkpoint in {path}")
    state = read_checkpoint(file)
    if "model_args" not in state or not ("model" in state or "sharded_from" in state):
        raise UserError(f"{file} is not a nanogpt or nanoGPT checkpoint (no model_args/model)")
    if weights == "ema" and not has_ema(state):
        raise UserError(f"{file} holds no EMA weights (its run had ema_decay=0): use weights=raw")
    return model_from_state(state, weights=weights, trusted=trusted, where=str(file)), state.get("meta")


def load_model(source: str, model: GPTConfig | None = None, weights: str = "raw",
               trusted: Sequence[str] = ()) -> tuple[nn.Module, dict | None]:
    """The weights `init_from` names, on the CPU, and the vocabulary they were trained on (a data
    folder's meta; None for GPT-2 and Hugging Face weights, which use GPT-2's BPE):
    - a run folder or a checkpoint file, ours or nanoGPT's (weights="ema": the EMA of its weights);
    - gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 folder.
    Hugging Face weights take `model`'s dropout and a shorter block_size (a checkpoint is loaded as
    it was saved, its model class imported only when `trusted` covers it: targets.trusted_names)."""
    path = Path(source).expanduser()
    if source not in GPT2_NAMES and (path.suffix == ".pt" or (path.is_dir() and weights_file(path) is not None)):
        return checkpoint_model(path, weights, trusted)
    if weights == "ema":
        raise UserError(f"weights=ema takes a run's EMA weights: {source} is not a run or checkpoint of this project")
    if model is not None and model._target_ != GPT_TARGET:
        raise UserError(f"init_from={source} loads GPT-2 weights into nanogpt's GPT, not model._target_={model._target_}")
    return load_pretrained(source, model or GPTConfig()), None


def has_ema(state: dict) -> bool:
    """Whether a checkpoint (read_checkpoint's) holds the EMA of its weights."""
    return "ema" in state if "sharded_from" not in state else has_shards(state["sharded_from"], "ema")


def model_from_state(state: dict, read_shards: bool = True, weights: str = "raw", trusted: Sequence[str] = (),
                     where: str = "the checkpoint") -> nn.Module:
    """The whole model of a checkpoint, with its weights or (weights="ema") their EMA; a sharded
    one's shards are read into it in this process (read_shards=False: the trainer reads them into
    its own, maybe sharded, model, with every rank). The class is the one its model_args record
    (nanoGPT's and older ones: GPT); another than nanogpt's GPT is imported only when `trusted`
    covers it (a run folder is data, not code)."""
    target = state["model_args"].get("_target_", GPT_TARGET)
    if target != GPT_TARGET and not covered(target, trusted):
        raise NotTrusted(target, where)
    cls = resolve(target, "model")
    schema = option_type(cls)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and schema is not None):
        raise UserError(f"{where} names {target} as its model, which is not a model class with a config dataclass")
    model = cls(schema(**state["model_args"]))
    if "sharded_from" in state:
        if not read_shards:
            return model
        tensors = {"model": model.state_dict()}
        if weights == "ema":
            tensors["ema"] = {name: torch.empty_like(p) for name, p in named_parameters(model).items()}
        load_shards(tensors, state["sharded_from"], alone=True)
        model.load_state_dict(tensors["model"])
        averages = tensors.get("ema")
    else:
        model.load_state_dict(strip_prefixes(state["model"]))
        averages = state.get("ema")
    if weights == "ema":
        load_averages(model, averages)
    return model


def strip_prefixes(state_dict: dict) -> dict:
    """Drop the wrappers' prefixes (torch.compile's _orig_mod., DDP's module.) from parameter names,
    and the causal-mask buffers (`attn.bias`) that nanoGPT saved before PyTorch 2.0."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith(".attn.bias"):
            continue
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def find_newest_run(root: Path) -> Path | None:
    """The most recently written run folder below root that holds a checkpoint, debug runs
    (root/.../debug/...) left out."""
    found = [p for p in [*Path(root).glob(f"**/{LAST}"), *Path(root).glob(f"**/{SHARDED}/{POINTERS[LAST]}")]
             if DEBUG not in p.relative_to(root).parts]
    newest = max(found, key=lambda p: p.stat().st_mtime, default=None)
    return None if newest is None else newest.parent if newest.name == LAST else newest.parent.parent


def rng_state() -> dict:
    """Every RNG a run's future may depend on, as tensors and lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def consolidate(source: Path, out: Path, trusted: Sequence[str] = ()) -> Path:
    """A sharded checkpoint (a run folder or a step folder) as one file in ckpt.pt's format: the
    whole model, its EMA if kept, and the train state, loadable with weights_only=True. Optimizer
    state stays in the shards (a resume reads them there)."""
    step = weights_file(Path(source))
    if step is None or not step.is_dir():
        raise UserError(f"{source} holds no sharded checkpoint (no {SHARDED}/latest)")
    state = read_checkpoint(step)
    whole = {"model": model_from_state(state, trusted=trusted, where=str(step)).state_dict()}
    if has_ema(state):
        ema = model_from_state(state, weights="ema", trusted=trusted, where=str(step))
        whole["ema"] = {k: p.detach() for k, p in named_parameters(ema).items()}
    del state["sharded_from"]
    save_checkpoint(state | whole, out)
    return out


def average(source: Path, out: Path, last: int | None = None, iters: list[int] | None = None,
            trusted: Sequence[str] = ()) -> Path:
    """The mean of a run's kept checkpoints' weights (keep_checkpoints), the last `last` or those
    of the given iterations, as one file in ckpt.pt's format that every command reads as weights
    (init_from, sample.py, nanogpt.eval, export): the newest one's train state and config, no
    optimizer state, and "averaged_iters" naming what it averages."""
    kept = kept_checkpoints(Path(source))
    if iters:
        missing = [i for i in iters if i not in kept]
        if missing:
            raise UserError(f"{source} keeps no checkpoint of iteration {', '.join(map(str, missing))} "
                            f"(it keeps {', '.join(map(str, kept)) or 'none'})")
        chosen = sorted(set(iters))
    else:
        if len(kept) < last:
            raise UserError(f"{source} kept {len(kept)} checkpoint(s) ({', '.join(map(str, kept)) or 'none'}), "
                            f"fewer than --last {last}: train with keep_checkpoints={last} or more")
        chosen = list(kept)[-last:]
    newest = read_checkpoint(kept[chosen[-1]])
    weights = mean_state_dict(model_from_state(read_checkpoint(kept[i]), trusted=trusted, where=str(kept[i])).state_dict()
                              for i in chosen)
    training_only = ("model", "optimizers", "scaler", "ema", "sharded_from", "rng", "spike_windows")
    record = {k: v for k, v in newest.items() if k not in training_only}
    save_checkpoint(record | {"model": weights, "averaged_iters": chosen}, out)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m nanogpt.checkpoint",
                                     description="One .pt file from a run's checkpoints, which every command reads.")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("consolidate", help="a sharded (FSDP) run's checkpoint as one .pt file")
    mean = commands.add_parser("average", help="the mean of a run's last kept checkpoints (keep_checkpoints=K)")
    one.add_argument("source", type=Path, help="a run folder (its best, else latest, checkpoint) or a step folder")
    mean.add_argument("source", type=Path, help="a run folder")
    for p in (one, mean):
        p.add_argument("out", type=Path, help="the .pt file to write")
        p.add_argument("--extensions", nargs="+", default=[], metavar="PACKAGE",
                       help="your packages, whose model class the checkpoint may name")
    which = mean.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, metavar="K", help="the last K checkpoints")
    which.add_argument("--iters", type=lambda s: [int(i) for i in s.split(",")], metavar="A,B,C",
                       help="the checkpoints of these iterations")
    args = parser.parse_args(argv)
    try:
        if args.command == "consolidate":
            out = consolidate(args.source, args.out, args.extensions)
        else:
            if args.last is not None and args.last < 1:
                raise UserError(f"--last {args.last}: average at least one checkpoint")
            out = average(args.source, args.out, args.last, args.iters, args.extensions)
        print(f"wrote {out}")
    except NotTrusted as e:
        print(f"error: {e}".replace(f"extensions=[{e.package}]", f"--extensions {e.package}"), file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
