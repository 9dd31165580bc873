"""Checkpoints: the format of a run's saved state, and every way a command loads weights.

A checkpoint is a dict of tensors and plain Python types only, so `torch.load(weights_only=True)`
opens it without running code. Its keys: model, optimizers, scaler, model_args, config, meta,
provenance, and the TrainState's fields (iter_num and best_val_loss as nanoGPT names them).
Saves go to a temporary file in the same folder, are fsynced, then renamed over the old file: a
kill or a full disk mid-save leaves the previous one intact.

A run folder holds ckpt.pt, the latest state (what a resume continues), and best.pt, the weights
of the best val loss when always_save_checkpoint=false. Weights taken from a run folder
(`init_from`, sampling, export) come from best.pt when there is one, else ckpt.pt.
"""

import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanogpt import distributed
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.pretrained import GPT2_NAMES, load_pretrained

LAST, BEST = "ckpt.pt", "best.pt"


@dataclass
class TrainState:
    """What the training loop carries from one iteration to the next, and a resume restores."""

    iter_num: int = 0  # iterations done
    best_val_loss: float = math.inf
    train_time_s: float = 0.0  # time spent in steps so far, over every resume: metrics' time axis
    tracker_ids: dict[str, str] = field(default_factory=dict)  # tracker name -> its run id, to continue that run
    rng: list[dict] = field(default_factory=list)  # every rank's RNG states, by rank (filled when saved)


class Checkpointer:
    """Saves and restores a run's full state in its folder. Every rank calls save (the RNG states
    are gathered from all of them); rank 0 writes."""

    def __init__(self, run_dir: Path, model: GPT, optimizers: list, scaler, dist: distributed.DistInfo, **extra):
        self.run_dir, self.model, self.optimizers, self.scaler, self.dist = Path(run_dir), model, optimizers, scaler, dist
        self.extra = extra  # config, meta, provenance: written as they are
        if dist.is_main:  # a save killed midway left its temporary file; rank 0 holds the folder's lock: no one else writes
            for name in (LAST, BEST):
                _temporary(self.run_dir / name).unlink(missing_ok=True)

    def save(self, state: TrainState, name: str = LAST) -> None:
        rng = distributed.gather_objects(rng_state(), self.dist)  # a collective: every rank calls it
        if self.dist.is_main:
            full = {
                "model": self.model.state_dict(),
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "scaler": self.scaler.state_dict(),
                "model_args": dataclasses.asdict(self.model.config),
                **dataclasses.asdict(dataclasses.replace(state, rng=rng)),
                **self.extra,
            }
            save_checkpoint(full, self.run_dir / name)

    def restore(self, saved: dict) -> TrainState:
        """Optimizers, loss scaler and this rank's RNGs from a checkpoint of this run (the model
        was built from it); the TrainState to continue from."""
        for opt, opt_state in zip(self.optimizers, saved["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        self.scaler.load_state_dict(saved["scaler"])
        state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
        if self.dist.rank < len(state.rng):
            set_rng_state(state.rng[self.dist.rank])
        return state


def save_checkpoint(state: dict, path: Path) -> None:
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"could not save checkpoint {path} ({reason}): is the disk full? The previous checkpoint is intact") from None


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint without running code. Pickled objects other than tensors and plain
    types are refused, which is what a malicious or foreign file would need."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
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
    job resumes by itself."""
    path = Path(run_dir) / LAST
    if path.exists():
        return load_checkpoint(path)
    if init_from == "resume":
        raise UserError(f"init_from=resume but there is no checkpoint in {run_dir}: resume with python train.py resume=<run folder>")
    return None


def weights_file(path: Path) -> Path | None:
    """The checkpoint a path names: a file as it is; a run folder's best.pt, else its ckpt.pt;
    None for a folder without either."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    return next((path / name for name in (BEST, LAST) if (path / name).exists()), None)


def checkpoint_model(path: Path) -> tuple[GPT, dict | None]:
    """The model of a checkpoint file or run folder, ours or nanoGPT's, and its data's meta."""
    file = weights_file(path)
    if file is None:
        raise UserError(f"no checkpoint in {path}")
    state = load_checkpoint(file)
    if "model_args" not in state or "model" not in state:
        raise UserError(f"{file} is not a nanogpt or nanoGPT checkpoint (no model_args/model)")
    return model_from_state(state), state.get("meta")


def load_model(source: str, model: GPTConfig | None = None) -> tuple[GPT, dict | None]:
    """The weights `init_from` names, on the CPU, and the vocabulary they were trained on (a data
    folder's meta; None for GPT-2 and Hugging Face weights, which use GPT-2's BPE):
    - a run folder or a checkpoint file, ours or nanoGPT's;
    - gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 folder.
    Hugging Face weights take `model`'s dropout and a shorter block_size (a checkpoint is loaded as
    it was saved)."""
    path = Path(source).expanduser()
    if source not in GPT2_NAMES and (path.suffix == ".pt" or (path.is_dir() and weights_file(path) is not None)):
        return checkpoint_model(path)
    return load_pretrained(source, model or GPTConfig()), None


def model_from_state(state: dict) -> GPT:
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(strip_prefixes(state["model"]))
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
    """The most recently written run folder below root that holds a checkpoint."""
    found = [p for p in Path(root).glob(f"**/{LAST}")]
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


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
