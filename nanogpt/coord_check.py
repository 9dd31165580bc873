"""The coordinate check of Tensor Programs V (Yang et al. 2022, figure 5; microsoft/mup's
get_coord_data): train the model at several widths a few steps on the same real batches, at a
constant rate without warmup, and watch the size of each kind of activation. Under a correct
muP every curve is flat in the width; under SP the logits and hidden outputs grow with it.

    python -m nanogpt.coord_check model.parametrization=mup widths=[64,128,256,512] steps=10
    python -m nanogpt.coord_check -m model.parametrization=sp,mup model.tie_embeddings=false

Besides train.py's config (model, data, optim, system...), its own keys: widths (the first is
muP's base width), steps, lr (default 1e-2), seeds (RMS averaged over this many). Writes into its
run folder coord_check.json (per step and width: each kind's RMS and each weight's update RMS;
`slopes`: each kind's slope of log RMS against log width at the last step) and coord_check.png.
"""

import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanogpt.checks import POSITIVE, Rule, check, valid
from nanogpt.cli import job, run_cli
from nanogpt.config import TrainConfig, build, to_train_config
from nanogpt.errors import UserError
from nanogpt.model import padded_vocab_size

CONF = Path(__file__).parent.parent / "conf"
KINDS = ("embedding", "attention", "mlp", "residual", "logits")  # what is measured, in the model's order


@dataclass
class CoordCheckSettings:
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # model.n_embd values; the first is the base
    steps: int = valid(10, POSITIVE)  # training steps, each measured (its forward pass, its update)
    lr: float = valid(1e-2, POSITIVE)  # the optimizer option's rate, constant: large enough to show a blow-up
    seeds: int = valid(1, POSITIVE)  # models per width, their RMS averaged (mup's nseeds)

    RULES: ClassVar[list[Rule]] = [
        ("widths={c.widths} must be two or more positive widths, smallest first (the base width)",
         lambda c: len(c.widths) >= 2 and c.widths[0] > 0 and list(c.widths) == sorted(set(c.widths))),
    ]


def split_settings(args: list[str]) -> tuple[CoordCheckSettings, list[str]]:
    """This tool's keys (widths=, steps=, lr=, seeds=) from a command line, typed and checked; the
    rest is train.py's config, for Hydra."""
    names = {f.name for f in dataclasses.fields(CoordCheckSettings)}
    ours = [a for a in args if a.split("=", 1)[0] in names]
    parsed = OverridesParser.create().parse_overrides(ours)
    try:
        settings = OmegaConf.merge(OmegaConf.structured(CoordCheckSettings),
                                   {o.key_or_group: o.value() for o in parsed})
    except OmegaConfBaseException as e:
        raise UserError(f"{e.full_key}: {str(e).splitlines()[0]} (nanogpt.coord_check's own key)") from None
    settings = OmegaConf.to_object(settings)
    check(settings)
    return settings, [a for a in args if a not in ours]


def rms(t: torch.Tensor) -> float:
    return t.detach().float().pow(2).mean().sqrt().item()


def measure(config: TrainConfig, settings: CoordCheckSettings, width: int, seed: int,
            batches: list[tuple[torch.Tensor, torch.Tensor]], vocab_size: int) -> tuple[dict, dict]:
    """One model of this width trained on the batches: per kind, its RMS at each step (mean over
    layers), and per weight, the RMS of each step's update."""
    muP = getattr(config.model, "parametrization", "sp") == "mup"
    model_config = dataclasses.replace(config.model, n_embd=width, vocab_size=padded_vocab_size(config.model, vocab_size),
                                       **({"mup_base_width": settings.widths[0]} if muP else {}))
    torch.manual_seed(seed)
    model = build(model_config)
    optim = dataclasses.replace(config.optim, learning_rate=settings.lr)
    built = build(optim, model=model, device_type="cpu")
    optimizers = built if isinstance(built, list) else [built]
    seen: dict[str, list[float]] = {kind: [] for kind in KINDS[:-1]}
    watch = [(model.transformer.drop, "embedding")] + [
        (m, kind) for block in model.blocks for m, kind in ((block.attn, "attention"), (block.mlp, "mlp"), (block, "residual"))]
    hooks = [m.register_forward_hook(lambda _m, _i, out, kind=kind: seen[kind].append(rms(out))) for m, kind in watch]
    acts = {kind: [] for kind in KINDS}
    updates: dict[str, list[float]] = {name: [] for name, _ in model.named_parameters()}
    for x, y in batches:
        for values in seen.values():
            values.clear()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        logits, loss = model(x, y)
        for kind, values in seen.items():
            acts[kind].append(float(np.mean(values)))
        acts["logits"].append(rms(logits))
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            updates[name].append(rms(p - before[name]))
    for h in hooks:
        h.remove()
    return acts, updates


