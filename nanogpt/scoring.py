"""Scoring token rows with a model: the summed loss of each row's tokens from a start position on,
and whether greedy decoding reproduces them. Every multiple-choice score goes through here: ours
(HellaSwag), CORE's, and the lm-evaluation-harness model's log-likelihoods.

Rows that begin with the same tokens (an example's context, then each of its choices) form a
group. The tokens the rows share run through the model once, as a prefill whose keys and values
are kept (PrefixCache, the model's cache argument); then the rows' own tokens run as one batch on
top of them (nanochat's engine prefills a prompt once for its samples the same way). A row attends over exactly what it would see alone, so a
score is the one the row would get alone (within float rounding: tested to 1e-5 in fp32). HellaSwag
has four endings a context: its contexts are read once instead of four times.

Groups are scored in chunks of about batch_size rows: one forward pass for the chunk's shared
prefixes (right-padded), one for its rows. Over several ranks every rank runs the same number of
chunks (a rank short of work runs empty ones), so FSDP's gathers stay matched.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from nanogpt import distributed

Row = tuple[Sequence[int], int]  # tokens, index of the first scored token (>= 1)


class Score(NamedTuple):
    loss: float  # summed cross-entropy (nats) of the scored tokens
    tokens: int  # how many were scored
    greedy: bool  # each scored token is the likeliest after those before it


@torch.no_grad()
def token_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) cross-entropy of each target in y (0 where y is -1), in fp32 or better."""
    logits, _ = model(x, y)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view_as(y)


def pass_count(local: int, dist: distributed.DistInfo, device: torch.device) -> int:
    """The most forward passes any rank needs: what every rank runs."""
    n = torch.tensor(local, device=device)
    distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    return int(n.item())


def shared_length(rows: list[Row]) -> int:
    """How many input tokens a group's rows share before any row's first scored target: the
    common prefix of their inputs (tokens[:-1]), short of every row's start."""
    k = min(min(start, len(tokens)) - 1 for tokens, start in rows)
    first = np.asarray(rows[0][0][:k])
    for tokens, _ in rows[1:]:
        differ = np.flatnonzero(np.asarray(tokens[:k]) != first[:k])
        k = int(differ[0]) if len(differ) else k
    return k


Piece = tuple[int, list[int]]  # a group's index, and the rows of it prefilled together


def chunks(groups: list[list[Row]], batch_size: int, block_size: int) -> list[list[Piece]]:
    """The pieces each chunk scores: whole groups (a group of more than batch_size rows in
    pieces), longest first, while a chunk has at most batch_size rows and its padded positions
    stay inside the block (the longest shared prefix plus the longest rest of a row)."""
    pieces = [(g, list(range(i, min(i + batch_size, len(rows))))) for g, rows in enumerate(groups)
              for i in range(0, len(rows), batch_size)]
    pieces.sort(key=lambda p: -max(len(groups[p[0]][r][0]) for r in p[1]))
    out: list[list[Piece]] = []
    prefix = rest = 0
    for g, rs in pieces:
        k = shared_length([groups[g][r] for r in rs])
        longest = max(len(groups[g][r][0]) - 1 - k for r in rs)
        fits = out and sum(len(p[1]) for p in out[-1]) + len(rs) <= batch_size
        if fits and max(prefix, k) + max(rest, longest) <= block_size:
            out[-1].append((g, rs))
            prefix, rest = max(prefix, k), max(rest, longest)
        else:
            out.append([(g, rs)])
            prefix, rest = k, longest
    return out


