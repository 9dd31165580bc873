"""What a model can do: bits per byte on a data split and multiple-choice tasks (HellaSwag), for
the eval command (nanogpt/eval.py) and inside training every eval.interval iterations.

Both are shared among the ranks (DDP or FSDP): rank r takes items r, r+W, ...; every rank runs the
same number of forward passes (a rank short of items runs padding batches that count for
nothing, so FSDP's gathers stay matched), and the totals are all-reduced. Scores are taken in at
least fp32 (float64 for a float64 model), under the autocast of `system`.

Bits per byte: the summed loss (nats) of each predicted token over ln 2 times the UTF-8 bytes of
those tokens (nanochat's definition); tokens of zero bytes (<|endoftext|>) count in neither sum.
It compares models with different tokenizers, which a loss per token cannot.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from nanogpt import distributed
from nanogpt.config import EvalConfig, build
from nanogpt.errors import UserError
from nanogpt.scoring import mean_loss, pass_count, score_examples, token_losses
from nanogpt.shards import TokenStream
from nanogpt.tasks import BitsPerByteTask, ChoiceTask, CoreExample, CoreSubtask, CoreTask, LmEvalTask, Rendered
from nanogpt.tokenizer import Tokenizer

log = logging.getLogger("nanogpt")


@dataclass
class ChoiceResult:
    """A multiple-choice task's totals over all ranks, and this rank's per-example scores."""

    correct: int  # lowest summed loss on the label
    correct_norm: int  # lowest mean loss per token on the label
    examples: int  # scored
    skipped: int  # not scorable with this tokenizer (characters outside a character vocabulary)
    cut: int  # longer than the model's block: cut from the left
    scores: dict[int, list[tuple[float, int]]]  # example index -> (summed loss, tokens) per choice

    def metrics(self, name: str) -> dict[str, float]:
        n = max(self.examples, 1)
        return {f"{name}/acc": self.correct / n, f"{name}/acc_norm": self.correct_norm / n}


def multiple_choice(model: torch.nn.Module, rendered: list[Rendered | None], batch_size: int, device: torch.device,
                    ctx, dist: distributed.DistInfo) -> ChoiceResult:
    """Score every choice of this rank's share of the examples (None: not scorable, counted as
    skipped), each context read once; acc and acc_norm over all ranks."""
    mine = [i for i in range(dist.rank, len(rendered), dist.world_size) if rendered[i] is not None]
    examples = [(list(zip(rendered[i].rows, rendered[i].starts)), rendered[i].cut) for i in mine]
    scored = score_examples(model, examples, batch_size, device, ctx, dist)
    scores = {i: [(s.loss, s.tokens) for s in choice_scores] for i, choice_scores in zip(mine, scored)}
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    for i, choice_scores in scores.items():
        sums = [s for s, _ in choice_scores]
        means = [s / max(n, 1) for s, n in choice_scores]
        label = rendered[i].label
        totals += torch.tensor([sums.index(min(sums)) == label, means.index(min(means)) == label, 1, 0,
                                rendered[i].cut], dtype=torch.float64, device=device)
    totals[3] = sum(r is None for r in rendered[dist.rank :: dist.world_size])
    distributed.all_reduce(totals)
    correct, correct_norm, examples, skipped, cut = (int(v) for v in totals.tolist())
    return ChoiceResult(correct, correct_norm, examples, skipped, cut, scores)


@dataclass
class CoreResult:
    """CORE over all ranks: each task's accuracy and its accuracy centred on chance, and this
    rank's decisions."""

    accuracy: dict[str, float]  # by task label
    centered: dict[str, float]  # (acc - 0.01 x baseline) / (1 - 0.01 x baseline)
    counts: dict[str, dict[str, int]]  # examples, correct, cut
    # label -> example index -> the option of lowest mean loss (multiple choice, schema), or
    # whether greedy decoding reproduced the continuation (language modelling)
    picked: dict[str, dict[int, int | bool]]

    @property
    def core(self) -> float:
        return sum(self.centered.values()) / len(self.centered)

    def metrics(self, name: str) -> dict[str, float]:
        return {name: self.core} | {f"{name}/{label}": v for label, v in self.centered.items()}


