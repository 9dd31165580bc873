"""Preparation throughput with the GPT-2 BPE, side by side, and tokenizer training.

    python scripts/bench_prepare.py --mb 64 --json /tmp/prepare_bench.json

The corpus: documents of 500 to 8000 characters (about FineWeb's spread) cut at random from the
Tiny Shakespeare this package ships, until --mb megabytes, written as one parquet file (the
FineWeb path), as JSON lines and as one text file. Every figure is MB of UTF-8 text and tokens per second,
reading and writing included unless said:

- nanoGPT's way: its prepare scripts read the whole text and call `encode_ordinary` once (one core),
  then write the tokens;
- the limit: tiktoken's own batched encoder (`encode_ordinary_batch`) on every core, on documents
  already in memory, nothing read or written;
- ours: `python -m nanogpt.prepare` from the parquet file (read by pyarrow) into shards, every
  core and one, from the same documents as JSON lines, and from the text file.

Tokenizer training: rustbpe (the one data.tokenizer=bpe uses) and Hugging Face tokenizers, to a
vocabulary of --vocab: time, characters per token on text they never saw, encoding speed.
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
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
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
                                  ("JSON lines", "corpus.jsonl", cores), ("text file", "corpus.txt", cores)]:
        shutil.rmtree(work / "data", ignore_errors=True)
        data = DataConfig(name="bench", root=str(work / "data"), source=[str(work / source)], tokenizer="gpt2",
                          val_fraction=0.001, workers=workers)
        seconds, _ = timed(lambda: prepare(data))
        meta = json.loads((work / "data" / "bench" / "meta.json").read_text())
        n_tokens = meta["train_tokens"] + meta["val_tokens"]
        rows.append(row(f"ours: {name} -> shards, {workers} thread{'s' * (workers > 1)}", seconds, n_tokens, n_bytes))
    return rows


def tokenizer_training(docs: list[str], vocab: int, cores: int) -> list[dict]:
    """Each library learns vocab tokens from Tiny Shakespeare's first 90% (characters per token
    on the unseen last 10%), and from the whole corpus (time only: its documents repeat the same
    megabyte); then encodes the corpus on every core."""
    import rustbpe
    import tiktoken
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (ROOT / "nanogpt/assets/tinyshakespeare.txt").read_text()
    cut = int(len(text) * 0.9)
    train, held_out = text[:cut].split("\n\n"), text[cut:]
    n_bytes = sum(len(d.encode()) for d in docs)

    def rustbpe_tokenizer(texts):
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab - 1)
        ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
        return tiktoken.Encoding("bench", pat_str=trainer.get_pattern(), mergeable_ranks=ranks, special_tokens={})

    def hf_tokenizer(texts):
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return hf

    out = []
    for name, make, encode in [
        ("rustbpe 0.1 (GPT-4 split pattern), encoded by tiktoken", rustbpe_tokenizer,
         lambda tok, texts: tok.encode_ordinary_batch(texts, num_threads=cores)),
        ("Hugging Face tokenizers 0.23 (byte-level, GPT-2 split)", hf_tokenizer,
         lambda tok, texts: [e.ids for e in tok.encode_batch(texts)]),
    ]:
        seconds, tok = timed(lambda: make(train))
        big_seconds, _ = timed(lambda: make(docs))
        per_token = len(held_out) / len(encode(tok, [held_out])[0])
        encode_seconds, _ = timed(lambda: encode(tok, docs))
        out.append({"library": name, "train_seconds_shakespeare": round(seconds, 2), "train_seconds_corpus": round(big_seconds, 2),
                    "chars_per_token": round(per_token, 3), "encode_MB_per_s": round(n_bytes / encode_seconds / 1e6, 1)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64, help="corpus size in MB (the issue asks for 50 or more)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    docs = corpus(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        prep = preparation(docs, Path(tmp), cores)
    training = tokenizer_training(docs, args.vocab, cores)
    limit = prep[1]["MB_per_s"]
    print(f"{len(docs):,} documents, {args.mb:g} MB, {cores} cores")
    print("| preparation | MB/s | tokens/s | of the limit |\n|---|---:|---:|---:|")
    for r in prep:
        print(f"| {r['name']} | {r['MB_per_s']:.1f} | {r['tokens_per_s']:,} | {r['MB_per_s'] / limit:.0%} |")
    print(f"\n| tokenizer, {args.vocab} tokens | training s: Shakespeare 1 MB | training s: corpus {args.mb:g} MB "
          "| characters/token (unseen) | encoding MB/s |\n|---|---:|---:|---:|---:|")
    for r in training:
        print(f"| {r['library']} | {r['train_seconds_shakespeare']} | {r['train_seconds_corpus']} | {r['chars_per_token']} "
              f"| {r['encode_MB_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "mb": args.mb, "preparation": prep, "tokenizers": training}, indent=1))


if __name__ == "__main__":
    main()
