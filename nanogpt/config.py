"""Typed schemas of the configuration groups, registered in Hydra's ConfigStore.

Each YAML option in conf/<group>/ names its schema in its defaults list, so a misspelt key or a
wrong type fails at composition, before any work. A schema's defaults are the values a run gets:
a group with one option per schema (optim, schedule, logger) has a YAML equal to its schema, and a
preset of a shared schema (model, data, system) sets only what differs. The entry point converts
the composed DictConfig once (`to_train_config`); from there on the package sees plain
dataclasses, and `build` hands each group's dataclass to the builder its `_target_` names.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_method
from omegaconf import II, MISSING, DictConfig, OmegaConf

from nanogpt.errors import UserError
from nanogpt.flops import cpu_has_fast_bf16
from nanogpt.model import GPTConfig

ASSETS = Path(__file__).parent / "assets"


@dataclass
class DataConfig:
    _target_: str = "nanogpt.data.TokenData"
    name: str = MISSING  # prepared data lives in <root>/<name>
    root: str = "data"  # outside the run folders: runs share prepared data
    source: list[str] = field(default_factory=list)  # text files or folders to tokenise
    hf_dataset: str | None = None  # a Hugging Face dataset instead of files (openwebtext)
    tokenizer: str = "char"  # char | a tiktoken encoding (gpt2)
    val_fraction: float = 0.1  # the last 10% of the text is the validation split
    batch_size: int = 12  # sequences per micro-step per rank
    prefetch: bool = True  # build the next batch in a background thread while the step runs


@dataclass
class AdamWConfig:
    _target_: str = "nanogpt.optim.build_adamw"
    learning_rate: float = 1e-3  # peak rate; nanoGPT's 6e-4 is GPT-2 124M's, 1e-3 suits small models
    weight_decay: float = 0.1  # on 2-D weights only; biases, norms and gains are not decayed
    beta1: float = 0.9
    beta2: float = 0.99  # nanoGPT's default is 0.95; 0.99 suits few tokens per iteration
    fused: bool | None = None  # None: the fused kernel where the device has one


@dataclass
class MuonConfig(AdamWConfig):
    _target_: str = "nanogpt.optim.build_muon"
    learning_rate: float = 2e-2  # AdamW's part (embeddings, head, norms, biases): they learn fast
    weight_decay: float = 0.0
    beta2: float = 0.95
    muon_learning_rate: float = 5e-3  # the 2-D hidden weights; update RMS 0.2 x this (match_rms_adamw)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0


@dataclass
class CosineScheduleConfig:
    _target_: str = "nanogpt.optim.cosine_schedule"
    decay_lr: bool = True  # False: constant learning rate after warmup
    warmup_iters: int = 100
    lr_decay_iters: int = II("max_iters")  # decay over the whole run (~ max_iters per Chinchilla)
    min_lr: float = 1e-4  # ~ learning_rate / 10 per Chinchilla


@dataclass
class WSDScheduleConfig:
    _target_: str = "nanogpt.optim.wsd_schedule"
    warmup_iters: int = 100
    lr_decay_iters: int = II("max_iters")  # the schedule ends here, like cosine's
    decay_fraction: float = 0.5  # the last half of lr_decay_iters decays linearly to min_lr
    min_lr: float = 0.0


@dataclass
class SystemConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16/fp16 on CUDA, fp32 elsewhere)
    compile: bool | None = None  # torch.compile; None: on for CUDA, off elsewhere
    seed: int = 1337  # rank r seeds its dropout with seed + r
    deterministic: bool = False  # bit-identical across processes; compiled CPU kernels otherwise add atomically
    tf32: bool = True  # TF32 matmuls on Ampere and newer
    cpu_memory_cache: bool = True  # on CPU, freed memory is reused instead of page-faulted afresh every step
    parallel_dropout: bool = False  # on CPU, dropout masks drawn on all threads (nanogpt.dropout), not torch's serial kernel
    backend: str = "auto"  # auto | nccl | gloo
    nproc_per_node: int = 1  # >1: this job starts that many DDP workers itself
    num_threads: int | None = None  # None: the CPUs this process may use / local ranks
    dist_timeout_s: int = 300  # a collective waiting longer means a peer died: fail, don't hang


@dataclass
class WandbConfig:
    _target_: str = "nanogpt.tracking.start_wandb"
    project: str = "nanogpt"
    entity: str | None = None
    name: str | None = None  # None: the job name and its overrides
    group: str | None = None  # None: the sweep folder in a multirun
    tags: list[str] = field(default_factory=list)
    mode: str = "online"  # online | offline | disabled


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = MISSING
    optim: Any = MISSING  # AdamWConfig or MuonConfig
    schedule: Any = MISSING  # CosineScheduleConfig or WSDScheduleConfig
    system: SystemConfig = field(default_factory=SystemConfig)
    logger: dict[str, Any] = field(default_factory=dict)  # the trackers, by name: {} or {"wandb": WandbConfig}

    init_from: str = "scratch"  # scratch | resume | gpt2* | a path (run folder, ckpt.pt, HF folder)
    max_iters: int = 2000
    gradient_accumulation_steps: int = 1  # global micro-steps per iteration, divided among ranks
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20  # batches per split and eval
    eval_only: bool = False  # evaluate once and stop
    eval_at_start: bool = False  # nanoGPT evaluates at iteration 0; off so big models start at once
    log_interval: int = 10
    always_save_checkpoint: bool = True  # False: also keep best.pt, the weights of the best val loss
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss or gradient norm does


@dataclass
class SampleConfig:
    init_from: str | None = None  # a run folder, a checkpoint, gpt2* or an HF folder; None: the newest run
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8  # <1 sharper, >1 more random
    top_k: int | None = 200  # sample among the k likeliest tokens only
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    runs_root: str = "outputs"  # where the newest run is looked for


# Schemas are stored outside any group (a YAML option names one as /<name>@_here_), so that
# `--help` and tab completion offer only the YAML options of each group.
SCHEMAS = {
    "train_schema": TrainConfig,
    "sample_schema": SampleConfig,
    "model_schema": GPTConfig,
    "data_schema": DataConfig,
    "adamw_schema": AdamWConfig,
    "muon_schema": MuonConfig,
    "cosine_schema": CosineScheduleConfig,
    "wsd_schema": WSDScheduleConfig,
    "system_schema": SystemConfig,
    "wandb_schema": WandbConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


def _fast_cpu_dtype() -> str:
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


# ${asset:name} -> a file shipped inside the package (Tiny Shakespeare), wherever it is installed
OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS / name), replace=True)
# ${fast_cpu_dtype:} -> bfloat16 where this CPU multiplies bf16 at least twice as fast as fp32 (system=cpu_fast)
OmegaConf.register_new_resolver("fast_cpu_dtype", _fast_cpu_dtype, replace=True)
register_configs()


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve and convert the composed config once, then check what types cannot."""
    try:
        config = OmegaConf.to_object(cfg)
        # GPTConfig checks its own invariants in __post_init__; the composed node skipped it
        config.model = GPTConfig(**vars(config.model))
    except ValueError as e:
        raise UserError(str(e)) from None
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    """Settings whose values, not types, are wrong. Each message says how to fix it."""
    positive = {
        "data.batch_size": c.data.batch_size,
        "model.block_size": c.model.block_size,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "eval_iters": c.eval_iters,
        "eval_interval": c.eval_interval,
        "log_interval": c.log_interval,
        "system.nproc_per_node": c.system.nproc_per_node,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key}={value} must be positive")
    if c.max_iters < 0:
        raise UserError(f"max_iters={c.max_iters} must be >= 0")
    if c.nan_policy not in ("stop", "skip"):
        raise UserError(f"nan_policy={c.nan_policy!r}: choose stop or skip")
    if c.system.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"system.dtype={c.system.dtype!r}: choose auto, float32, bfloat16 or float16")
    if not 0 < c.data.val_fraction < 1:
        raise UserError(f"data.val_fraction={c.data.val_fraction} must be between 0 and 1")


def build(node, **runtime):
    """Call the builder a group's `_target_` names with the group's dataclass and the runtime
    dependencies (model, device, ...) as keywords: one level, never a tree of objects."""
    try:
        builder = get_method(node._target_)
    except Exception as e:
        raise UserError(f"_target_={node._target_!r} cannot be imported ({e})") from None
    return builder(node, **runtime)