def core(model: torch.nn.Module, subtasks: list[CoreSubtask], rendered: list[list[CoreExample]], batch_size: int,
         device: torch.device, ctx, dist: distributed.DistInfo) -> CoreResult:
    """Score this rank's share of every CORE example (all tasks' examples, strided over ranks) as
    nanochat does: multiple choice and schema pick the option of lowest mean loss over its scored
    tokens; language modelling is right when greedy decoding reproduces the continuation."""
    mine = [(t, i) for t, examples in enumerate(rendered) for i in range(len(examples))][dist.rank :: dist.world_size]
    examples = [rendered[t][i] for t, i in mine]
    scored = score_examples(model, [(ex.rows, ex.cut) for ex in examples], batch_size, device, ctx, dist)
    totals = torch.zeros(len(subtasks), 3, dtype=torch.float64, device=device)  # correct, examples, cut
    picked: dict[str, dict[int, int | bool]] = {sub.label: {} for sub in subtasks}
    for (t, i), ex, scores in zip(mine, examples, scored):
        if ex.gold < 0:
            choice = correct = scores[0].greedy
        else:
            means = [mean_loss(s) for s in scores]
            choice = means.index(min(means))
            correct = choice == ex.gold
        picked[subtasks[t].label][i] = choice
        totals[t] += torch.tensor([correct, 1, ex.cut], dtype=torch.float64, device=device)
    distributed.all_reduce(totals)
    accuracy, centered, counts = {}, {}, {}
    for sub, (correct, n, cut) in zip(subtasks, totals.tolist()):
        accuracy[sub.label] = correct / n
        chance = 0.01 * sub.baseline
        centered[sub.label] = (accuracy[sub.label] - chance) / (1.0 - chance)
        counts[sub.label] = {"examples": int(n), "correct": int(correct), "cut": int(cut)}
    return CoreResult(accuracy, centered, counts, picked)


def bits_per_byte(model: torch.nn.Module, stream: TokenStream, token_bytes: torch.Tensor, tokens: int, block_size: int,
                  batch_size: int, device: torch.device, ctx, dist: distributed.DistInfo) -> tuple[float, int]:
    """(bits per byte, tokens scored) over the first `tokens` predicted tokens of a split, in
    windows of block_size + 1 tokens that tile it (each token predicted once)."""
    windows = min(max(tokens // block_size, 1), (stream.size - 1) // block_size)
    mine = np.arange(dist.rank, windows, dist.world_size) * block_size
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, bytes, tokens
    for b in range(pass_count(math.ceil(len(mine) / batch_size), dist, device)):
        starts = mine[b * batch_size : (b + 1) * batch_size]
        if len(starts):
            w = torch.from_numpy(stream.windows(starts, block_size + 1))
            x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        else:
            x, y = torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), -1)
        x, y = x.to(device), y.to(device)
        with ctx:
            losses = token_losses(model, x, y)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        counted = nbytes > 0
        totals += torch.stack([(losses * counted).sum().double(), nbytes.sum().double(), counted.sum().double()])
    distributed.all_reduce(totals)
    nats, nbytes, scored = totals.tolist()
    return nats / (math.log(2) * nbytes), int(scored)