def slope(widths: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log RMS against log width; None where a value is zero."""
    if min(values) <= 0:
        return None
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def coord_check(config: TrainConfig, settings: CoordCheckSettings, run_dir: Path) -> dict:
    """Measure every width, write coord_check.json and coord_check.png, print the slopes."""
    torch.set_num_threads(config.system.num_threads or torch.get_num_threads())
    data = build(config.data)
    data.prepare()
    loader = data.loader(block_size=config.model.block_size, device=torch.device("cpu"), seed=config.system.seed)
    stream = loader.train_batches(0)
    batches = list(itertools.islice(stream, settings.steps))  # the same real batches for every width
    stream.close()
    acts, updates = {k: [] for k in KINDS}, {}
    for width in settings.widths:
        runs = [measure(config, settings, width, config.system.seed + s, batches, data.meta["vocab_size"])
                for s in range(settings.seeds)]
        for kind in KINDS:  # (widths, steps), mean over seeds
            acts[kind].append(np.mean([a[kind] for a, _ in runs], axis=0).tolist())
        for name in runs[0][1]:
            updates.setdefault(name, []).append(np.mean([u[name] for _, u in runs], axis=0).tolist())
    by_step = {k: [slope(settings.widths, [w[s] for w in acts[k]]) for s in range(settings.steps)] for k in KINDS}
    result = {
        "parametrization": getattr(config.model, "parametrization", "sp"),
        **dataclasses.asdict(settings),
        "base_width": settings.widths[0],
        "slopes": {k: by_step[k][-1] for k in KINDS},  # at the last step
        "slopes_by_step": by_step,
        "activations": acts,  # kind -> [width][step] RMS
        "updates": updates,  # parameter -> [width][step] RMS of its update
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "coord_check.json").write_text(json.dumps(result, indent=1) + "\n")
    figure(result).savefig(run_dir / "coord_check.png", dpi=100)
    print(f"coordinate check, {result['parametrization']}, widths {settings.widths}, {settings.steps} steps, lr {settings.lr:g}")
    for kind, value in result["slopes"].items():
        print(f"  {kind:<10} slope {'-' if value is None else f'{value:+.3f}'} (log RMS against log width, last step)")
    print(f"written to {run_dir}/coord_check.json, coord_check.png")
    return result


def figure(result: dict) -> Figure:
    """One panel per kind: RMS against width (log-log), a line per step, later steps darker."""
    fig = Figure(figsize=(3.2 * len(KINDS), 3.2), layout="constrained")
    steps = result["steps"]
    for ax, kind in zip(fig.subplots(1, len(KINDS)), KINDS):
        for s in range(steps):
            ys = [w[s] for w in result["activations"][kind]]
            ax.plot(result["widths"], ys, marker="o", ms=3, color=(0.1, 0.3, 0.8, 0.2 + 0.8 * (s + 1) / steps),
                    label=f"step {s}" if s in (0, steps - 1) else None)
        ax.set(xscale="log", yscale="log", xlabel="width (n_embd)", title=f"{kind} (slope {_fmt(result['slopes'][kind])})")
        ax.xaxis.set_minor_locator(NullLocator())  # the log axis's minor labels would overlap the widths
        ax.set_xticks(result["widths"], [str(w) for w in result["widths"]])
    fig.axes[0].set_ylabel("RMS")
    fig.axes[0].legend()
    fig.suptitle(f"coordinate check, {result['parametrization']}, lr {result['lr']:g}")
    return fig


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:+.2f}"


def main() -> None:
    try:
        settings, rest = split_settings(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *rest]

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name="coord_check")
    @job
    def task(cfg: DictConfig) -> dict:
        from hydra.core.hydra_config import HydraConfig

        return coord_check(to_train_config(cfg), settings, Path(HydraConfig.get().runtime.output_dir))

    run_cli(task, CONF, config_name="coord_check")


if __name__ == "__main__":
    main()
