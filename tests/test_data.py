"""Preparation (text -> memmaps -> text) and the batch sampler's promises."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from nanogpt.config import DataConfig
from nanogpt.errors import UserError
from nanogpt.data import BatchLoader
from nanogpt.prepare import prepare
from nanogpt.shards import read_shard
from nanogpt.tokenizer import tokenizer_from_meta

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 50


def split_tokens(path, split: str) -> np.ndarray:
    meta = json.loads((path / "meta.json").read_text())
    return np.concatenate([read_shard(path / f)[0] for f in meta["splits"][split]["shards"]])


def prepared(tmp_path, tokenizer: str, text: str = TEXT):
    (tmp_path / "in.txt").write_text(text)
    data = DataConfig(name=f"t_{tokenizer}", root=str(tmp_path / "data"), source=[str(tmp_path / "in.txt")], tokenizer=tokenizer)
    return prepare(data)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_prepare_round_trip(tmp_path, tokenizer):
    path = prepared(tmp_path, tokenizer)
    meta = json.loads((path / "meta.json").read_text())
    tok = tokenizer_from_meta(meta)
    train, val = split_tokens(path, "train"), split_tokens(path, "val")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    eot = "<|endoftext|>" if tokenizer == "gpt2" else ""  # marks the start of each document (a file)
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == eot + TEXT
    n_train_chars = int(len(TEXT) * 0.9)  # the split is by characters, as nanoGPT's
    assert tok.decode(train.tolist()) == eot + TEXT[:n_train_chars]
    if tokenizer == "char":
        assert meta["vocab_size"] == len(set(TEXT)) and meta["dtype"] == "uint16"
    else:
        assert meta["vocab_size"] == 50257


def test_shipped_shakespeare_matches_nanogpt_counts(tmp_path):
    data = DataConfig(name="sc", root=str(tmp_path), source=[str(ROOT / "nanogpt/assets/tinyshakespeare.txt")])
    meta = json.loads((prepare(data) / "meta.json").read_text())
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)


def test_prepare_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare(DataConfig(name="x", root=str(tmp_path), source=[str(tmp_path / "missing.txt")]))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        prepare(DataConfig(name="y", root=str(tmp_path), source=[str(tmp_path / "empty.txt")]))
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no half-written folders


DAMAGE = {  # a way to damage a prepared folder -> what the one line says
    "a shard cut short": (lambda p: (p / "train_000001.bin").write_bytes((p / "train_000001.bin").read_bytes()[:-7]),
                          "train_000001.bin holds"),
    "a listed shard missing": (lambda p: (p / "val_000000.bin").unlink(), "val_000000.bin is missing"),
    "meta.json cut short": (lambda p: (p / "meta.json").write_text((p / "meta.json").read_text()[:50]),
                            "its meta.json does not parse (JSONDecodeError"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_data_folder_is_named_and_reprepare_mends_it(tmp_path, damage):
    (tmp_path / "in.txt").write_text(TEXT * 4)
    data = DataConfig(name="d", root=str(tmp_path / "data"), source=[str(tmp_path / "in.txt")], tokenizer="gpt2",
                      shard_tokens=1000)
    path = prepare(data)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    harm, said = DAMAGE[damage]
    harm(path)
    with pytest.raises(UserError) as e:
        prepare(data)
    assert str(e.value).startswith(f"data folder {path} is damaged: ") and said in str(e.value), str(e.value)
    assert str(e.value).endswith("set data.reprepare=true to prepare it again")
    data.reprepare = True
    assert {f.name: f.read_bytes() for f in prepare(data).iterdir()} == before


def test_a_shard_cut_short_is_refused_by_the_loader_too(tmp_path):
    path = prepared(tmp_path, "char")
    shard = path / "val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"val_000000.bin holds [\d,]+ bytes, not the [\d,]+ its header says: .*reprepare"):
        loader(path)


def loader(path, **kw) -> BatchLoader:
    args = dict(batch_size=4, block_size=8, device=torch.device("cpu"), seed=7) | kw
    return BatchLoader(path, **args)


@pytest.mark.parametrize("prefetch", [False, True])
def test_batches_are_a_function_of_seed_iteration_and_micro_step(tmp_path, prefetch):
    path = prepared(tmp_path, "char")
    full = loader(path, micro_steps=2, prefetch=prefetch).train_batches(0)
    first_six = [next(full) for _ in range(6)]  # iterations 0, 1, 2 x 2 micro-steps
    resumed = loader(path, micro_steps=2, prefetch=not prefetch).train_batches(2)
    for a, b in zip(first_six[4:], [next(resumed) for _ in range(2)]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = first_six[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_ranks_split_the_single_process_sequence(tmp_path):
    path = prepared(tmp_path, "char")
    single = loader(path, micro_steps=4, prefetch=False).train_batches(0)
    ranks = [loader(path, micro_steps=2, rank=r, world_size=2, prefetch=False).train_batches(0) for r in range(2)]
    single_xs = [next(single)[0] for _ in range(4)]
    rank_xs = {r: [next(ranks[r])[0] for _ in range(2)] for r in range(2)}
    # rank r takes global micro-steps r, r + W, ...
    assert torch.equal(rank_xs[0][0], single_xs[0]) and torch.equal(rank_xs[1][0], single_xs[1])
    assert torch.equal(rank_xs[0][1], single_xs[2]) and torch.equal(rank_xs[1][1], single_xs[3])


def test_eval_batches_are_fixed(tmp_path):
    path = prepared(tmp_path, "char")
    a = [x for x, _ in loader(path).eval_batches("val", 3)]
    b = [x for x, _ in loader(path).eval_batches("val", 3)]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b))


def test_block_size_larger_than_a_split_is_refused(tmp_path):
    path = prepared(tmp_path, "char", text="short text\n" * 10)
    with pytest.raises(UserError, match="larger than the val split"):
        loader(path, block_size=64)


@pytest.mark.slow
def test_preparing_200mb_keeps_memory_bounded(tmp_path):
    words = np.array("the king doth wake tonight and we shall speak of love honour death and bread".split())
    rng = np.random.default_rng(0)
    with open(tmp_path / "big.txt", "w") as f:
        while f.tell() < 200 * 2**20:
            lines = rng.choice(words, size=(2000, 12))
            f.write("\n".join(" ".join(line) for line in lines) + "\n")
    script = (
        "import resource, sys\n"
        "from nanogpt.config import DataConfig\n"
        "from nanogpt.prepare import prepare\n"
        f"prepare(DataConfig(name='big', root={str(tmp_path)!r}, source=[{str(tmp_path / 'big.txt')!r}], tokenizer='gpt2'))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr
    peak_kib = int(proc.stdout.split()[-1])
    assert peak_kib < 2**20, f"peak RSS {peak_kib / 1024:.0f} MiB"
    meta = json.loads((tmp_path / "big" / "meta.json").read_text())
    assert meta["train_tokens"] > 30_000_000