class Evaluator:
    """The eval group's tasks for one model: files fetched (rank 0 first), examples rendered and
    lm-eval's tasks loaded at start-up, so a missing file stops a run before iteration 0; run on demand."""

    def __init__(self, config: EvalConfig, tokenizer: Tokenizer, vocab_size: int, block_size: int,
                 streams: dict[str, TokenStream], dist: distributed.DistInfo):
        self.config, self.tokenizer, self.block_size, self.streams, self.dist = config, tokenizer, block_size, streams, dist
        self.counts: dict[str, dict[str, int]] = {}  # the last run's examples, skipped and cut, by task
        self.tasks = {name: build(c, name=name, cache_dir=config.cache_dir) for name, c in config.tasks.items()}
        choice_tasks = {name: t for name, t in self.tasks.items() if not isinstance(t, (BitsPerByteTask, CoreTask, LmEvalTask))}
        for name, task in choice_tasks.items():  # a task of one's own: ChoiceTask's examples() and render()
            if not (callable(getattr(task, "examples", None)) and callable(getattr(task, "render", None))):
                raise UserError(f"eval.tasks.{name}._target_={config.tasks[name]._target_} built a {type(task).__name__}, "
                                "which has no examples() and render(): subclass nanogpt.tasks.ChoiceTask")
        if dist.is_main:  # downloads happen once, before the other ranks read the files
            for task in choice_tasks.values():
                getattr(task, "fetch", lambda: None)()
        distributed.broadcast_object(None, dist)
        self.rendered = {name: render_all(t, tokenizer, block_size) for name, t in choice_tasks.items()}
        self.core = {}  # CORE tasks: their subtasks and each one's examples as tokens
        for name, task in self.tasks.items():
            if isinstance(task, CoreTask):
                subtasks = task.subtasks()
                self.core[name] = subtasks, [task.render(sub, tokenizer, block_size) for sub in subtasks]
            elif isinstance(task, LmEvalTask):
                task.load(tokenizer)
        if any(isinstance(t, BitsPerByteTask) for t in self.tasks.values()):  # bpb only: a fraction of a second for GPT-2
            padding = (0, max(vocab_size - tokenizer.vocab_size, 0))
            self.token_bytes = torch.from_numpy(np.pad(tokenizer.token_bytes(), padding))

    def __call__(self, model: torch.nn.Module, device: torch.device, ctx) -> dict[str, float]:
        """Every task's metrics, named <task>/<metric> (bpb: the task's name; CORE: the task's
        name, and <task>/<label> each of its tasks' centred accuracy)."""
        was_training = model.training
        model.eval()
        out, batch_size = {}, self.config.batch_size
        for name, task in self.tasks.items():
            if isinstance(task, BitsPerByteTask):
                c = task.config
                out[name], _ = bits_per_byte(model, self.streams[c.split], self.token_bytes.to(device), c.tokens,
                                             self.block_size, batch_size, device, ctx, self.dist)
            elif isinstance(task, ChoiceTask):
                result = multiple_choice(model, self.rendered[name], batch_size, device, ctx, self.dist)
                out |= result.metrics(name)
                self.counts[name] = {"examples": result.examples, "skipped": result.skipped, "cut": result.cut}
                log.info(f"{name}: {result.examples} examples scored, {result.skipped} skipped (outside the "
                         f"vocabulary), {result.cut} cut from the left to the block of {self.block_size} tokens")
            elif isinstance(task, CoreTask):
                core_result = core(model, *self.core[name], batch_size, device, ctx, self.dist)
                out |= core_result.metrics(name)
                for label, counts in core_result.counts.items():
                    self.counts[f"{name}/{label}"] = counts
                    log.info(f"{name}: {label} accuracy {core_result.accuracy[label]:.4f}, centred "
                             f"{core_result.centered[label]:.4f} ({counts['examples']} examples, {counts['cut']} cut)")
            else:
                from nanogpt import harness  # lm-eval is imported only when used

                out |= harness.evaluate(task, model, self.tokenizer, batch_size, device, ctx, self.dist)
        model.train(was_training)
        return out


def render_all(task: ChoiceTask, tokenizer: Tokenizer, block_size: int) -> list[Rendered | None]:
    """Every example as token rows; None where the tokenizer cannot encode it. A task none of
    whose examples can be encoded stops here: its score would mean nothing."""
    out = []
    for ex in task.examples():
        try:
            out.append(task.render(ex, tokenizer, block_size))
        except ValueError:
            out.append(None)
    if all(r is None for r in out):
        raise UserError(f"eval task {task.name}: none of the {len(out)} examples of {task.file} can be encoded "
                        "with the model's vocabulary (a character vocabulary lacks some of their characters): "
                        "its score would mean nothing")
    return out
