"""Preparation throughput with the GPT-2 BPE, side by side, and tokenizer training.

    python scripts/bench_prepare.py --mb 64 --json /tmp/prepare_bench.json

The corpus: documents of 500 to 8000 characters (about FineWeb's spread) cut at random from the
Tiny Shakespeare this package ships, until --mb megabytes, written as one parquet file (the
FineWeb path) and as one text file. Every figure is MB of UTF-8 text and tokens per second,
reading and writing included unless said:

- nanoGPT's way: its prepare scripts read the whole text and call `encode_ordinary` once (one core),
  then write the tokens;
- the limit: tiktoken's own batched encoder (`encode_ordinary_batch`) on every core, on documents
  already in memory, nothing read or written;
- ours: `python -m nanogpt.prepare` from the parquet file through datasets into shards, every core,
  and from the text file.

Tokenizer training: rustbpe (the one data.tokenizer=bpe uses) and Hugging Face tokenizers on the
first --train-mb megabytes, to a vocabulary of --vocab; characters per token on the rest.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanogpt.config import DataConfig  # noqa: E402
from nanogpt.prepare import prepare  # noqa: E402


def corpus(mb: float, seed: int = 0) -> list[str]:
    text = (ROOT / "nanogpt/assets/tinyshakespeare.txt").read_text()
    rng, docs, size = random.Random(seed), [], 0
    while size < mb * 1e6:
        n = rng.randint(500, 8000)
        start = rng.randrange(len(text) - n)
        docs.append(text[start : start + n])
        size += n
    return docs


def timed(f):
    """(seconds, f's result)"""
    t = time.perf_counter()
    result = f()
    return time.perf_counter() - t, result


def row(name: str, seconds: float, n_tokens: int, n_bytes: int) -> dict:
    return {"name": name, "seconds": round(seconds, 2), "MB_per_s": round(n_bytes / seconds / 1e6, 2),
            "tokens_per_s": round(n_tokens / seconds)}


def preparation(docs: list[str], work: Path, cores: int) -> list[dict]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    n_bytes = sum(len(d.encode()) for d in docs)
    pq.write_table(pa.table({"text": docs}), work / "corpus.parquet")
    (work / "corpus.txt").write_text("".join(docs))

    def nanogpt_way() -> int:
        ids = enc.encode_ordinary((work / "corpus.txt").read_text())
        np.array(ids, dtype=np.uint16).tofile(work / "nanogpt.bin")
        return len(ids)

    rows = [row("nanoGPT: one encode_ordinary call (1 core)", *timed(nanogpt_way), n_bytes)]
    enc.encode_ordinary_batch(docs[:2000], num_threads=cores)  # warm up
    seconds, n_tokens = timed(lambda: sum(map(len, enc.encode_ordinary_batch(docs, num_threads=cores))))
    rows.append(row(f"limit: tiktoken encode_ordinary_batch, {cores} threads, in memory", seconds, n_tokens, n_bytes))
    for name, source, workers in [("parquet", "corpus.parquet", cores), ("parquet", "corpus.parquet", 1),
                                  ("text file", "corpus.txt", cores)]:
        shutil.rmtree(work / "data", ignore_errors=True)
        data = DataConfig(name="bench", root=str(work / "data"), source=[str(work / source)], tokenizer="gpt2",
                          val_fraction=0.001, workers=workers)
        seconds, _ = timed(lambda: prepare(data))
        meta = json.loads((work / "data" / "bench" / "meta.json").read_text())
        n_tokens = meta["train_tokens"] + meta["val_tokens"]
        rows.append(row(f"ours: {name} -> shards, {workers} thread{'s' * (workers > 1)}", seconds, n_tokens, n_bytes))
    return rows


def tokenizer_training(docs: list[str], train_mb: float, vocab: int) -> list[dict]:
    import rustbpe
    import tiktoken
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cut, size = 0, 0
    while size < train_mb * 1e6:
        size += len(docs[cut])
        cut += 1
    train, held_out = docs[:cut], "".join(docs[cut : cut + 500])
    out = []

    trainer = rustbpe.Tokenizer()
    seconds, _ = timed(lambda: trainer.train_from_iterator(iter(train), vocab - 1))
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    enc = tiktoken.Encoding("bench", pat_str=trainer.get_pattern(), mergeable_ranks=ranks, special_tokens={})
    out.append({"library": "rustbpe 0.1 (GPT-4 split pattern)", "train_seconds": round(seconds, 2),
                "chars_per_token": round(len(held_out) / len(enc.encode_ordinary(held_out)), 3)})

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seconds, _ = timed(lambda: hf.train_from_iterator(train, bpe))
    out.append({"library": "Hugging Face tokenizers (byte-level, GPT-2 split)", "train_seconds": round(seconds, 2),
                "chars_per_token": round(len(held_out) / len(hf.encode(held_out).ids), 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64, help="corpus size in MB (the issue asks for 50 or more)")
    parser.add_argument("--train-mb", type=float, default=10, help="text the tokenizers learn from")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    docs = corpus(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        prep = preparation(docs, Path(tmp), cores)
    training = tokenizer_training(docs, args.train_mb, args.vocab)
    limit = prep[1]["MB_per_s"]
    print(f"{len(docs):,} documents, {args.mb:g} MB, {cores} cores")
    print("| preparation | MB/s | tokens/s | of the limit |\n|---|---:|---:|---:|")
    for r in prep:
        print(f"| {r['name']} | {r['MB_per_s']:.1f} | {r['tokens_per_s']:,} | {r['MB_per_s'] / limit:.0%} |")
    print(f"\n| tokenizer ({args.vocab} tokens, {args.train_mb:g} MB) | training s | characters/token |\n|---|---:|---:|")
    for r in training:
        print(f"| {r['library']} | {r['train_seconds']} | {r['chars_per_token']} |")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "mb": args.mb, "preparation": prep, "tokenizers": training}, indent=1))


if __name__ == "__main__":
    main()
