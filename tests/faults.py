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


def inject(folder: Path, code: str) -> dict[str, str]:
    """Write code as folder/inject/sitecustomize.py; the environment that loads it."""
    (folder / "inject").mkdir(exist_ok=True)
    (folder / "inject" / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder / "inject"), os.environ.get("PYTHONPATH")]))}
