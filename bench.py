"""Measure training speed: timed iterations after a warm-up, on real or synthetic batches.

    python bench.py                                   # the default CPU recipe (4/4/128, block 64, batch 12)
    python bench.py experiment=shakespeare_char system=cpu bench.iters=5 bench.warmup=1
    python bench.py system=cpu_fast bench.json=true   # one JSON object on stdout, for tools
    python bench.py model=gpt2_small data=openwebtext data.batch_size=12 bench.data=synthetic
    python bench.py -m data.batch_size=8,16,32        # a sweep: one report per job

Same config groups and keys as train.py, plus `bench.*` (conf/bench.yaml). Each iteration is the
trainer's step: micro-steps of forward and backward, gradient clipping, the optimizer step.
MFU counts the model's training FLOPs (6N + 12LHQT per token, PaLM appendix B) against the
published bf16 peak of a known GPU and against a large matmul measured here in the run's dtype.
"""

import gc

gc.disable()  # the imports make ~0.5M objects that live as long as the process: collecting
#                them while they pile up took ~0.5 s of start-up (docs/benchmark.md)

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nanogpt import distributed
from nanogpt.cli import job, run_cli
from nanogpt.config import TrainConfig, build, to_train_config
from nanogpt.device import autocast, memory_mb, resolve_device, use_compile
from nanogpt.checks import NON_NEGATIVE, POSITIVE, OneOf, valid
from nanogpt.flops import flops_per_token, measure_matmul_flops, params, published_peak
from nanogpt.data import TokenData
from nanogpt.model import GPT, KVCache
from nanogpt.rundir import seconds_since_process_start
from nanogpt.sampling import Sampling, generate
from nanogpt.trainer import Training, build_model, build_training, set_up_rank, tokens_per_iter, train_step

gc.freeze()  # ...and no later collection walks them
gc.enable()

GPT2_VOCAB = 50257  # synthetic batches without model.vocab_size: GPT-2's tokenizer


@dataclass
class BenchSettings:
    iters: int = valid(20, POSITIVE)  # timed iterations
    warmup: int = valid(3, NON_NEGATIVE)  # untimed iterations first: compilation, allocator and cache warm-up
    data: str = valid("real", OneOf("real", "synthetic"))  # real: the loader on prepared data | synthetic: random tokens made once
    json: bool = False  # print one JSON object instead of the report
    task: str = valid("train", OneOf("train", "sample"))  # sample: prefill and decode speed of sample.py's engine
    prompt_tokens: int = valid(16, POSITIVE)  # task=sample: the prompt's length
    new_tokens: int = valid(500, POSITIVE)  # task=sample: tokens decoded per sample
    samples: int = valid(8, POSITIVE)  # task=sample: the batch measured beside one sample