class PrefixCache:
    """The cache argument of the model's forward (KVCache's interface: positions, update, lengths)
    for two passes: the prefill keeps each layer's keys and values of the groups' shared tokens as
    they come; in the rows' pass each row attends over its group's first shared[g] of them, then
    over its own tokens causally. Built for scoring: no preallocated slots to write into, and one
    mask for every layer."""

    def __init__(self, shared: list[int], device: torch.device):
        self.shared = torch.tensor(shared, device=device)
        self.lengths = torch.zeros_like(self.shared)  # tokens seen by each row (GPT.forward adds to it)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.group: torch.Tensor | None = None  # each row's group, in the rows' pass
        self.mask: torch.Tensor | None = None

    def positions(self, T: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def rows(self, group: list[int]) -> None:
        """From now on the batch is rows, row i of group group[i], after its group's shared tokens."""
        self.group = torch.tensor(group, device=self.shared.device)
        self.lengths, self.mask = self.shared[self.group], None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = k.size(2)
        if self.group is None:  # the prefill: each group's own tokens, causally
            self.k.append(k)
            self.v.append(v)
            if self.mask is None:
                self.mask = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()
            return k, v, self.mask
        P = self.k[layer].size(2)
        if self.mask is None:  # (rows, 1, T, P + T): the group's real prefix, then causal
            prefix = torch.arange(P, device=k.device) < self.lengths[:, None]  # (rows, P)
            causal = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()
            self.mask = torch.cat([prefix[:, None, None, :].expand(-1, 1, T, P), causal.expand(len(prefix), 1, T, T)], -1)
            self.mask = torch.zeros(self.mask.shape, dtype=k.dtype, device=k.device).masked_fill(~self.mask, -math.inf)
        keys = torch.cat([self.k[layer][self.group], k], dim=2)
        values = torch.cat([self.v[layer][self.group], v], dim=2)
        return keys, values, self.mask


@torch.no_grad()
def score_chunk(model: torch.nn.Module, groups: list[list[Row]], device: torch.device, ctx) -> list[list[Score]]:
    """Each group's shared tokens in one padded prefill, then every row's own tokens in one
    padded batch that attends over its group's cached keys and values."""
    shared = [shared_length(group) for group in groups]
    flat = [(g, row) for g, group in enumerate(groups) for row in group]
    # 1) the prefill: group g's first shared[g] tokens, right-padded (no row attends to the padding)
    prefix = torch.zeros(len(groups), max(max(shared), 1), dtype=torch.long)
    for g, group in enumerate(groups):
        prefix[g, : shared[g]] = torch.as_tensor(np.asarray(group[0][0][: shared[g]]))
    cache = PrefixCache(shared, device)
    with ctx:
        model(prefix.to(device), cache=cache)
    # 2) each row's own tokens after its group's prefix, its targets -1 before its start
    cache.rows([g for g, _ in flat])
    width = max(max(len(tokens) - 1 - shared[g] for g, (tokens, _) in flat), 1)
    x = torch.zeros(len(flat), width, dtype=torch.long)
    y = torch.full_like(x, -1)
    for j, (g, (tokens, start)) in enumerate(flat):
        k, tokens = shared[g], torch.as_tensor(np.asarray(tokens))
        x[j, : len(tokens) - 1 - k] = tokens[k:-1]
        y[j, start - 1 - k : len(tokens) - 1 - k] = tokens[start:]
    x, y = x.to(device), y.to(device)
    with ctx:
        logits, _ = model(x, y, cache=cache)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view_as(y)
    scored = y >= 0
    hits = (logits.argmax(-1) == y) | ~scored
    sums, counts, greedy = losses.double().sum(1).tolist(), scored.sum(1).tolist(), hits.all(1).tolist()
    out: list[list[Score]] = [[] for _ in groups]
    for j, (g, _) in enumerate(flat):
        out[g].append(Score(sums[j], counts[j], greedy[j]))
    return out


def score_groups(model: torch.nn.Module, groups: list[list[Row]], batch_size: int, device: torch.device, ctx,
                 dist: distributed.DistInfo) -> list[list[Score]]:
    """The Score of every row of every group (rows of a group share their first tokens: those are
    read once). Every rank calls this together, each with its own groups."""
    plan = chunks(groups, batch_size, model.config.block_size)
    passes = pass_count(len(plan), dist, device)
    out: list[list[Score | None]] = [[None] * len(rows) for rows in groups]
    for chunk in plan:
        scores = score_chunk(model, [[groups[g][r] for r in rs] for g, rs in chunk], device, ctx)
        for (g, rs), piece_scores in zip(chunk, scores):
            for r, score in zip(rs, piece_scores):
                out[g][r] = score
    for _ in range(passes - len(plan)):  # empty passes, so every rank runs as many
        score_chunk(model, [[([0, 0], 1)]], device, ctx)
    return out


def score_examples(model: torch.nn.Module, examples: list[tuple[list[Row], bool]], batch_size: int,
                   device: torch.device, ctx, dist: distributed.DistInfo) -> list[list[Score]]:
    """The Score of each row of each example (its rows, and whether they were cut from the left to
    fit the block): an example's rows share its context, unless they were cut (their beginnings
    differ then): each is scored alone."""
    groups = [[[row] for row in rows] if cut else [rows] for rows, cut in examples]
    scored = iter(score_groups(model, [g for gs in groups for g in gs], batch_size, device, ctx, dist))
    return [[s for _ in gs for s in next(scored)] for gs in groups]


def mean_loss(score: Score) -> float:
    return score.loss / score.tokens if score.tokens else math.inf
