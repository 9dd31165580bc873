"""What the weight EMA and the per-step spike check cost per training step, side by side: one model,
one optimizer, one stream of batches, rounds alternating with the feature on and off so that a busy
phase of the machine hits both; medians over the rounds. Prints a markdown table (docs/reliability.md).

    python scripts/bench_health.py                         # the CPU recipe and the GPT-2 124M shape
    python scripts/bench_health.py --shape cpu_recipe --rounds 100 --steps 1 system.num_threads=1  # loaded: single steps alternate best
    python scripts/bench_health.py --shape gpt2_small --rounds 6 --steps 2 system=cpu_fast

Shapes: cpu_recipe is the default run (4 layers, 4 heads, 128 wide, block 64, batch 12, its real
batches); gpt2_small is GPT-2 124M (12/12/768, block 1024) on one synthetic 1024-token sequence a
step. Further arguments are config overrides for both (e.g. system=cpu_fast for bf16 autocast).
- EMA: train_step with ema_decay=0.999 against without; also the EMA's update alone (torch's fused
  _foreach_lerp_) and its memory, one copy of the parameters in their dtype.
- spike check (spike.policy=skip|rollback): train_step reading its loss and judging it against a
  full 128-loss window before the update, against without. On a CPU the read waits for nothing;
  on a GPU it is a device sync per step, which this script measures when run there (system=cuda):
  a round's steps are timed together, the device waited for once at its end.
"""

import argparse
import dataclasses
import itertools
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from nanogpt import distributed
from nanogpt.averaging import EMA
from nanogpt.config import build, to_train_config
from nanogpt.device import resolve_device
from nanogpt.spikes import SpikeMonitor
from nanogpt.trainer import build_model, build_training, set_up_rank, train_step

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "cpu_recipe": [],
    "gpt2_small": ["model=gpt2_small", "data.batch_size=1", "model.vocab_size=50304", "data.prefetch=false"],
}


def setting(shape: str, extra: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_train_config(compose(config_name="config", overrides=["system=cpu", *SHAPES[shape], *extra]))


def measure(shape: str, rounds: int, steps: int, extra: list[str]) -> dict:
    config = setting(shape, extra)
    dist = distributed.setup(config.system, resolve_device(config.system).type)
    device, dtype = set_up_rank(config.system, dist)
    if shape == "cpu_recipe":
        data = build(config.data)
        data.prepare()
        meta = data.meta
    else:
        meta = {"vocab_size": config.model.vocab_size}
    t = build_training(config, lambda: build_model(config, meta, saved=None), device, dtype, dist)
    block = t.raw_model.config.block_size
    if shape == "cpu_recipe":
        loader = data.loader(block_size=block, device=device, seed=config.system.seed)
        batches = loader.train_batches(0)
    else:  # one random sequence made once: the step without any data cost
        size = (config.data.batch_size, block + 1)
        xy = torch.randint(config.model.vocab_size, size, generator=torch.Generator().manual_seed(0)).to(device)
        batches = itertools.repeat((xy[:, :-1].contiguous(), xy[:, 1:].contiguous()))
    ema = EMA(t.raw_model, 0.999)
    spikes = SpikeMonitor(dataclasses.replace(config.spike, policy="skip", sigma=1e9), dist, device)
    spikes.load([4.0 + 1e-3 * i for i in range(config.spike.window)])  # full: every step is judged
    it = 0

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(n: int, with_ema: bool, judge: bool) -> float:
        """Seconds a step over n steps, the device waited for once at the end: a per-step sync
        (the spike check's read of the loss) shows as the host's lost lead over the device."""
        nonlocal it
        t.ema = ema if with_ema else None
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(t, batches, it + 10**6, spikes=spikes if judge else None)  # past ema_start: a real average
            it += 1
        sync()
        return (time.perf_counter() - t0) / n

    timed(2, True, True)  # warm-up: allocator, first-step costs
    cases = {"off": (False, False), "ema": (True, False), "spike check": (False, True)}
    times = {name: [] for name in cases}
    for r in range(rounds):
        for name in (list(cases) if r % 2 == 0 else list(reversed(cases))):
            times[name].append(timed(steps, *cases[name]))
    update = []
    for i in range(max(5, rounds)):
        sync()
        t0 = time.perf_counter()
        ema.update(10**6 + i)
        sync()
        update.append(time.perf_counter() - t0)
    params = sum(p.numel() * p.element_size() for p in ema.averages.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    return {"shape": shape, "device": name, "dtype": str(dtype).removeprefix("torch."),
            "params_m": t.raw_model.get_num_params(non_embedding=False) / 1e6, "ema_mib": params / 2**20,
            "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "ema_update_ms": statistics.median(update) * 1e3, "rounds": rounds, "steps": steps}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (medians over them)")
    parser.add_argument("--steps", type=int, default=5, help="steps a round (timed together)")
    args, extra = parser.parse_known_args()
    rows = [measure(s, args.rounds, args.steps, extra) for s in (SHAPES if args.shape == "both" else [args.shape])]
    print(f"device: {rows[0]['device']}; torch {torch.__version__}; overrides: {' '.join(extra) or 'none'}\n")
    print("| shape | dtype | step, off (ms) | EMA 0.999 (ms) | EMA update alone (ms) | EMA memory (MiB) | spike check (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms"]
        pct = lambda k: f"{ms[k]:.1f} ({(ms[k] / ms['off'] - 1) * 100:+.1f}%)"  # noqa: E731
        print(f"| {r['shape']} ({r['params_m']:.1f}M) | {r['dtype']} | {ms['off']:.1f} | {pct('ema')} | "
              f"{r['ema_update_ms']:.2f} | {r['ema_mib']:.1f} | {pct('spike check')} |")
    print(f"\nmedians over {rows[0]['rounds']} alternating rounds of {rows[0]['steps']} steps each (ms a step)")


if __name__ == "__main__":
    main()