# bench.yaml types its `bench` node with this schema (`/bench_schema@bench`); train.py's config
# holds that node empty (TrainConfig.bench), so bench.* there is refused, as any unknown key
ConfigStore.instance().store(name="bench_schema", node=BenchSettings)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def synthetic_batches(
    batch_size: int, block_size: int, vocab_size: int, device: torch.device, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A few random batches made once on the device and cycled: the step without any data cost."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(4):
        xy = torch.randint(vocab_size, (batch_size, block_size + 1), generator=g).to(device)
        batches.append((xy[:, :-1].contiguous(), xy[:, 1:].contiguous()))
    while True:
        yield from batches


class Waited:
    """An iterator that counts the seconds its consumer waits for items."""

    def __init__(self, items: Iterator):
        self.items, self.seconds = items, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        item = next(self.items)
        self.seconds += time.perf_counter() - t
        return item


def set_up(config: TrainConfig) -> tuple[Callable[[], GPT], torch.device, torch.dtype, TokenData, distributed.DistInfo]:
    """The trainer's set-up of one process (device, precision, threads, seed); what builds its model."""
    dist = distributed.setup(config.system, resolve_device(config.system).type)
    device, dtype = set_up_rank(config.system, dist)
    data = build(config.data)
    if config.bench.data == "real":
        data.prepare()
    meta = data.meta if config.bench.data == "real" else {"vocab_size": config.model.vocab_size or GPT2_VOCAB}
    return lambda: build_model(config, meta, saved=None), device, dtype, data, dist


def bench(config: TrainConfig) -> dict:
    """Build what the trainer builds, run warm-up + timed iterations, return the figures."""
    b = config.bench
    # 1) the trainer's set-up of one process, its model, optimizer and batches
    build_model_, device, dtype, data, dist = set_up(config)
    training = build_training(config, build_model_, device, dtype, dist)
    block_size = training.raw_model.config.block_size
    if b.data == "real":
        loader = data.loader(block_size=block_size, device=device, seed=config.system.seed, micro_steps=training.micro_steps)
        batches = Waited(loader.train_batches(0))
    else:
        vocab = training.raw_model.config.vocab_size
        batches = Waited(synthetic_batches(config.data.batch_size, block_size, vocab, device, config.system.seed))
    sync = torch.cuda.synchronize if device.type == "cuda" else None  # the device's time, not the host's queueing

    # 2) warm-up, then the timed iterations: the trainer's step
    startup_s = seconds_since_process_start()
    step_s, data_s = [], []
    for i in range(b.warmup + b.iters):
        t, waited = time.perf_counter(), batches.seconds
        train_step(training, batches, i, after_step=sync)
        if i == 0:
            first_iter_s = time.perf_counter() - t
        if i >= b.warmup:
            step_s.append(time.perf_counter() - t)
            data_s.append(batches.seconds - waited)
    if b.data == "real":
        batches.items.close()  # stops the prefetch thread

    result = figures(config, training, step_s, data_s, startup_s, first_iter_s)
    # each rank's own memory and step time: FSDP against DDP is a per-rank question
    mine = {"rank": dist.rank, "peak_memory_mb": result["peak_memory_mb"], "ms_per_iter": result["ms_per_iter"]}
    result |= {"world_size": dist.world_size, "parallelism": config.system.parallelism if dist.enabled else "none",
               "ranks": distributed.gather_objects(mine, dist)}
    del training  # DDP's reducer goes before the process group it holds (see trainer._train)
    distributed.teardown()
    return result


def figures(config: TrainConfig, t: Training, step_s: list[float], data_s: list[float], startup_s: float | None,
            first_iter_s: float) -> dict:
    """The timed steps as the report's figures: speed, MFU against both peaks, data cost, memory."""
    b, raw_model, device, micro_steps = config.bench, t.raw_model, t.device, t.micro_steps
    batch_size, block_size = config.data.batch_size, raw_model.config.block_size
    median = statistics.median(step_s)
    tokens = tokens_per_iter(config, block_size)  # one process: its micro-steps are all of them
    tokens_per_s = tokens / median
    fpt = flops_per_token(raw_model)
    achieved = fpt * tokens_per_s
    published = published_peak(device)
    measured = measure_matmul_flops(device, t.dtype, n=8192 if device.type == "cuda" else 2048)
    quartiles = statistics.quantiles(step_s, n=4) if len(step_s) > 1 else [median] * 3
    return {
        "device": device_name(device),
        "dtype": str(t.dtype).removeprefix("torch."),
        "compile": use_compile(config.system, device),
        "params": params(raw_model),
        "batch_size": batch_size,
        "block_size": block_size,
        "micro_steps": micro_steps,
        "tokens_per_iter": tokens,
        "data": b.data,
        "iters": b.iters,
        "warmup": b.warmup,
        "ms_per_iter": median * 1e3,
        "ms_per_iter_min": min(step_s) * 1e3,
        "ms_per_iter_max": max(step_s) * 1e3,
        "ms_per_iter_iqr": (quartiles[2] - quartiles[0]) * 1e3,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "achieved_tflops": achieved / 1e12,
        "published_peak_tflops": published / 1e12 if published else None,
        "mfu_published": achieved / published if published else None,
        "measured_peak_tflops": measured / 1e12,
        "mfu_measured": achieved / measured,
        "data_ms_per_batch": statistics.median(data_s) / micro_steps * 1e3,
        "data_share": sum(data_s) / sum(step_s),
        "peak_memory_mb": memory_mb(device)["mem_peak_mb"],  # what the trainer logs
        "startup_s": startup_s,
        "first_iter_s": first_iter_s,
        "torch": torch.__version__,
    }


def report(r: dict) -> str:
    """The figures as a short human-readable block."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x * 100:.1f}%"

    published = (
        f"{pct(r['mfu_published'])} of {r['published_peak_tflops']:.0f} TFLOP/s published bf16 peak"
        if r["published_peak_tflops"]
        else "no published peak for this device"
    )
    startup = "n/a" if r["startup_s"] is None else f"{r['startup_s']:.2f} s"
    return "\n".join(
        [
            f"device      {r['device']}; {r['dtype']}, compile {r['compile']}, torch {r['torch']}",
            f"model       {r['params'] / 1e6:.2f}M parameters; {r['micro_steps']} x {r['batch_size']} x "
            f"{r['block_size']} = {r['tokens_per_iter']:,} tokens per iteration ({r['data']} batches)",
            f"iteration   {r['ms_per_iter']:.2f} ms median over {r['iters']} (after {r['warmup']} warm-up): "
            f"min {r['ms_per_iter_min']:.2f}, max {r['ms_per_iter_max']:.2f}, IQR {r['ms_per_iter_iqr']:.2f}",
            f"throughput  {r['tokens_per_s']:,.0f} tokens/s; {r['flops_per_token'] / 1e6:.2f} MFLOP per token; "
            f"{r['achieved_tflops'] * 1e3:.2f} GFLOP/s achieved",
            f"MFU         {pct(r['mfu_measured'])} of {r['measured_peak_tflops'] * 1e3:.1f} GFLOP/s measured "
            f"{r['dtype']} matmul; {published}",
            f"data        {r['data_ms_per_batch']:.3f} ms per batch, {pct(r['data_share'])} of the step",
            f"memory      {r['peak_memory_mb']:,.0f} MiB peak",
            *([f"ranks       {r['world_size']} ({r['parallelism']}): "
               + "; ".join(f"rank {x['rank']} {x['peak_memory_mb']:,.0f} MiB peak, {x['ms_per_iter']:.1f} ms/iter"
                           for x in r["ranks"])] if r["world_size"] > 1 else []),
            f"start-up    {startup} from process start to the first iteration, which took {r['first_iter_s']:.2f} s",
        ]
    )


def bench_sampling(config: TrainConfig) -> dict:
    """Prefill and decode speed of the sampling engine on a random prompt: one sample, then a batch."""
    b = config.bench
    build_model_, device, dtype, _, _ = set_up(config)
    raw_model = build_model_().to(device).eval()
    model = torch.compile(raw_model, dynamic=True) if use_compile(config.system, device) else raw_model
    g = torch.Generator().manual_seed(config.system.seed)
    prompt = torch.randint(raw_model.config.vocab_size, (b.prompt_tokens,), generator=g).tolist()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sampling = Sampling(temperature=1.0, seed=config.system.seed)

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    with torch.no_grad(), autocast(device, dtype):
        timed(lambda: generate(model, [prompt], 1, 8, sampling))  # warm-up (and compilation)
        prefill_s = statistics.median(
            timed(lambda: model(torch.tensor([prompt], device=device), cache=KVCache.empty(raw_model, 1, device)))
            for _ in range(5)
        )
        figures = {"prefill_tokens_per_s": b.prompt_tokens / prefill_s}
        for n in dict.fromkeys([1, b.samples]):
            seconds = timed(lambda: generate(model, [prompt], n, b.new_tokens, sampling))
            figures[f"decode_tokens_per_s_{n}"] = n * b.new_tokens / max(seconds - prefill_s, 1e-9)
            figures[f"seconds_{n}"] = seconds
    return figures | {
        "device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "compile": model is not raw_model,
        "params": params(raw_model), "prompt_tokens": b.prompt_tokens,
        "new_tokens": b.new_tokens, "samples": b.samples, "torch": torch.__version__,
        "graphs_compiled": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }


def report_sampling(r: dict) -> str:
    lines = [
        f"device      {r['device']}; {r['dtype']}, compile {r['compile']}, torch {r['torch']}",
        f"model       {r['params'] / 1e6:.2f}M parameters; a {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens a sample",
        f"prefill     {r['prefill_tokens_per_s']:,.0f} tokens/s",
    ]
    for n in dict.fromkeys([1, r["samples"]]):
        lines.append(f"decode      {r[f'decode_tokens_per_s_{n}']:,.1f} tokens/s with {n} sample(s), "
                     f"{r[f'seconds_{n}']:.2f} s in all")
    if r["compile"]:
        lines.append(f"compile     {r['graphs_compiled']} graphs for all of it (not one per token)")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
@job
def main(cfg: DictConfig) -> dict:
    config = to_train_config(cfg)
    sample = config.bench.task == "sample"
    result = bench_sampling(config) if sample else bench(config)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports for all
        print(json.dumps(result) if config.bench.json else (report_sampling if sample else report)(result), flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)
