"""Sampling with a key/value cache: each prompt is prefilled once, then its samples decode as one
batch, one token a step (nanochat's engine, in small pure functions).

A row's output is what it would be alone: prompts are prefilled one by one and each row draws from
its own generator (seed + sample index), so neither the batch nor the other prompts change it.
The model's view is nanoGPT's: the last block_size tokens. While a row fits in block_size it
decodes through the cache; past it, its window is recomputed each step (learned positions change
with the window, and every layer's keys with them), exactly as an uncached model would see it.
"""

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import torch
from torch.nn import functional as F

from nanogpt.model import GPT, KVCache
from nanogpt.tokenizer import Tokenizer

SEPARATOR = "---------------"  # between samples, as nanoGPT prints them


@dataclass
class Sampling:
    """How each next token is drawn."""

    temperature: float = 0.8  # 0: greedy, the likeliest token
    top_k: int | None = None  # keep the k likeliest tokens
    top_p: float | None = None  # keep the likeliest tokens whose mass reaches p (nucleus)
    seed: int = 1337  # sample j of every prompt draws from generator seed + j


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One sample of one prompt being generated."""

    prompt: int  # index into the prompts
    sample: int  # index among the prompt's samples
    tokens: list[int]  # the prompt's tokens, then the new ones
    generator: torch.Generator
    new: int = 0  # tokens generated so far
    done: bool = False
    logits: torch.Tensor = field(default=None, repr=False)  # (V,) for the next token


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits (B, V) with every token outside the top-k, then outside the nucleus of mass top_p,
    set to -inf. The nucleus is the smallest set of likeliest tokens whose mass reaches top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the likelier tokens already reach top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))  # in vocabulary order
    return logits


def next_tokens(logits: torch.Tensor, rows: list[Row], s: Sampling) -> list[int]:
    """One token per row from logits (B, V), each row drawing from its own generator."""
    if s.temperature == 0:
        return logits.argmax(dim=-1).tolist()
    probs = F.softmax(filter_logits(logits.float() / s.temperature, s.top_k, s.top_p), dim=-1)
    return [int(torch.multinomial(p, 1, generator=row.generator)) for p, row in zip(probs, rows)]


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    sampling: Sampling,
    stopped: Callable[[Row], bool] | None = None,
    on_token: Callable[[Row], None] | None = None,
) -> list[Row]:
    """num_samples rows per prompt, each extended by up to max_new_tokens tokens; a row ends early
    when stopped(row) says so (a stop string). on_token(row) follows every new token."""
    model.eval()
    device, block_size = next(model.parameters()).device, model.config.block_size
    rows = [
        Row(p, j, list(prompt), torch.Generator(device).manual_seed(sampling.seed + j))
        for p, prompt in enumerate(prompts)
        for j in range(num_samples)
    ]
    cache = prefill(model, prompts, rows, static=isinstance(model, torch._dynamo.eval_frame.OptimizedModule))
    cached = [r for r in rows if len(r.tokens) <= block_size]  # rows whose next step goes through the cache
    for _ in range(max_new_tokens):
        active = [r for r in rows if not r.done]
        if not active:
            break
        for row, token in zip(active, next_tokens(torch.stack([r.logits for r in active]), active, sampling)):
            row.tokens.append(token)
            row.new += 1
            row.done = row.new == max_new_tokens or (stopped is not None and stopped(row))
            if on_token is not None:
                on_token(row)
        # rows that ended or outgrew the window leave the cache
        keep = [i for i, r in enumerate(cached) if not r.done and len(r.tokens) <= block_size]
        if len(keep) < len(cached):
            cache.keep(keep)
            cached = [cached[i] for i in keep]
        if cached:
            last = torch.tensor([[r.tokens[-1]] for r in cached], device=device)
            for row, logits in zip(cached, model(last, cache=cache)[0][:, -1]):
                row.logits = logits
        windowed = [r for r in rows if not r.done and r not in cached]
        if windowed:
            window = torch.tensor([r.tokens[-block_size:] for r in windowed], device=device)
            for row, logits in zip(windowed, model(window)[0][:, -1]):
                row.logits = logits
    return rows


def prefill(model: GPT, prompts: list[list[int]], rows: list[Row], static: bool = False) -> KVCache:
    """Each prompt's last block_size tokens in one forward pass (once per prompt, whatever the
    number of samples), its keys and values copied to the cache rows of its samples. static: a
    compiled model's cache (fixed shapes)."""
    device, block_size = next(model.parameters()).device, model.config.block_size
    fits = [r for r in rows if len(r.tokens) <= block_size]
    cache = KVCache.empty(model, len(fits), device, static)
    for p, prompt in enumerate(prompts):
        window = torch.tensor([prompt[-block_size:]], device=device)
        alone = KVCache.empty(model, 1, device, static)
        logits = model(window, cache=alone)[0][0, -1]
        for row in rows:
            if row.prompt == p:
                row.logits = logits
        cache.fill([i for i, r in enumerate(fits) if r.prompt == p], alone)
    return cache


class Texts:
    """The text of each row: the prompt and the new tokens, cut before the first stop string;
    written to out as whole samples. With stream, the first sample is written as its tokens
    arrive (on_token), holding back what may still change: an unfinished UTF-8 character (a BPE
    token can split one) and what may be a stop string's start. Either way, the same bytes."""

    def __init__(self, tokenizer: Tokenizer, prompts: list[list[int]], stop: list[str], stream: bool = False,
                 out: TextIO | None = None):
        self.tokenizer, self.stop, self.stream, self.out = tokenizer, stop, stream, out or sys.stdout
        self.prompt_chars = [len(tokenizer.decode(p)) for p in prompts]
        self.streamed, self.printed = None, 0  # the row being streamed, and how much of it is out

    def _decoded(self, row: Row) -> tuple[str, int]:
        """The row's whole text, and where the first stop string after the prompt begins (its length if none)."""
        text = self.tokenizer.decode(row.tokens)
        cuts = [i for i in (text.find(s, self.prompt_chars[row.prompt]) for s in self.stop) if i >= 0]
        return text, min(cuts, default=len(text))

    def text(self, row: Row) -> str:
        text, cut = self._decoded(row)
        return text[:cut]

    def stopped(self, row: Row) -> bool:
        text, cut = self._decoded(row)
        return cut < len(text)

    def on_token(self, row: Row) -> None:
        if self.stream and self.streamed is None and (row.prompt, row.sample) == (0, 0):
            self.streamed = row
        if row is not self.streamed:
            return
        text = self.text(row)
        end = len(text)
        if not row.done:
            end -= len(text) - len(text.rstrip("\ufffd"))  # a character still being completed
            end -= max((len(s) - 1 for s in self.stop), default=0)  # perhaps a stop string beginning
        if end > self.printed:
            self.out.write(text[self.printed : end])
            self.out.flush()
            self.printed = end

    def write(self, rows: list[Row], format: str) -> None:
        for row in rows:
            whole, cut = self._decoded(row)
            text = whole[:cut]
            if format == "json":
                record = {"prompt": row.prompt, "sample": row.sample, "text": text, "new_tokens": row.new,
                          "stopped": cut < len(whole)}
                self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                self.out.write(f"{text[self.printed:] if row is self.streamed else text}\n{SEPARATOR}\n")
