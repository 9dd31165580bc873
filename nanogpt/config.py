"""Typed schemas of the configuration groups, registered in Hydra's ConfigStore.

Each YAML option in conf/<group>/ names its schema in its defaults list, so a misspelt key or a
wrong type fails at composition, before any work. A schema's defaults are the values a run gets:
a group with one option per schema (optim, schedule, logger) has a YAML equal to its schema, and a
preset of a shared schema (model, data, system) sets only what differs. The entry point converts
the composed DictConfig once (`to_train_config`); from there on the package sees plain
dataclasses, and `build` hands each group's dataclass to the builder its `_target_` names. A
user's own option (their config folder) is typed by their builder's dataclass (nanogpt.targets).
"""

import copy
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from nanogpt.checks import FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, Exists, Matches, NotEmpty, OneOf, Range, Rule, check, valid
from nanogpt.errors import UserError
from nanogpt.flops import cpu_has_fast_bf16
from nanogpt.model import GPTConfig
from nanogpt.protocol import MODEL_CONFIG_KEYS, check_builder
from nanogpt.targets import Option, option_type, resolve, targets_in, with_options

ASSETS = Path(__file__).parent / "assets"
CONF = Path(__file__).parent.parent / "conf"  # the presets a mixture may name


DEVICE = Matches(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")
DTYPE = OneOf("auto", "float32", "bfloat16", "float16")
MODULES = Matches(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", "Python packages or modules (mypkg, mypkg.models)", ["not a module"])


@dataclass
class BatchesConfig:
    """What every option of the data group has: where prepared folders live, and how batches are
    cut from them (a folder of its own, DataConfig, or a mixture of folders, MixConfig)."""

    _target_: str = MISSING
    name: str = MISSING  # prepared data lives in <root>/<name>
    root: str = "data"  # outside the run folders: runs share prepared data
    batch_size: int = valid(12, POSITIVE)  # sequences per micro-step per rank
    order: str = valid("random", OneOf("random", "epoch"))  # epoch: every window once an epoch, ranks never share one
    align: bool = False  # windows start at a document's first token (long documents: every block_size tokens)
    packing: str = valid("none", OneOf("none", "bestfit"))  # bestfit: rows of whole documents, each starting one
    pack_buffer: int = valid(1000, POSITIVE)  # bestfit: documents a row chooses among (nanochat's buffer_size)
    prefetch: bool = True  # build the next batch in a background thread while the step runs

    RULES: ClassVar[list[Rule]] = [
        ("{prefix}align and {prefix}packing=bestfit both set: packed rows start at documents already; choose one",
         lambda c: not (c.align and c.packing == "bestfit")),
    ]


@dataclass
class DataConfig(BatchesConfig):
    _target_: str = "nanogpt.data.TokenData"
    # the text: local files, or a Hugging Face dataset read as a stream
    source: list[str] = valid(check=Exists(), default_factory=list)  # text, .jsonl(.gz), .parquet files or folders
    hf_dataset: str | None = None  # a Hub dataset (HuggingFaceFW/fineweb-edu), or a local folder laid out like one
    hf_name: str | None = None  # its configuration (sample-10BT)
    hf_revision: str | None = None  # a commit or branch: the same data however the Hub changes
    data_files: list[str] = valid(check=NotEmpty(), default_factory=list)  # the dataset's files to read (patterns); empty: its train split
    text_column: str = "text"  # of jsonl, parquet and dataset rows
    bad_rows: str = valid("stop", OneOf("stop", "skip"))  # a row not JSON or without string text: stop there, or skip it
    max_tokens: int | None = valid(None, POSITIVE)  # stop about here (at a batch's end); raising it extends the folder
    expected_documents: int | None = valid(None, POSITIVE)  # the full dataset's rows: a copy that holds fewer is reported
    # the vocabulary
    tokenizer: str = "char"  # char | a tiktoken encoding (gpt2) | bpe: a byte-level BPE trained on the source
    bpe_vocab_size: int = valid(4096, Range(258))  # tokenizer=bpe: 256 bytes, the merges, <|endoftext|>
    bpe_train_chars: int = valid(100_000_000, POSITIVE)  # the BPE learns from the train split's first characters
    # the folder
    val_fraction: float = valid(0.1, FRACTION)  # the last 10% of text files' characters; every 10th row of the others
    shard_tokens: int = valid(100_000_000, POSITIVE)  # tokens a shard file
    workers: int | None = valid(None, POSITIVE)  # encoding threads; None: every core
    reprepare: bool = False  # a folder prepared from other sources or settings is prepared again, not refused

    RULES: ClassVar[list[Rule]] = BatchesConfig.RULES + [
        ("{prefix}source and {prefix}hf_dataset are both set: name local files or a dataset, not both",
         lambda c: not (c.source and c.hf_dataset)),
        ("{prefix}data_files, hf_name and hf_revision choose what a Hugging Face dataset gives: set {prefix}hf_dataset",
         lambda c: c.hf_dataset or not (c.data_files or c.hf_name or c.hf_revision)),
    ]


@dataclass
class MixPhase:
    until: float = MISSING  # the phase ends at iteration floor(until x max_iters)
    weights: dict[str, float] = MISSING  # {source: weight} until then


@dataclass
class MixConfig(BatchesConfig):
    """data=mix: each training window drawn from one of several prepared folders (or data presets,
    prepared on first use), in proportion to its weight; nanogpt.mixture."""

    _target_: str = "nanogpt.mixture.MixtureData"
    name: str = "mix"  # how logs name the mixture; each source keeps its own folder
    # {source: weight}: a data preset or a folder under root; the weights need not sum to 1. Untyped:
    # Hydra merges a typed dict with an override's, and then refuses new names
    mix: Any = MISSING
    mix_phases: list[MixPhase] = field(default_factory=list)  # earlier weights: [{until: 0.8, weights: {...}}]; mix after

    RULES: ClassVar[list[Rule]] = BatchesConfig.RULES + [
        ("{prefix}mix is empty: name the sources and their weights, e.g. {prefix}mix='{{web:0.7,code:0.3}}'",
         lambda c: c.mix != {}),
        ("{prefix}{c.bad_weights}", lambda c: not c.bad_weights),
        ("{prefix}{c.unknown_source}: not a data preset (conf/data/) nor a prepared folder under {prefix}root={c.root}",
         lambda c: c.unknown_source is None),
        ("{prefix}mix_phases: {c.bad_phases}", lambda c: not c.bad_phases),
    ]

    def _weightings(self) -> list[tuple[str, dict[str, float]]]:
        return [*((f"mix_phases[{i}].weights", p.weights) for i, p in enumerate(self.mix_phases)), ("mix", self.mix)]

    @property
    def bad_weights(self) -> str:
        """What is wrong with a weighting (mix, or a phase's), in one line; "" when nothing."""
        for key, weights in self._weightings():
            if not isinstance(weights, dict) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                        for w in weights.values()):
                return f"{key}={weights!r}: give each source a number, e.g. {{web: 0.7, code: 0.3}}"
            if unknown := [name for name in weights if name not in self.mix]:
                return f"{key} names {unknown[0]!r}, which is not a source of mix ({', '.join(self.mix)})"
            if negative := [name for name, w in weights.items() if not 0 <= w < math.inf]:
                return f"{key}.{negative[0]}={weights[negative[0]]} must be >= 0 and finite"
            if not sum(weights.values()) > 0:
                return f"{key}: every weight is 0; give at least one source a positive weight"
        return ""

    @property
    def unknown_source(self) -> str | None:
        return next((f"mix.{name}" for name in self.mix if data_preset(name) is None
                     and not (Path(self.root).expanduser() / name / "meta.json").exists()), None)

    @property
    def bad_phases(self) -> str:
        ends = [p.until for p in self.mix_phases]
        if bad := [u for u in ends if not 0 < u <= 1]:
            return f"until={bad[0]} is not in (0, 1]: a phase ends at a fraction of max_iters"
        if any(b <= a for a, b in zip(ends, ends[1:])):
            return f"until {ends} must increase from phase to phase"
        return ""


def data_preset(name: str) -> Path | None:
    """conf/data/<name>.yaml, if there is such a data preset."""
    path = CONF / "data" / f"{name}.yaml"
    return path if name.replace("_", "").replace("-", "").isalnum() and path.is_file() else None


@dataclass
class AdamWConfig:
    _target_: str = "nanogpt.optim.build_adamw"
    learning_rate: float = valid(1e-3, NON_NEGATIVE)  # peak rate; nanoGPT's 6e-4 is GPT-2 124M's, 1e-3 suits small models
    weight_decay: float = valid(0.1, NON_NEGATIVE)  # on 2-D weights only; biases, norms and gains are not decayed
    beta1: float = valid(0.9, PROBABILITY)
    beta2: float = valid(0.99, PROBABILITY)  # nanoGPT's default is 0.95; 0.99 suits few tokens per iteration
    fused: bool | None = None  # None: the fused kernel where the device has one


@dataclass
class MuonConfig(AdamWConfig):
    _target_: str = "nanogpt.optim.build_muon"
    learning_rate: float = valid(2e-2, NON_NEGATIVE)  # AdamW's part (embeddings, head, norms, biases): they learn fast
    weight_decay: float = valid(0.0, NON_NEGATIVE)
    beta2: float = valid(0.95, PROBABILITY)
    muon_learning_rate: float = valid(5e-3, NON_NEGATIVE)  # the 2-D hidden weights; update RMS 0.2 x this (match_rms_adamw)
    muon_momentum: float = valid(0.95, PROBABILITY)
    muon_weight_decay: float = valid(0.0, NON_NEGATIVE)


@dataclass
class CosineScheduleConfig:
    _target_: str = "nanogpt.optim.cosine_schedule"
    decay_lr: bool = True  # False: constant learning rate after warmup
    warmup_iters: int = valid(100, NON_NEGATIVE)
    warmup_fraction: float | None = valid(None, PROBABILITY)  # instead of warmup_iters: this share of lr_decay_iters
    lr_decay_iters: int = valid(II("max_iters"), NON_NEGATIVE)  # decay over the whole run (~ max_iters per Chinchilla)
    min_lr: float = valid(1e-4, NON_NEGATIVE)  # ~ learning_rate / 10 per Chinchilla


@dataclass
class WSDScheduleConfig:
    _target_: str = "nanogpt.optim.wsd_schedule"
    warmup_iters: int = valid(100, NON_NEGATIVE)
    warmup_fraction: float | None = valid(None, PROBABILITY)  # instead of warmup_iters: this share of lr_decay_iters
    lr_decay_iters: int = valid(II("max_iters"), NON_NEGATIVE)  # the schedule ends here, like cosine's
    decay_fraction: float = valid(0.5, Range(0, 1))  # the last half of lr_decay_iters decays linearly to min_lr
    min_lr: float = valid(0.0, NON_NEGATIVE)


@dataclass
class SystemConfig:
    device: str = valid("auto", DEVICE)
    dtype: str = valid("auto", DTYPE)  # auto: bf16 (or fp16) on CUDA, fp32 elsewhere
    compile: bool | None = None  # torch.compile; None: on for CUDA, off elsewhere
    seed: int = valid(1337, NON_NEGATIVE)  # rank r seeds its dropout with seed + r
    deterministic: bool = False  # bit-identical across processes; compiled CPU kernels otherwise add atomically
    tf32: bool = True  # TF32 matmuls on Ampere and newer
    cpu_memory_cache: bool = True  # on CPU, freed memory is reused (fast); false: returned at once (to measure memory)
    parallel_dropout: bool = False  # on CPU, dropout masks drawn on all threads (nanogpt.dropout), not torch's serial kernel
    backend: str = valid("auto", OneOf("auto", "nccl", "gloo"))
    nproc_per_node: int = valid(1, POSITIVE)  # >1: this job starts that many ranks itself
    parallelism: str = valid("ddp", OneOf("ddp", "fsdp"))  # ranks hold whole copies (DDP) or shards (FSDP2) of the model
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (memory) or keep them for backward
    reduce_every_micro_step: bool = True  # fsdp: reduce-scatter each micro-step (memory) or the last only (speed)
    activation_checkpointing: int = valid(0, NON_NEGATIVE)  # recompute activations in backward: 0 off, k every k-th block
    num_threads: int | None = valid(None, POSITIVE)  # None: the CPUs this process may use / local ranks
    dist_timeout_s: int = valid(300, POSITIVE)  # a collective waiting longer means a peer died: fail, don't hang


@dataclass
class WandbConfig:
    _target_: str = "nanogpt.tracking.start_wandb"
    project: str = "nanogpt"
    entity: str | None = None
    name: str | None = None  # None: the job name and its overrides
    group: str | None = None  # None: the sweep folder in a multirun
    tags: list[str] = valid(check=NotEmpty(), default_factory=list)
    mode: str = valid("online", OneOf("online", "offline", "disabled"))


@dataclass
class TensorBoardConfig:
    _target_: str = "nanogpt.tracking.start_tensorboard"  # event files in <run folder>/tensorboard


@dataclass
class ProfileConfig:
    """torch.profiler's schedule, counted in training steps from the loop's start."""

    wait: int = valid(2, NON_NEGATIVE)  # steps not traced: the first ones allocate, compile and warm caches
    warmup: int = valid(1, NON_NEGATIVE)  # traced and discarded: the profiler's own start-up
    active: int = valid(3, POSITIVE)  # steps recorded into the trace and the table
    row_limit: int = valid(15, POSITIVE)  # operators in the log's table


@dataclass
class DebugConfig:
    """What the debug presets (conf/debug/) switch on; each key also works alone."""

    overfit: bool = False  # train on the first iteration's batches only, again and again
    profile: ProfileConfig | None = None  # torch.profiler: a Chrome/Perfetto trace in the run folder, a table in the log
    anomaly: bool = False  # autograd anomaly detection; the first module with a non-finite output stops the run, named
    read_back: bool = False  # after the last step, load the checkpoint back, compare it with the weights, sample from it
    sample_tokens: int = valid(20, POSITIVE)  # read_back: tokens sampled from the checkpoint read back
    memory_history: bool = False  # CUDA: record allocations; an out-of-memory error writes memory_snapshot_rank<r>.pickle


@dataclass
class BitsPerByteConfig:
    _target_: str = "nanogpt.tasks.BitsPerByteTask"
    split: str = valid("val", OneOf("train", "val"))  # of the data group's folder (its vocabulary must be the model's)
    tokens: int = valid(1_048_576, POSITIVE)  # tokens scored, from the split's start


@dataclass
class ChoiceTaskConfig:
    _target_: str = "nanogpt.tasks.ChoiceTask"
    path: str | None = None  # a local copy of the task's file (offline machines): read as it is
    url: str | None = None  # else downloaded from here on first use, into eval.cache_dir
    checksum: str | None = None  # of the download: sha256:<hex> or git-sha1:<hex> (a GitHub file's blob id)
    format: str = valid("choices", OneOf("choices", "hellaswag"))  # rows {context, choices, label} | HellaSwag's own
    join: str = " "  # between the context and a choice (HellaSwag: the ending follows after a space)
    fewshot: int = valid(0, NON_NEGATIVE)  # solved examples shown before each one (a row's own "fewshot" wins)
    fewshot_path: str | None = valid(None, Exists(file=True))  # where they are drawn from; None: the task's other examples
    fewshot_separator: str = "\n\n"
    limit: int | None = valid(None, POSITIVE)  # the first N examples only: a quick subset

    RULES: ClassVar[list[Rule]] = [
        ("set {prefix}path (a local file) or {prefix}url (downloaded once)", lambda c: c.path or c.url),
    ]


@dataclass
class CoreConfig:
    _target_: str = "nanogpt.tasks.CoreTask"
    path: str | None = valid(None, Exists())  # the DCLM eval bundle's folder: core.yaml, eval_meta_data.csv, eval_data/*.jsonl
    limit: int | None = valid(None, POSITIVE)  # each task's first N rows after the reference's shuffle (nanochat's max_per_task)

    RULES: ClassVar[list[Rule]] = [
        ("set {prefix}path=<folder>: the DCLM eval bundle (core.yaml, eval_meta_data.csv, eval_data/)", lambda c: c.path),
    ]


@dataclass
class LmEvalConfig:
    _target_: str = "nanogpt.tasks.LmEvalTask"
    tasks: list[str] = valid(check=NotEmpty(), default_factory=list)  # lm-eval's task (or group) names: [hellaswag, arc_easy]
    include_path: str | None = valid(None, Exists())  # a folder of your own task YAMLs
    limit: int | None = valid(None, POSITIVE)  # each task's first N documents
    num_fewshot: int | None = valid(None, NON_NEGATIVE)  # None: each task's own

    RULES: ClassVar[list[Rule]] = [
        ("name lm-eval's tasks: {prefix}tasks=[hellaswag,arc_easy] (your own YAMLs: {prefix}include_path=<folder>)",
         lambda c: c.tasks),
    ]


@dataclass
class EvalConfig:
    tasks: dict[str, Any] = field(default_factory=dict)  # by name, chosen in the eval group: eval=[bpb,hellaswag]
    interval: int = valid(0, NON_NEGATIVE)  # in training: every this many iterations and at the end; 0: never
    ema: bool = False  # in training: the EMA weights scored too (ema_decay > 0), as <task>/<metric>_ema
    batch_size: int = valid(16, POSITIVE)  # sequences a forward pass
    cache_dir: str = "~/.cache/nanogpt/eval"  # downloaded task files


@dataclass
class SpikeConfig:
    """The training-loss spike monitor (nanogpt/spikes.py): a loss above mean + sigma x std of
    the last `window` losses of its rank is a spike."""

    policy: str = valid("off", OneOf("off", "warn", "skip", "rollback"))  # skip/rollback read the loss every step (a sync)
    window: int = valid(128, Range(2))  # iterations; nothing is judged until it is full (OLMo-core's 128)
    sigma: float = valid(6.0, POSITIVE)  # OLMo-core's 6
    max_rollbacks: int = valid(3, NON_NEGATIVE)  # rollback: one more spike after these stops the run


@dataclass
class TrainConfig:
    model: Any = MISSING  # GPTConfig, or a user model's config dataclass
    data: BatchesConfig = MISSING  # DataConfig (one folder) or MixConfig (a mixture)
    optim: Any = MISSING  # AdamWConfig or MuonConfig
    schedule: Any = MISSING  # CosineScheduleConfig or WSDScheduleConfig
    system: SystemConfig = field(default_factory=SystemConfig)
    logger: dict[str, Any] = field(default_factory=dict)  # the trackers, by name: {} or {"wandb": WandbConfig}
    eval: EvalConfig = field(default_factory=EvalConfig)  # capability evaluations: bits per byte, HellaSwag
    debug: DebugConfig = field(default_factory=DebugConfig)  # set by the debug presets: debug=fast|overfit|profile|anomaly
    bench: Any = None  # bench.py's own keys, typed by its schema in conf/bench.yaml; empty for training

    init_from: str = "scratch"  # scratch | resume | gpt2* | a path (run folder, ckpt.pt, HF folder)
    transfer_from: str | None = None  # an Optuna search's folder: its best parameters, set before the command's (nanogpt.transfer)
    max_iters: int = valid(2000, NON_NEGATIVE)
    # a run's length as a compute budget (docs/scaling.md): either one sets max_iters from the model's size
    tokens_per_param: float | None = valid(None, POSITIVE)  # train on this many tokens per parameter N (Chinchilla: ~20)
    flops_budget: float | None = valid(None, POSITIVE)  # train for this many FLOPs (6N + attention per token)
    gradient_accumulation_steps: int = valid(1, POSITIVE)  # global micro-steps per iteration, divided among ranks
    grad_clip: float = valid(1.0, NON_NEGATIVE)  # 0 disables clipping
    eval_interval: int = valid(250, POSITIVE)
    eval_iters: int = valid(20, POSITIVE)  # batches per split and eval
    eval_only: bool = False  # evaluate once and stop
    eval_at_start: bool = False  # nanoGPT evaluates at iteration 0; off so big models start at once
    log_interval: int = valid(10, POSITIVE)
    always_save_checkpoint: bool = True  # False: also keep best.pt, the weights of the best val loss
    nan_policy: str = valid("stop", OneOf("stop", "skip"))  # what a non-finite loss or gradient norm does
    spike: SpikeConfig = field(default_factory=SpikeConfig)  # what a finite loss spike does: off | warn | skip | rollback
    keep_checkpoints: int = valid(1, POSITIVE)  # the last K checkpoints, e.g. to average them (nanogpt.checkpoint average)
    ema_decay: float = valid(0.0, PROBABILITY)  # 0: off; e.g. 0.999: an EMA of the weights over ~1000 iterations
    ema_start: int = valid(0, NON_NEGATIVE)  # the iteration the EMA starts at, from the weights then
    weights: str = valid("raw", OneOf("raw", "ema"))  # init_from's weights: as trained, or their EMA (a run's ema_decay)
    extensions: list[str] = valid(check=MODULES, default_factory=list)  # your packages: targets a run folder names may import them

    RULES: ClassVar[list[Rule]] = [
        ("model.parametrization=mup scales Adam-type updates (optim=adamw or your own); Muon's orthogonalised "
         "updates need another width rule, not implemented (docs/mup.md)",
         lambda c: getattr(c.model, "parametrization", "sp") != "mup" or getattr(c.optim, "_target_", "") != MuonConfig._target_),
        ("eval.ema=true scores the EMA weights: set ema_decay > 0", lambda c: not c.eval.ema or c.ema_decay > 0),
        ("tokens_per_param and flops_budget both set the run's length: set one",
         lambda c: c.tokens_per_param is None or c.flops_budget is None),
        ("schedule.lr_decay_iters ({c.schedule.lr_decay_iters}) differs from max_iters: a budgeted run's schedule ends "
         "with the run, set by tokens_per_param or flops_budget; drop schedule.lr_decay_iters",
         lambda c: (c.tokens_per_param is None and c.flops_budget is None) or c.schedule.lr_decay_iters == c.max_iters),
    ]


@dataclass
class SampleConfig:
    init_from: str | None = None  # a run folder, a checkpoint, gpt2* or an HF folder; None: the newest run (not a debug run)
    weights: str = valid("raw", OneOf("raw", "ema"))  # the run's weights as trained, or their EMA (ema_decay)
    start: str = valid("\n", Exists(prefix="FILE:", file=True))  # the prompt, or FILE:path to read it from a file
    prompts_file: str | None = valid(None, Exists(file=True))  # instead of start: one prompt a line, each with num_samples samples
    num_samples: int = valid(3, POSITIVE)  # per prompt, decoded as one batch
    max_new_tokens: int = valid(500, POSITIVE)
    temperature: float = valid(0.8, NON_NEGATIVE)  # <1 sharper, >1 more random; 0 greedy (the likeliest token)
    top_k: int | None = valid(200, POSITIVE)  # sample among the k likeliest tokens only; None: all
    top_p: float | None = valid(None, Range(0, 1, low_open=True))  # ...and among the likeliest whose mass reaches p
    stop: list[str] = valid(check=NotEmpty(), default_factory=list)  # a sample ends before the first of these strings (\n, \t understood)
    seed: int = valid(1337, NON_NEGATIVE)  # sample j of each prompt draws from seed + j
    stream: bool | None = None  # print the first sample as it is generated; None: when stdout is a terminal
    format: str = valid("text", OneOf("text", "json"))  # json: one object a sample per line, for tools
    device: str = valid("auto", DEVICE)
    dtype: str = valid("auto", DTYPE)
    compile: bool = False
    runs_root: str = "outputs"  # where the newest run is looked for
    extensions: list[str] = valid(check=MODULES, default_factory=list)  # your packages: a checkpoint of your model may import them


# Schemas are stored outside any group (a YAML option names one as /<name>@_here_), so that
# `--help` and tab completion offer only the YAML options of each group.
SCHEMAS = {
    "train_schema": TrainConfig,
    "sample_schema": SampleConfig,
    "model_schema": GPTConfig,
    "data_schema": DataConfig,
    "mix_schema": MixConfig,
    "adamw_schema": AdamWConfig,
    "muon_schema": MuonConfig,
    "cosine_schema": CosineScheduleConfig,
    "wsd_schema": WSDScheduleConfig,
    "system_schema": SystemConfig,
    "wandb_schema": WandbConfig,
    "tensorboard_schema": TensorBoardConfig,
    "bpb_schema": BitsPerByteConfig,
    "choice_task_schema": ChoiceTaskConfig,
    "core_schema": CoreConfig,
    "lm_eval_schema": LmEvalConfig,
}


# nanogpt's own builders, the schemas' defaults: the targets a run folder's saved overrides may
# name without `extensions` (nanogpt.cli.expand_resume; Hydra 1.3 has no allow-list of its own)
BUILDERS = {f.default for node in SCHEMAS.values() for f in fields(node) if f.name == "_target_"}


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
    """Resolve and convert the composed config once, then check every key's range and rule."""
    return to_config(cfg)


def to_config(cfg: DictConfig):
    """The composed config as its schema's dataclasses, checked before any work: each key's
    range and rule, and each `_target_` imported and able to take its builder's arguments."""
    cfg = typed_options(cfg)
    try:
        config = OmegaConf.to_object(cfg)
    except ValueError as e:  # GPTConfig checks itself on construction
        raise UserError(str(e)) from None
    config = with_options(config)
    check(config)
    for key, target in targets_in(config):
        check_builder(resolve(target, key), key, target)
    check_protocol_keys(config)
    return config


def typed_options(cfg: DictConfig) -> DictConfig:
    """The config with each untyped option (a YAML without a schema) whose builder names a config
    dataclass converted to it: an unknown key or a wrong type is one line here."""
    if not any(OmegaConf.get_type(parent[k]) is dict for parent, k, _ in _options(cfg)):
        return cfg  # nanogpt's own options only: typed by their YAML's schema already
    cfg = copy.deepcopy(cfg)
    for parent, k, prefix in _options(cfg):
        node, key = parent[k], f"{prefix}{k}"
        schema = option_type(resolve(node._target_, key)) if OmegaConf.get_type(node) is dict else None
        if schema is None:
            continue
        if "_target_" not in {f.name for f in fields(schema)}:
            raise UserError(f"{key}: {schema.__module__}.{schema.__qualname__} needs a `_target_: str` field "
                            f"(default {node._target_!r}), as every option's schema has")
        try:
            parent[k] = OmegaConf.merge(OmegaConf.structured(schema), node)
        except (ConfigKeyError, ValidationError) as e:
            raise UserError(f"{key}: {str(e).splitlines()[0]} ({schema.__module__}.{schema.__qualname__})") from None
    return cfg


def _options(cfg: DictConfig, prefix: str = ""):
    """(parent node, key, key prefix) of every option with a `_target_` below cfg."""
    for k in cfg:
        if k == "hydra" or OmegaConf.is_missing(cfg, k) or not OmegaConf.is_dict(cfg._get_node(k)) or cfg[k] is None:
            continue
        if "_target_" in cfg[k]:
            yield cfg, k, prefix
        else:
            yield from _options(cfg[k], f"{prefix}{k}.")


def check_protocol_keys(config) -> None:
    """What the trainer reads of a model's and an optimizer's option, there before any work."""
    model, optim = getattr(config, "model", None), getattr(config, "optim", None)
    if model is not None and not is_dataclass(model):
        raise UserError(f"model._target_={model['_target_']}: a model's first argument is annotated with its config "
                        "dataclass (the model protocol, docs/extend.md)")
    if model is not None and (absent := [k for k in MODEL_CONFIG_KEYS if not hasattr(model, k)]):
        raise UserError(f"model: {type(model).__qualname__} has no {', '.join(absent)}: a model's config has "
                        f"{', '.join(MODEL_CONFIG_KEYS)} (docs/extend.md)")
    if optim is not None and not hasattr(optim, "learning_rate"):
        raise UserError(f"optim ({optim._target_}) has no learning_rate: an optimizer option has one, which the "
                        "schedule multiplies")


def to_dict(config) -> dict:
    """A config as plain dicts and lists (what a checkpoint and a tracker keep), untyped options too."""
    if isinstance(config, Option):
        return to_dict(dict(config))
    if is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in fields(config)}
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(to_dict(v) for v in config)
    return config


def build(node, **runtime):
    """Call the builder a group's `_target_` names with the group's option and the runtime
    dependencies (model, device, ...) as keywords: one level, never a tree of objects."""
    return resolve(node._target_, "option")(node, **runtime)
