"""Real corpora: text, jsonl.gz and parquet files and the Hub's dataset layout read as documents,
sharded preparation killed and resumed, budgets extended, epoch order, a trained tokenizer.
Every fixture is written here; nothing touches the network."""

import gzip
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, compose_cfg, run_script
from nanogpt.config import DataConfig, to_train_config
from nanogpt.data import BatchLoader, aligned_starts
from nanogpt.errors import UserError
from nanogpt.export import export
from nanogpt.prepare import prepare
from nanogpt.shards import TokenStream
from nanogpt.tokenizer import EOT, fingerprint, tokenizer_from_meta

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = "the king doth wake tonight and we shall speak of love honour death bread, sword crown Ünïcødé".split()


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) + rng.choice([".", "!\n", "?\n\n"]) for _ in range(n)]


def write_sources(folder: Path, n_text: int = 200, n_json: int = 600, n_parquet: int = 900):
    """A text file, a jsonl.gz and a parquet file (rows with more columns than the text); their documents."""
    docs = documents(n_text + n_json + n_parquet)
    text_docs, json_docs, parquet_docs = docs[:n_text], docs[n_text : n_text + n_json], docs[n_text + n_json :]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a_notes.txt").write_text("".join(text_docs))
    with gzip.open(folder / "b_web.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(json_docs))
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(n_parquet)], "text": parquet_docs}),
                   folder / "c_crawl.parquet", row_group_size=128)
    return [folder / "a_notes.txt", folder / "b_web.jsonl.gz", folder / "c_crawl.parquet"], "".join(text_docs), json_docs + parquet_docs


def config(tmp_path: Path, sources, **kw) -> DataConfig:
    args = dict(name="corpus", root=str(tmp_path / "data"), source=[str(s) for s in sources], tokenizer="gpt2",
                shard_tokens=2000) | kw
    return DataConfig(**args)


def token_stream(path: Path, split: str) -> TokenStream:
    meta = json.loads((path / "meta.json").read_text())
    return TokenStream([path / f for f in meta["splits"][split]["shards"]], fingerprint(meta))


def tokens(path: Path, split: str) -> np.ndarray:
    stream = token_stream(path, split)
    return stream.windows(np.array([0]), stream.size)[0]


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.bin"))}


def is_val(i: int, fraction: float) -> bool:
    return int((i + 1) * fraction) > int(i * fraction)


def test_text_jsonl_and_parquet_files_prepare_into_documents(tmp_path):
    sources, text, rows = write_sources(tmp_path / "src")
    path = prepare(config(tmp_path, sources))
    meta = json.loads((path / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) > 3  # cut into shards of 2000 tokens
    tok = tokenizer_from_meta(meta)
    # the text file: one document, its last 10% of characters val; rows: every 10th val
    cut = int(len(text) * 0.9)
    train_rows = "".join(EOT + d for i, d in enumerate(rows) if not is_val(i, 0.1))
    val_rows = "".join(EOT + d for i, d in enumerate(rows) if is_val(i, 0.1))
    assert tok.decode(tokens(path, "train").tolist()) == EOT + text[:cut] + train_rows
    assert tok.decode(tokens(path, "val").tolist()) == text[cut:] + val_rows
    # every document's start is recorded, across shard boundaries
    starts = token_stream(path, "train").document_starts()
    assert len(starts) == 1 + len(rows) - sum(is_val(i, 0.1) for i in range(len(rows)))
    assert (tokens(path, "train")[starts] == tok.eot_token).all()
    assert meta["rows"] == len(rows) and meta["exhausted"]


def test_a_hub_dataset_is_read_by_configuration_as_the_hub_serves_it(tmp_path, caplog):
    """The Hub path exercised through a local folder laid out like a Hub dataset repository
    (a README naming configurations and their files): load_dataset takes either."""
    repo = tmp_path / "fineweb-edu"
    docs, other = documents(300, seed=1), documents(50, seed=2)
    for k in range(3):
        (repo / "sample" / "10BT").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": docs[k * 100 : (k + 1) * 100], "score": [3.0] * 100}),
                       repo / "sample" / "10BT" / f"{k:03d}_00000.parquet")
    (repo / "data").mkdir()
    pq.write_table(pa.table({"text": other, "score": [1.0] * 50}), repo / "data" / "CC-MAIN-2024-10.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*\n"
        "- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n---\n# FineWeb-Edu, locally\n")
    cfg = to_train_config(compose_cfg(*TINY, "data=fineweb_edu", f"data.root={tmp_path / 'data'}", f"data.hf_dataset={repo}",
                                      "data.max_tokens=100000000", "data.expected_documents=8013769", "data.val_fraction=0.1"))
    assert cfg.data.hf_name == "sample-10BT"
    with caplog.at_level("WARNING", logger="nanogpt"):
        path = prepare(cfg.data)
    assert "holds 300 documents; the full set has 8,013,769: this copy is partial" in caplog.text
    meta = json.loads((path / "meta.json").read_text())
    tok = tokenizer_from_meta(meta)
    val = [is_val(i, cfg.data.val_fraction) for i in range(300)]
    assert tok.decode(tokens(path, "train").tolist()) == "".join(EOT + d for d, v in zip(docs, val) if not v)
    assert meta["made_from"]["hf_name"] == "sample-10BT" and meta["made_from"]["hf_dataset"] == str(repo)


