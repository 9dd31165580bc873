"""The project's own exceptions, imported by whoever raises them.

A UserError is raised inside the job function, so a multirun records that one job as failed and
goes on; a single run turns it into one line on stderr and exit status 2 (nanogpt.cli).
"""

import signal


class UserError(Exception):
    """Something the user can fix: a setting, an input file, a full disk, no network. The
    message says what is wrong and how to fix it, in one line."""


class Diverged(UserError):
    """A non-finite loss or gradient norm; the message names the iteration."""


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run after a checkpoint. A BaseException, as KeyboardInterrupt is, so a
    sweep stops too instead of recording a failure and going on."""

    def __init__(self, signum: int, resume_hint: str, requeued: bool = False):
        super().__init__(f"stopped by {signal.Signals(signum).name}; {resume_hint}")
        self.signum = signum
        self.requeued = requeued  # SLURM will start the job again: it resumes from the checkpoint
