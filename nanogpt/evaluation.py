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
import torch.nn.functional as F

from nanogpt import distributed
from nanogpt.config import EvalConfig, build
from nanogpt.errors import UserError
from nanogpt.shards import TokenStream
from nanogpt.tasks import BitsPerByteTask, ChoiceTask, Rendered
from nanogpt.tokenizer import Tokenizer

log = logging.getLogger("nanogpt")


@torch.no_grad()
def token_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) cross-entropy of each target in y (0 where y is -1), in fp32 or better."""
    logits, _ = model(x, y)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view_as(y)


def score_rows(model: torch.nn.Module, rows: list[tuple[np.ndarray, int]], batch_size: int, device: torch.device,
               ctx, batches: int = 0) -> list[tuple[float, int]]:
    """(summed loss, token count) over tokens[start:] of each row (tokens, start), batch_size rows a
    forward pass, longest first; then empty passes up to `batches` in all. Rows are padded on the
    right, which a causal model's earlier positions cannot see: padding changes no score."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    groups += [[]] * (batches - len(groups))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for group in groups:
        width = max((len(rows[i][0]) - 1 for i in group), default=1)
        x = torch.zeros(max(len(group), 1), width, dtype=torch.long)
        y = torch.full_like(x, -1)
        for j, i in enumerate(group):
            tokens, start = rows[i]
            x[j, : len(tokens) - 1] = torch.from_numpy(tokens[:-1])
            y[j, start - 1 : len(tokens) - 1] = torch.from_numpy(tokens[start:])
        with ctx:
            losses = token_losses(model, x.to(device), y.to(device))
        sums, counts = losses.sum(1).tolist(), (y >= 0).sum(1).tolist()
        for j, i in enumerate(group):
            out[i] = (sums[j], counts[j])
    return out


def pass_count(local: int, dist: distributed.DistInfo, device: torch.device) -> int:
    """The most forward passes any rank needs: what every rank runs."""
    n = torch.tensor(local, device=device)
    distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    return int(n.item())


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
    skipped); acc and acc_norm over all ranks."""
    mine = [i for i in range(dist.rank, len(rendered), dist.world_size) if rendered[i] is not None]
    rows = [(tokens, start) for i in mine for tokens, start in zip(rendered[i].rows, rendered[i].starts)]
    passes = pass_count(math.ceil(len(rows) / batch_size), dist, device)
    flat = iter(score_rows(model, rows, batch_size, device, ctx, passes))
    scores = {i: [next(flat) for _ in rendered[i].rows] for i in mine}
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
    """The eval group's tasks for one model: files fetched (rank 0 first) and examples rendered
    at start-up, so a missing file stops a run before iteration 0; run on demand."""

    def __init__(self, config: EvalConfig, tokenizer: Tokenizer, vocab_size: int, block_size: int,
                 streams: dict[str, TokenStream], dist: distributed.DistInfo):
        self.config, self.block_size, self.streams, self.dist = config, block_size, streams, dist
        self.counts: dict[str, dict[str, int]] = {}  # the last run's examples, skipped and cut, by task
        self.tasks = {name: build(c, name=name, cache_dir=config.cache_dir) for name, c in config.tasks.items()}
        choice_tasks = {name: t for name, t in self.tasks.items() if isinstance(t, ChoiceTask)}
        if dist.is_main:  # downloads happen once, before the other ranks read the files
            for task in choice_tasks.values():
                task.fetch()
        distributed.broadcast_object(None, dist)
        self.rendered = {name: render_all(t, tokenizer, block_size) for name, t in choice_tasks.items()}
        if any(isinstance(t, BitsPerByteTask) for t in self.tasks.values()):  # bpb only: a fraction of a second for GPT-2
            padding = (0, max(vocab_size - tokenizer.vocab_size, 0))
            self.token_bytes = torch.from_numpy(np.pad(tokenizer.token_bytes(), padding))

    def __call__(self, model: torch.nn.Module, device: torch.device, ctx) -> dict[str, float]:
        """Every task's metrics, named <task>/<metric> (bpb: the task's name)."""
        was_training = model.training
        model.eval()
        out = {}
        for name, task in self.tasks.items():
            if isinstance(task, BitsPerByteTask):
                c = task.config
                out[name], _ = bits_per_byte(model, self.streams[c.split], self.token_bytes.to(device), c.tokens,
                                             self.block_size, self.config.batch_size, device, ctx, self.dist)
            else:
                result = multiple_choice(model, self.rendered[name], self.config.batch_size, device, ctx, self.dist)
                out |= result.metrics(name)
                self.counts[name] = {"examples": result.examples, "skipped": result.skipped, "cut": result.cut}
                log.info(f"{name}: {result.examples} examples scored, {result.skipped} skipped (outside the "
                         f"vocabulary), {result.cut} cut from the left to the block of {self.block_size} tokens")
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
