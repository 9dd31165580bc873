"""Checkpoints: atomic saves, safe loads, and the RNG states that make a resume exact.

A checkpoint is a dict of tensors and plain Python types only, so `torch.load(weights_only=True)`
opens it without running code. Saves go to a temporary file in the same folder, are fsynced,
then renamed over the old file: a kill or a full disk mid-save leaves the previous one intact.
"""

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from nanogpt.config import ConfigError

LAST, BEST = "ckpt.pt", "best.pt"


def save_checkpoint(state: dict, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _test_pause(path)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise ConfigError(f"could not save checkpoint {path} ({reason}): is the disk full? The previous checkpoint is intact") from None


def _test_pause(path: Path) -> None:
    """Test hook: NANOGPT_TEST_PAUSE_BEFORE_RENAME=<seconds> stops here, with the temporary file
    written and the rename not done, and announces it with a <path>.paused file."""
    seconds = os.environ.get("NANOGPT_TEST_PAUSE_BEFORE_RENAME")
    if seconds:
        path.with_name(path.name + ".paused").touch()
        time.sleep(float(seconds))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint without running code. Pickled objects other than tensors and plain
    types are refused, which is what a malicious or foreign file would need."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects; RuntimeError/EOFError for damage
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds pickled Python objects, which could run code; refused"
        raise ConfigError(f"cannot load checkpoint {path}: {reason}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"cannot load checkpoint {path}: not a checkpoint dictionary")
    return state


def find_checkpoint(run_dir: Path) -> Path | None:
    path = Path(run_dir) / LAST
    return path if path.exists() else None


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


def resolve_checkpoint(path: Path) -> Path:
    """A run folder means its best.pt when there is one (always_save_checkpoint=false), else ckpt.pt."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).exists():
                return path / name
        raise ConfigError(f"no checkpoint in {path}")
    return path


def model_from_checkpoint(state: dict):
    from nanogpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(strip_prefixes(state["model"]))
    return model
