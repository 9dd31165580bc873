"""Faults injected from outside the code: a sitecustomize.py that every Python process started
with the returned environment runs at start-up (Python imports sitecustomize from sys.path), so
production code carries no test hooks."""

import os
from pathlib import Path

# A checkpoint save stops with its temporary file written and the rename not done, announces it
# with a <checkpoint>.paused file, and waits a minute: time for a test to kill or signal it.
PAUSE_BEFORE_CHECKPOINT_RENAME = """
import os, time
from pathlib import Path
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith(".pt"):
        Path(str(dst) + ".paused").touch()
        time.sleep(60)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
"""


# A sharded save stops with its step folder written and the pointer not yet replaced (from the
# second save on), announces it with <run>/ckpt/paused, and waits a minute.
PAUSE_BEFORE_POINTER_RENAME = """
import os, time
from pathlib import Path
_replace = os.replace
_seen = []
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith("ckpt/latest"):
        _seen.append(dst)
        if len(_seen) == 2:
            Path(dst).with_name("paused").touch()
            time.sleep(60)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
"""


# keep_checkpoints: a save stops after its checkpoint and its ckpt-<iteration>.pt link are
# written, before the oldest kept one is removed, announces it with <run>/prune.paused, and waits a
# minute.
PAUSE_BEFORE_PRUNE = """
import re, time
from pathlib import Path
_unlink = Path.unlink
def unlink(self, *args, **kwargs):
    if re.fullmatch(r"ckpt-[0-9]+[.]pt", self.name):
        (self.parent / "prune.paused").touch()
        time.sleep(60)
    return _unlink(self, *args, **kwargs)
Path.unlink = unlink
"""


# A bad batch: the training loss of one micro-batch is multiplied by SPIKE_FACTOR, gradients with
# it: that of global micro-step SPIKE_MICRO_STEP of data window SPIKE_ITER (the windows of that
# iteration, 0-based, unless a rollback shifted them). Rank r of W takes global micro-steps r, r+W,
# ...: with one micro-step a rank, micro-step r is rank r's batch, and a single process taking all
# of them spikes the same one. Keyed on the window, not the step, so a rollback that skips the
# window leaves the spike behind, and a resume meets it again. The loader makes its batches in order
# (one ahead in the prefetch thread) and yields them in that order: a queue pairs each with its window.
SPIKE_LOSS = """
import os
import nanogpt.data, nanogpt.model
_AT = (int(os.environ["SPIKE_ITER"]), int(os.environ.get("SPIKE_MICRO_STEP", "0")))
_FACTOR = float(os.environ.get("SPIKE_FACTOR", "10"))
_train_batch, _train_batches = nanogpt.data.BatchLoader._train_batch, nanogpt.data.BatchLoader.train_batches
_forward = nanogpt.model.GPT.forward
_made, _current = [], [None]
def train_batch(self, iteration, micro_step):
    _made.append((iteration, self.rank + self.world_size * micro_step))
    return _train_batch(self, iteration, micro_step)
def train_batches(self, *args, **kwargs):
    _made.clear()
    for batch in _train_batches(self, *args, **kwargs):
        _current[0] = _made.pop(0)
        yield batch
def forward(self, idx, targets=None, *args, **kwargs):
    logits, loss = _forward(self, idx, targets, *args, **kwargs)
    if self.training and loss is not None and _current[0] == _AT:
        loss = loss * _FACTOR
    return logits, loss
nanogpt.data.BatchLoader._train_batch = train_batch
nanogpt.data.BatchLoader.train_batches = train_batches
nanogpt.model.GPT.forward = forward
"""


def spike(folder: Path, iteration: int, micro_step: int = 0, factor: float = 10.0, also: str = "") -> dict[str, str]:
    """The environment that plants SPIKE_LOSS in iteration's window at global micro-step
    micro_step (rank micro_step's, with one micro-step a rank); `also`: more faults' code."""
    return inject(folder, SPIKE_LOSS + also) | {"SPIKE_ITER": str(iteration), "SPIKE_MICRO_STEP": str(micro_step),
                                                "SPIKE_FACTOR": str(factor)}


def inject(folder: Path, code: str) -> dict[str, str]:
    """Write code as folder/inject/sitecustomize.py; the environment that loads it."""
    (folder / "inject").mkdir(exist_ok=True)
    (folder / "inject" / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder / "inject"), os.environ.get("PYTHONPATH")]))}