def test_a_missing_text_column_is_named(tmp_path):
    pq.write_table(pa.table({"content": ["a b c"] * 10}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match="data.text_column='text' is not a column of .*x.parquet"):
        prepare(config(tmp_path, [tmp_path / "x.parquet"]))
    prepare(config(tmp_path, [tmp_path / "x.parquet"], text_column="content", val_fraction=0.2))


def _prepare_then_die(data: DataConfig, kind: str, n: int) -> None:
    """In a forked child: prepare, and SIGKILL this process at the n-th call of an encode or a
    rename (a shard, an open shard's record, the progress file, meta.json)."""
    import tiktoken

    calls = [0]

    def counted(f):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return f(*args, **kwargs)
        return call

    if kind == "rename":
        os.replace = counted(os.replace)
    else:
        tiktoken.Encoding.encode_to_numpy = counted(tiktoken.Encoding.encode_to_numpy)
    prepare(data)
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_preparation_resumes_to_byte_identical_shards(tmp_path, workers):
    sources, _, _ = write_sources(tmp_path / "src", n_text=600, n_json=2000, n_parquet=3000)
    reference = prepare(config(tmp_path, sources, name="reference", workers=1, shard_tokens=5000))
    data = config(tmp_path, sources, name="killed", workers=workers, shard_tokens=5000)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    kills, fork = 0, multiprocessing.get_context("fork")
    for _ in range(12):
        child = fork.Process(target=_prepare_then_die, args=(data, rng.choice(["encode", "rename"]), rng.randint(1, 10)))
        child.start()
        child.join(120)
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL, (seed, child.exitcode)
        kills += 1
    prepare(data)
    assert kills >= 3, f"seed {seed}: the preparation was killed {kills} times"
    assert shard_bytes(tmp_path / "data" / "killed") == shard_bytes(reference), f"seed {seed}"
    assert not list((tmp_path / "data" / "killed").glob("*.partial-*")) and not (tmp_path / "data" / "killed" / "progress.json").exists()


def test_a_larger_budget_extends_the_folder(tmp_path):
    sources, _, _ = write_sources(tmp_path / "src")
    small = prepare(config(tmp_path, sources, max_tokens=6000))
    before = shard_bytes(small)
    meta = json.loads((small / "meta.json").read_text())
    assert 6000 <= meta["train_tokens"] + meta["val_tokens"] < 12000 and not meta["exhausted"]
    with pytest.raises(UserError, match="data.max_tokens was 6000, now 3000"):
        prepare(config(tmp_path, sources, max_tokens=3000))
    grown = prepare(config(tmp_path, sources, max_tokens=15000))
    fresh = prepare(config(tmp_path, sources, name="fresh", max_tokens=15000))
    after = shard_bytes(grown)
    assert after == shard_bytes(fresh) and len(after) > len(before)
    # the shards before the last of each split are untouched (the budget cut the last ones short)
    last = {max(n for n in before if n.startswith(split)) for split in ("train", "val")}
    assert all(after[name] == content for name, content in before.items() if name not in last)
    everything = prepare(config(tmp_path, sources, max_tokens=None))
    assert json.loads((everything / "meta.json").read_text())["exhausted"]


def epoch_sequence(path, ranks: int, micro_steps: int, iterations: int, **kw) -> tuple[list[np.ndarray], int]:
    """The windows of every iteration, micro-step and rank in the one order they are numbered;
    and how many windows an epoch has."""
    loaders = [BatchLoader(path, batch_size=3, block_size=16, device=torch.device("cpu"), seed=5, rank=r,
                           world_size=ranks, micro_steps=micro_steps, order="epoch", **kw) for r in range(ranks)]
    sequence = []
    for it in range(iterations):
        for m in range(micro_steps):
            sequence += [loaders[r].train_starts(it, m) for r in range(ranks)]
    return sequence, loaders[0].epoch_windows


@pytest.mark.parametrize("align", [False, True])
def test_epoch_order_visits_every_window_once_and_ranks_never_share_one(tmp_path, align):
    sources, _, _ = write_sources(tmp_path / "src", n_text=20, n_json=100, n_parquet=100)
    path = prepare(config(tmp_path, sources))
    n_train = json.loads((path / "meta.json").read_text())["train_tokens"]
    sequence, per_epoch = epoch_sequence(path, ranks=2, micro_steps=2, iterations=200, align=align)
    windows = np.concatenate(sequence)
    epochs = [windows[e * per_epoch : (e + 1) * per_epoch] for e in range(len(windows) // per_epoch)]
    assert len(epochs) >= 3
    train = tokens(path, "train")
    for epoch in epochs:
        assert len(np.unique(epoch)) == per_epoch  # every window once
        assert epoch.max() + 16 + 1 <= n_train
        if align:
            assert np.array_equal(np.sort(epoch), aligned_starts(token_stream(path, "train"), 16))
            docs = token_stream(path, "train").document_starts()
            assert set(docs[docs + 16 < n_train]) <= set(epoch)  # a window opens at each document's <|endoftext|>
            assert (train[docs] == 50256).all()
        else:
            assert (np.diff(np.sort(epoch)) == 16).all()  # the split tiled: windows never overlap
    assert not np.array_equal(np.sort(epochs[0]), np.sort(epochs[1])) or align  # a new offset each epoch
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch
    # ranks: within an epoch every window is dealt once, so no two ranks (or micro-steps) share one
    by_rank = [np.concatenate(sequence[r::2]) for r in range(2)]
    assert not set(by_rank[0][: per_epoch // 2]) & set(by_rank[1][: per_epoch // 2])
    # a pure function of (seed, iteration, micro-step): another process draws the same
    again, _ = epoch_sequence(path, ranks=2, micro_steps=2, iterations=200, align=align)
    assert all(np.array_equal(a, b) for a, b in zip(sequence, again))


def test_a_trained_bpe_encodes_any_text_and_reserves_end_of_text(tmp_path):
    sources, text, rows = write_sources(tmp_path / "src")
    path = prepare(config(tmp_path, sources, tokenizer="bpe", bpe_vocab_size=300))
    meta = json.loads((path / "meta.json").read_text())
    tok = tokenizer_from_meta(meta)
    assert meta["vocab_size"] == 300 == tok.vocab_size and tok.eot_token == 299
    unseen = "日本語 🙂 naïve ZEBRA\x00\t\r\n" + "".join(map(chr, range(0x2500, 0x2510)))
    assert tok.decode(tok.encode(unseen)) == unseen
    assert len(tok.encode(text)) < len(text.encode()) / 2  # it learnt merges from the data
    cut = int(len(text) * 0.9)
    assert tok.decode(tokens(path, "train").tolist()).startswith(EOT + text[:cut])


@pytest.mark.slow
def test_a_trained_bpe_trains_samples_and_exports_for_transformers(tmp_path):
    """From a text file, a jsonl.gz and a parquet file: prepare a BPE, train in epoch order with
    aligned windows, sample from the prompt with characters the data never held, export, and
    read the tokenizer back with transformers."""
    transformers = pytest.importorskip("transformers")
    sources, _, _ = write_sources(tmp_path / "src")
    run_dir = tmp_path / "run"
    data = ["data=text", f"data.source=[{','.join(map(str, sources))}]", "data.name=mine", f"data.root={tmp_path / 'data'}",
            "data.tokenizer=bpe", "data.bpe_vocab_size=320", "data.shard_tokens=3000", "data.order=epoch", "data.align=true"]
    run_script("train.py", *TINY, *data, "max_iters=10", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    prompt = "Ünïcødé 日本 🙂"
    (tmp_path / "prompt.txt").write_text(prompt)  # Hydra's override grammar takes ASCII only
    out = run_script("sample.py", f"init_from={run_dir}", f"start=FILE:{tmp_path / 'prompt.txt'}", "num_samples=1",
                     "max_new_tokens=8", "stream=false", "device=cpu", cwd=tmp_path).stdout
    assert prompt in out
    export_dir = tmp_path / "hf"
    export(run_dir, export_dir)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in export_dir.iterdir()}
    meta = json.loads((tmp_path / "data" / "mine" / "meta.json").read_text())
    ours = tokenizer_from_meta(meta)
    theirs = transformers.AutoTokenizer.from_pretrained(export_dir)
    text = prompt + " the king\n\n  doth " + EOT + " wake ZEBRA\x00"
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text and theirs.eos_token_id == ours.eot_token
    assert json.loads((export_dir / "config.json").read_text())["eos_token_id"] == ours.eot_token


@pytest.mark.slow
def test_two_preparations_at_once_make_one_folder(tmp_path):
    sources, _, _ = write_sources(tmp_path / "src")
    data = config(tmp_path, sources)
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=prepare, args=(data,)) for _ in range(2)]
    for c in children:
        c.start()
    for c in children:
        c.join(120)
        assert c.exitcode == 0
    reference = prepare(config(tmp_path, sources, name="reference"))
    assert shard_bytes(tmp_path / "data" / "corpus") == shard_bytes(reference)


# -- bad rows: named by file and line, stopped at or skipped and counted ----------------------------

def json_lines(docs: list[str]) -> list[str]:
    return [json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)]


def prepare_command(*args: str, cwd: Path):
    """`python -m nanogpt.prepare`, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "nanogpt.prepare", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_corpus_with_a_bad_line_stops_naming_it_and_continues_once_corrected(tmp_path, caplog):
    lines = json_lines(documents(3000))
    corpus = tmp_path / "src" / "web.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(lines[:2000] + ['{"id": 2000, "text": "cut short\n'] + lines[2001:]))
    args = ["data=text", f"data.source=[{corpus}]", "data.name=web", f"data.root={tmp_path / 'data'}",
            "data.shard_tokens=4000"]
    stopped = prepare_command(*args, cwd=tmp_path)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    (line,) = stopped.stderr.strip().splitlines()
    assert line.startswith(f"error: {corpus}:2001: not JSON (Unterminated string") and "data.bad_rows=skip" in line
    assert not (tmp_path / "outputs").exists()  # the command writes no run folder
    saved = json.loads((tmp_path / "data" / "web" / "progress.json").read_text())
    assert saved["position"]["line"] > 1000  # what was prepared before the line is kept

    corpus.write_text("".join(lines))  # corrected: the same settings go on from where they were
    data = to_train_config(compose_cfg(*args)).data
    with caplog.at_level("INFO", logger="nanogpt"):
        done = prepare(data)
    assert f"continuing the preparation of {done} from batch {saved['batches']}" in caplog.text
    clean = prepare(config(tmp_path, [corpus], name="clean", shard_tokens=4000))
    assert shard_bytes(done) == shard_bytes(clean)


def test_a_correction_above_the_saved_position_restarts_the_preparation(tmp_path, caplog):
    lines = json_lines(documents(3000))
    corpus = tmp_path / "web.jsonl"
    corpus.write_text("".join(lines[:2500] + ["{broken\n"] + lines[2501:]))
    with pytest.raises(UserError, match=r"web.jsonl:2501: not JSON"):
        prepare(config(tmp_path, [corpus], shard_tokens=4000))
    lines[10] = json.dumps({"text": "a line above the saved position, changed too"}) + "\n"
    corpus.write_text("".join(lines))
    with caplog.at_level("INFO", logger="nanogpt"):
        restarted = prepare(config(tmp_path, [corpus], shard_tokens=4000))
    assert f"restarting the preparation of {restarted}: {corpus} changed in its first" in caplog.text
    assert "continuing" not in caplog.text
    clean = prepare(config(tmp_path, [corpus], name="clean", shard_tokens=4000))
    assert shard_bytes(restarted) == shard_bytes(clean)


BAD_ROWS = {  # line index -> (the line, what the message says about it)
    5: ("{'text': 'single quotes'}\n", "not JSON (Expecting property name enclosed in double quotes: column 2)"),
    100: ('{"id": 100, "text": null}\n', "'text' is null, not a string"),
    200: ('{"id": 200, "body": "elsewhere"}\n', "no 'text' key (it has id, body; data.text_column names the key)"),
    300: ('["a", "list"]\n', "a JSON list, not an object"),
    400: ('{"text": ["not", "a", "string"]}\n', "'text' is list, not a string"),
    500: (b'{"text": "caf\xe9"}\n', "not UTF-8 (invalid continuation byte at byte 13)"),
}


def test_bad_rows_stop_naming_the_line_or_are_skipped_and_counted(tmp_path, caplog):
    docs = documents(1000)
    lines = [line.encode() for line in json_lines(docs)]
    for i, (line, _) in BAD_ROWS.items():
        lines[i] = line if isinstance(line, bytes) else line.encode()
    corpus, parquet = tmp_path / "web.jsonl.gz", tmp_path / "crawl.parquet"
    corpus.write_bytes(gzip.compress(b"".join(lines)))
    pq.write_table(pa.table({"text": docs[:70] + [None] + docs[70:100]}), parquet, row_group_size=32)
    for i, (_, why) in BAD_ROWS.items():  # stop (the default): each row named, in turn
        with pytest.raises(UserError) as e:
            prepare(config(tmp_path, [corpus], name=f"stop{i}"))
        assert str(e.value).startswith(f"{corpus}:{i + 1}: {why}: correct it"), str(e.value)
        lines[i] = json_lines(docs)[i].encode()
        corpus.write_bytes(gzip.compress(b"".join(lines)))
    with pytest.raises(UserError, match=rf"^{parquet}: row 71: 'text' is null, not a string: correct it"):
        prepare(config(tmp_path, [parquet], name="stop_parquet"))

    for i, (line, _) in BAD_ROWS.items():  # skip: left out and counted, the rest as if they were never there
        lines[i] = line if isinstance(line, bytes) else line.encode()
    corpus.write_bytes(gzip.compress(b"".join(lines)))
    with caplog.at_level("WARNING", logger="nanogpt"):
        skipped = prepare(config(tmp_path, [corpus, parquet], name="skip", bad_rows="skip"))
    meta = json.loads((skipped / "meta.json").read_text())
    assert meta["bad_rows"] == len(BAD_ROWS) + 1 and meta["made_from"]["bad_rows"] == "skip"
    assert f"skipped {corpus}:101: 'text' is null, not a string (data.bad_rows=skip)" in caplog.text
    assert f"skipped {parquet}: row 71: 'text' is null" in caplog.text
    assert f"{skipped}: {len(BAD_ROWS) + 1} bad rows left out" in caplog.text
    clean_rows = tmp_path / "clean.jsonl"
    clean_rows.write_text("".join(line for i, line in enumerate(json_lines(docs) + json_lines(docs[:100]))
                                  if i not in BAD_ROWS))  # the parquet file's null was an extra row
    clean = prepare(config(tmp_path, [clean_rows], name="clean"))
    assert shard_bytes(skipped) == shard_bytes(clean)
    # the policy is part of the folder's record: these shards are not what stop would make
    with pytest.raises(UserError, match=r"was prepared from other data \(data.bad_rows was 'skip', now 'stop'\)"):
        prepare(config(tmp_path, [corpus, parquet], name="skip"))


def test_truncated_and_unreadable_files_are_named(tmp_path):
    raw = gzip.compress("".join(json_lines(documents(2000))).encode())
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match=rf"^{truncated}: unreadable after line [\d,]+ \(EOFError: .*truncated or damaged"):
        prepare(config(tmp_path, [truncated], name="gz", bad_rows="skip"))  # skip does not skip a lost tail
    table = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": documents(200)}), table)
    (tmp_path / "cut.parquet").write_bytes(table.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"^{tmp_path / 'cut.parquet'}: not a readable parquet file"):
        prepare(config(tmp_path, [tmp_path / "cut.parquet"], name="pq"))


def test_a_hub_datasets_bad_json_line_is_named_by_file_and_line(tmp_path):
    """datasets (pyarrow) reads a Hub dataset's JSON files; its error names neither the file nor the line."""
    repo = tmp_path / "hub"
    (repo / "data").mkdir(parents=True)
    lines = json_lines(documents(500))
    (repo / "data" / "a.jsonl").write_text("".join(lines))
    (repo / "data" / "b.jsonl").write_text("".join(lines[:300] + ['{"text": "oops}\n'] + lines[301:]))
    with pytest.raises(UserError) as e:
        prepare(DataConfig(name="hub", root=str(tmp_path / "data"), hf_dataset=str(repo), tokenizer="gpt2"))
    assert str(e.value).startswith(f"{repo / 'data' / 'b.jsonl'}:301: not JSON (Unterminated string"), str(e.value)


def test_lock_files_of_the_default_data_folder_are_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "data/.shakespeare_char.lock", "data/.fineweb_edu.lock"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.stdout.split() == ["data/.shakespeare_char.lock", "data/.fineweb_edu.lock"]
