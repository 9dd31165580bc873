"""Best-fit packing (data.packing=bestfit): rows that start at documents and lose no token of a
document that fits, counted by hand; and the loader's packed windows, with each token's place in
its document."""

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from nanogpt.config import DataConfig
from nanogpt.data import BatchLoader
from nanogpt.packing import best_fit
from nanogpt.prepare import prepare

EOT = 50256  # GPT-2's <|endoftext|>: every text file (a document) starts with it


def test_best_fit_on_a_fixture_counted_by_hand():
    # documents (start, length) in the order taken; rows of 10 tokens, choosing among 3 at a time
    lengths = np.array([4, 7, 3, 15, 2, 9, 5])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    p = best_fit(starts, lengths, capacity=10, buffer=3)
    rows = [list(zip(p.starts[a:b].tolist(), p.lengths[a:b].tolist())) for a, b in zip(p.row_ptr[:-1], p.row_ptr[1:])]
    # by hand: row 0 takes the 7 (longest of 4, 7, 3) then the 3; row 1 the 4 (of 4, 15, 2), the 2
    # (of 15, 9, 2), then, nothing of 15, 9, 5 fitting the 4 left, the first 4 of the 15 (11 cut);
    # row 2 the 9 (1 padding); row 3 the 5 (5 padding)
    assert rows == [[(4, 7), (11, 3)], [(0, 4), (29, 2), (14, 4)], [(31, 9)], [(40, 5)]]
    assert (p.cut, p.padded, p.documents, p.tokens) == (11, 6, 7, 45)
    assert "11 tokens cut (24.4%)" in p.summary()


@pytest.mark.parametrize("buffer", [1, 8, 1000])
def test_every_document_that_fits_a_row_lands_whole_in_exactly_one(buffer):
    rng = np.random.default_rng(buffer)
    lengths = rng.integers(1, 80, 500)  # rows of 33: some documents longer than any row
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    p = best_fit(starts, lengths, capacity=33, buffer=buffer)
    placed = dict(zip(p.starts.tolist(), p.lengths.tolist()))
    assert len(placed) == len(p.starts) == len(lengths)  # every document placed once, at its start
    fits = lengths <= 33
    assert all(placed[s] == n for s, n in zip(starts[fits], lengths[fits]))  # whole
    assert all(placed[s] < n for s, n in zip(starts[~fits], lengths[~fits]))  # cut wherever they went
    per_row = np.add.reduceat(p.lengths, p.row_ptr[:-1])
    assert (per_row <= 33).all() and (np.diff(p.row_ptr) > 0).all()
    assert p.cut == (lengths[~fits] - [placed[s] for s in starts[~fits]]).sum()
    assert p.padded == p.rows * 33 - p.lengths.sum()


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """A folder of 400 short documents (text files of 1-40 words) in GPT-2 tokens."""
    root = tmp_path_factory.mktemp("packing")
    words = "the king doth wake tonight and we shall speak of love honour death and bread".split()
    rng = np.random.default_rng(0)
    (root / "src").mkdir()
    for i in range(400):
        (root / "src" / f"{i:03d}.txt").write_text(" ".join(rng.choice(words, rng.integers(1, 40))) + "\n")
    return prepare(DataConfig(name="docs", root=str(root / "data"), source=[str(root / "src")], tokenizer="gpt2"))


def packed(path, **kw) -> BatchLoader:
    args = dict(batch_size=4, block_size=32, device=torch.device("cpu"), seed=3, packing="bestfit", prefetch=False)
    return BatchLoader(path, **(args | kw))


def test_packed_windows_start_at_documents_and_keep_every_document_that_fits(documents, caplog):
    with caplog.at_level(logging.INFO, logger="nanogpt"):
        loader = packed(documents, documents=True)
    p = loader.packing("train")
    x, y, positions = loader.windows("train", np.arange(p.rows))
    real = np.concatenate([x[:, :1] >= 0, y >= 0], axis=1)  # a row's tokens before its padding
    assert (x[:, 0] == EOT).all() and (positions[:, 0] == 0).all()  # every window opens a document
    assert ((positions == 0) == (x == EOT))[real[:, :-1]].all()  # positions restart at each one
    rows = np.concatenate([x, y[:, -1:]], axis=1)
    pieces = [tuple(d) for row, r in zip(rows, real) for d in np.split(row[r], np.flatnonzero(row[r] == EOT)[1:])]
    stream = loader.streams["train"].take(np.arange(loader.streams["train"].size))
    fitting = [tuple(d) for d in np.split(stream, np.flatnonzero(stream == EOT)[1:]) if len(d) <= 33]
    assert len(pieces) == len(np.flatnonzero(stream == EOT)) and len(fitting) > 200
    assert not Counter(fitting) - Counter(pieces)  # each document that fits a row is in one, whole
    # the reported count of tokens cut: the split's tokens less those in the rows
    assert p.cut == stream.size - real.sum() and p.cut > 0
    assert f"{p.cut:,} tokens cut" in caplog.text and "cuts most of the tokens" not in caplog.text
    with caplog.at_level(logging.INFO, logger="nanogpt"):  # windows far shorter than the documents: a warning
        assert packed(documents, block_size=4).packing("train").cut > 0
    assert "best-fit packing cuts most of the tokens" in caplog.text


def test_packed_batches_resume_exactly_split_among_ranks_and_visit_rows_once_an_epoch(documents):
    full = packed(documents, micro_steps=2, documents=True).train_batches(0)
    first = [next(full) for _ in range(6)]
    resumed = packed(documents, micro_steps=2, documents=True).train_batches(2)
    assert all(torch.equal(a, b) for got in first[4:] for a, b in zip(got, next(resumed)))
    ranks = [packed(documents, micro_steps=1, rank=r, world_size=2) for r in range(2)]
    assert all(np.array_equal(ranks[m % 2].train_starts(0, m // 2), packed(documents, micro_steps=2).train_starts(0, m))
               for m in range(2))
    epoch = packed(documents, order="epoch")
    rows = np.concatenate([epoch.train_starts(it, 0) for it in range(epoch.epoch_windows // 4)])
    assert epoch.epoch_windows == epoch.packing("train").rows and len(np.unique(rows)) == len(rows)


def test_any_window_gives_each_tokens_place_in_its_document(documents):
    """Unpacked windows (model.doc_mask without packing) start anywhere: a token's place counts
    from its document's start, or from the window's start when that is later."""
    loader = BatchLoader(documents, batch_size=64, block_size=32, device=torch.device("cpu"), seed=1, documents=True)
    x, _, positions = loader.train_batches(0).__next__()
    for row, pos in zip(x.numpy(), positions.numpy()):
        starts = np.union1d([0], np.flatnonzero(row == EOT))
        assert np.array_equal(pos, np.arange(32) - starts[np.searchsorted(starts, np.arange(32), side="right") - 1])
    assert (x[:, 0] != EOT).any()  # windows that open mid-document are among them
