"""Best-fit packing (data.packing=bestfit): rows of block_size + 1 tokens that start at a
document and hold whole documents, after nanochat's BOS-aligned best-fit loader.

The documents are taken in a fixed order, `buffer` of them at a time. Each row places the
longest buffered document that fits the space left, again and again. When none fits, the
space is filled with the start of the shortest buffered document too long for any row (its
remaining tokens are cut: such a document is cut wherever it goes), or, when there is none,
left as padding whose targets are ignored. So every row begins at a document's first token,
no document of a row's length or less ever loses a token, and what is cut or padded is counted.

nanochat crops the shortest buffered document instead, whatever its length: no padding, but a
document that would fit the next row loses its end. The packing is computed once for a split
(a pure function of its documents and the order), so any row can be drawn by its index: exact
resume, and ranks that take their rows from one numbering.
"""

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass
class Packing:
    """Rows as segments: row r is segments row_ptr[r]:row_ptr[r+1], each `lengths[s]` tokens of
    the stream from `starts[s]` (a document's first token), then padding up to `capacity`."""

    capacity: int  # tokens a row: block_size + 1 (inputs and the last target)
    row_ptr: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    documents: int  # documents packed
    tokens: int  # their tokens
    cut: int  # tokens of documents longer than the space they were given, not in any row
    padded: int  # padding tokens (targets ignored)

    @property
    def rows(self) -> int:
        return len(self.row_ptr) - 1

    def summary(self) -> str:
        return (f"{self.documents:,} documents ({self.tokens:,} tokens) in {self.rows:,} rows of {self.capacity}: "
                f"{self.cut:,} tokens cut ({self.cut / max(self.tokens, 1):.1%}), {self.padded:,} padding")

    def segments(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, lengths, row of each) of the segments of these rows, in row order."""
        first, last = self.row_ptr[rows], self.row_ptr[rows + 1]
        count = last - first
        seg = np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum())
        return self.starts[seg], self.lengths[seg], np.repeat(np.arange(len(rows)), count)


def best_fit(starts: np.ndarray, lengths: np.ndarray, capacity: int, buffer: int) -> Packing:
    """Pack the documents (stream offset and length of each, in the order to take them)."""
    row_ptr, seg_starts, seg_lengths = [0], [], []
    pending_len: list[int] = []  # the buffer, sorted by length, and each one's document
    pending_doc: list[int] = []
    taken, cut, padded = 0, 0, 0

    def refill():
        nonlocal taken
        while len(pending_len) < buffer and taken < len(lengths):
            at = bisect.bisect_right(pending_len, int(lengths[taken]))
            pending_len.insert(at, int(lengths[taken]))
            pending_doc.insert(at, taken)
            taken += 1

    def place(i: int, n: int):
        seg_starts.append(int(starts[pending_doc[i]]))
        seg_lengths.append(n)
        del pending_len[i], pending_doc[i]
        refill()

    refill()
    while pending_len:
        space = capacity
        while space and pending_len:
            fits = bisect.bisect_right(pending_len, space) - 1  # the longest that fits whole
            if fits >= 0:
                space -= pending_len[fits]
                place(fits, pending_len[fits])
                continue
            too_long = bisect.bisect_right(pending_len, capacity)  # the shortest that fits no row
            if too_long == len(pending_len):
                break
            cut += pending_len[too_long] - space
            place(too_long, space)
            space = 0
        padded += space
        row_ptr.append(len(seg_starts))
    return Packing(capacity, np.array(row_ptr, dtype=np.int64), np.array(seg_starts, dtype=np.int64),
                   np.array(seg_lengths, dtype=np.int64), len(lengths), int(np.sum(lengths)), cut, padded)
