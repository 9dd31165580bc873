"""Evaluate a model on the eval group's tasks: a table on stdout, eval.json in the output folder.

    python -m nanogpt.eval init_from=gpt2 eval=[hellaswag]
    python -m nanogpt.eval init_from=outputs/2026-12-02/10-00-00 eval=[bpb,hellaswag] eval.tasks.hellaswag.limit=500
    python -m nanogpt.eval init_from=gpt2 eval=[bpb] data=openwebtext system=cpu_fast
    python -m nanogpt.eval init_from=outputs/2026-12-02/10-00-00 weights=ema eval=[bpb]   # its EMA weights
    torchrun --standalone --nproc_per_node=2 -m nanogpt.eval init_from=gpt2 eval=[hellaswag]

The config is the training config's (conf/evaluate.yaml includes conf/config.yaml): `data` is
the folder bpb reads (its vocabulary must be the model's), `system` the device and precision,
`eval` the tasks. init_from=scratch (the default) evaluates the newest run under outputs/.
"""

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nanogpt import distributed
from nanogpt.checkpoint import find_newest_run, load_model
from nanogpt.cli import job, run_cli
from nanogpt.config import BitsPerByteConfig, TrainConfig, build, to_train_config
from nanogpt.data import split_streams
from nanogpt.datafolder import load_meta
from nanogpt.device import autocast, resolve_device
from nanogpt.errors import UserError
from nanogpt.evaluation import Evaluator
from nanogpt.targets import trusted_names
from nanogpt.tokenizer import definition, tokenizer_from_meta
from nanogpt.trainer import set_up_rank

CONF = Path(__file__).parent.parent / "conf"
RESULT = "eval.json"


def evaluate(config: TrainConfig, out_dir: Path | None) -> dict:
    """Score init_from's model on every task of config.eval; rank 0 writes out_dir/eval.json."""
    if not config.eval.tasks:
        raise UserError("no tasks to evaluate: choose some, e.g. eval=[bpb,hellaswag]")
    dist = distributed.setup(config.system, resolve_device(config.system).type)
    try:
        device, dtype = set_up_rank(config.system, dist)
        source = config.init_from if config.init_from != "scratch" else find_newest_run(Path("outputs"))
        if source is None:
            raise UserError("no runs with a checkpoint under outputs/: pass init_from=<run | checkpoint | gpt2*>")
        model, trained_on = load_model(str(source), config.model, config.weights, trusted_names(config))
        meta = trained_on or {"tokenizer": "gpt2"}  # GPT-2 and Hugging Face weights: GPT-2's BPE
        model.to(device)
        evaluator = Evaluator(config.eval, tokenizer_from_meta(meta), model.config.vocab_size, model.config.block_size,
                              data_streams(config, meta, dist), dist)
        t0 = time.perf_counter()
        scores = evaluator(model, device, autocast(device, dtype))
        result = {"init_from": str(source), "weights": config.weights, "scores": scores, "counts": evaluator.counts,
                  "seconds": time.perf_counter() - t0,
                  "world_size": dist.world_size, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    finally:
        distributed.teardown()
    if dist.is_main:
        print(format_scores(scores))
        if out_dir is not None:
            (out_dir / RESULT).write_text(json.dumps(result, indent=2) + "\n")
            print(f"written to {out_dir / RESULT}")
    return result


def data_streams(config: TrainConfig, meta: dict, dist: distributed.DistInfo) -> dict:
    """The data group's splits, prepared on first use, when a task reads them (bpb)."""
    if not any(isinstance(c, BitsPerByteConfig) for c in config.eval.tasks.values()):
        return {}
    data = build(config.data)
    if dist.is_main:
        data.prepare()
    distributed.broadcast_object(None, dist)
    if definition(data.meta) != definition(meta):
        raise UserError(
            f"bpb reads {data.path}, whose vocabulary ({data.meta['tokenizer']}) is not the model's "
            f"({meta['tokenizer']}): choose data the model's tokenizer made, e.g. data=shakespeare for GPT-2"
        )
    return split_streams(data.path, load_meta(data.path))  # a mixture's data.path: its first source's folder


def format_scores(scores: dict[str, float]) -> str:
    width = max(map(len, scores))
    return "\n".join(f"{name.ljust(width)}  {value:.4f}" for name, value in scores.items())


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="evaluate")
@job
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    return evaluate(to_train_config(cfg), Path(HydraConfig.get().runtime.output_dir))


def follow(cfg: DictConfig) -> dict:
    """torchrun ranks 1..N-1: they score their share; rank 0 writes."""
    return evaluate(to_train_config(cfg), None)


if __name__ == "__main__":
    run_cli(main, CONF, follow, config_name="evaluate")
