"""Tune small, train big: `transfer_from=<an Optuna search's folder>` gives a run the study's best
parameters (docs/mup.md):

    python train.py -m hparams_search=lr_wd model.parametrization=mup model.n_embd=64   # search at the base width
    python train.py transfer_from=multirun/lr_wd model.n_embd=512                       # train at the target width

The study's best trial's parameters (its search keys: optim.learning_rate, ...) become overrides
of the command, before its own, which win; a muP study also sets the run's muP base width to the
study's, so the rates mean what they meant in the search. They are written to the run's
.hydra/overrides.yaml beside `transfer_from=` itself: the run folder says where its rates came
from, and a resume replays them instead of asking the study again (it may have grown since).
"""

import sys
from pathlib import Path

from omegaconf import OmegaConf

from nanogpt.errors import UserError

KEY = "transfer_from"


def transfer_overrides(overrides: list[str]) -> list[str]:
    """The overrides transfer_from (the last one given) adds to a command's: the study's best
    parameters (and muP base width), except those the command sets itself."""
    given = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == KEY]
    if not given or given[-1] in ("", "null", "None"):
        return []
    folder = Path(given[-1]).expanduser()
    params, where = best_params(folder)
    params.update(base_width(folder))
    set_keys = {o.partition("=")[0].lstrip("+~") for o in overrides}
    added = [f"{k}={v}" for k, v in params.items() if k not in set_keys]
    if added:
        print(f"{KEY}: {' '.join(added)} ({where})", file=sys.stderr)
    return added


def study_storage(folder: Path) -> Path:
    """The study's SQLite file: in the folder (multirun/<study>) or above it (one start's sweep)."""
    for candidate in (folder / "optuna.db", folder.parent / "optuna.db"):
        if candidate.is_file():
            return candidate
    raise UserError(f"{KEY}={folder}: no optuna.db there or above it; name the folder of an Optuna search "
                    "(python train.py -m hparams_search=lr_wd writes multirun/<study_name>/optuna.db)")


def best_params(folder: Path) -> tuple[dict, str]:
    """The best finished trial's parameters, and a line saying where they came from."""
    storage = study_storage(folder)  # before importing optuna: a wrong folder is one line without it
    import optuna

    summaries = optuna.get_all_study_summaries(storage=f"sqlite:///{storage}")
    if len(summaries) != 1:
        raise UserError(f"{KEY}={folder}: {storage} holds {len(summaries)} studies, not one")
    study = optuna.load_study(study_name=summaries[0].study_name, storage=f"sqlite:///{storage}")
    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"{KEY}={folder}: study {study.study_name!r} has no finished trial yet") from None
    finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    return dict(best.params), (f"study {study.study_name!r} in {storage.parent}: trial {best.number}, "
                               f"value {best.value:.4f}, best of {finished} finished")


def base_width(folder: Path) -> dict:
    """A muP study's parametrization and base width (its trials' own model.mup_base_width, else
    their n_embd), read from a trial's saved config; nothing for an SP study."""
    configs = sorted(folder.rglob(".hydra/config.yaml")) or sorted(folder.parent.rglob(".hydra/config.yaml"))
    if not configs:
        return {}
    model = OmegaConf.load(configs[0]).get("model", {})
    if model.get("parametrization", "sp") != "mup":
        return {}
    return {"model.parametrization": "mup", "model.mup_base_width": model.get("mup_base_width") or model.get("n_embd")}
