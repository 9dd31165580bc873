"""Step time of two source trees of this project side by side: did a change slow training down?

    python scripts/bench_trees.py /path/to/before /path/to/after                  # the CPU recipe, 7 rounds
    python scripts/bench_trees.py ../main . --rounds 9 -- system=cpu_fast bench.iters=200

Each round runs `bench.py bench.json=true` of one tree, then of the other (the order alternating
from round to round), each in a fresh process importing its own tree's nanogpt, on the same
prepared data; a busy phase of the machine hits both. The result is each tree's median ms/iter
over the rounds and the median of the per-round ratios after / before (below 1: faster).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(tree: Path, args: list[str], data_root: str) -> float:
    proc = subprocess.run([sys.executable, str(tree / "bench.py"), "bench.json=true", f"data.root={data_root}", *args],
                          cwd=tree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    if proc.returncode != 0:
        sys.exit(f"{tree}/bench.py failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["ms_per_iter"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    a, extra = parser.parse_known_args()  # bench.py's overrides, after --; default: bench.iters=100
    trees, args = (a.before.resolve(), a.after.resolve()), [x for x in extra if x != "--"] or ["bench.iters=100"]
    times: dict[Path, list[float]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as data_root:
        bench(trees[0], ["bench.iters=1", "bench.warmup=0"], data_root)  # prepares the data once, outside the timing
        for r in range(a.rounds):
            for tree in trees if r % 2 == 0 else trees[::-1]:
                times[tree].append(bench(tree, args, data_root))
                print(f"round {r + 1}: {tree.name or tree} {times[tree][-1]:.2f} ms/iter", flush=True)
    ratios = [after / before for before, after in zip(times[trees[0]], times[trees[1]])]
    for tree in trees:
        print(f"{tree}: median {statistics.median(times[tree]):.2f} ms/iter over {a.rounds} rounds")
    print(f"after / before: median {statistics.median(ratios):.4f} (range {min(ratios):.4f}-{max(ratios):.4f})")


if __name__ == "__main__":
    main()
