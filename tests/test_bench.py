"""bench.py as a user runs it (a tiny model for 2 timed iterations on CPU), and what every
command does at start-up. No timing assertions."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, run_script

FIELDS = {
    "device", "dtype", "compile", "params", "batch_size", "block_size", "micro_steps", "tokens_per_iter",
    "data", "iters", "warmup", "ms_per_iter", "ms_per_iter_min", "ms_per_iter_max", "ms_per_iter_iqr",
    "tokens_per_s", "flops_per_token", "achieved_tflops", "published_peak_tflops", "mfu_published",
    "measured_peak_tflops", "mfu_measured", "data_ms_per_batch", "data_share", "peak_memory_mb",
    "startup_s", "first_iter_s", "torch", "world_size", "parallelism", "ranks",
}  # fmt: skip


def test_json_report_on_real_batches(tmp_path, data_root):
    proc = run_script(
        "bench.py", *TINY, f"data.root={data_root}", "gradient_accumulation_steps=2",
        "bench.iters=2", "bench.warmup=1", "bench.json=true", cwd=tmp_path,
    )  # fmt: skip
    r = json.loads(proc.stdout)  # stdout holds the JSON object alone
    assert set(r) == FIELDS
    assert (r["dtype"], r["data"], r["iters"], r["compile"]) == ("float32", "real", 2, False)
    assert r["tokens_per_iter"] == 2 * 4 * 32  # micro-steps x batch x block of the tiny model
    assert r["ms_per_iter_min"] <= r["ms_per_iter"] <= r["ms_per_iter_max"]
    assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 6 * r["params"] * 0.9
    assert 0 < r["mfu_measured"] and r["measured_peak_tflops"] > 0
    assert r["mfu_published"] is None  # no published peak for a CPU
    assert 0 <= r["data_share"] < 1 and r["peak_memory_mb"] > 0 and r["startup_s"] > 0
    assert list(tmp_path.iterdir()) == []  # no run folder, no outputs/


def test_human_report_on_synthetic_batches(tmp_path):
    # synthetic batches need no prepared data: the missing data.root must never be touched
    proc = run_script(
        "bench.py", *TINY, f"data.root={tmp_path / 'absent'}", "model.vocab_size=100",
        "bench.iters=2", "bench.warmup=0", "bench.data=synthetic", cwd=tmp_path,
    )  # fmt: skip
    for label in ("iteration", "throughput", "MFU", "data", "memory", "start-up"):
        assert any(line.startswith(label) for line in proc.stdout.splitlines()), proc.stdout
    assert "synthetic batches" in proc.stdout
    assert not (tmp_path / "absent").exists()


def test_misspelt_bench_key_fails_at_composition(tmp_path):
    proc = run_script("bench.py", *TINY, "bench.iterations=2", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "iterations" in proc.stderr


def test_bench_keys_are_bench_py_s_alone_even_once_it_is_imported():
    """bench.py types its `bench` node with a schema of its own: importing it changes nothing of
    train.py's config, where bench.* stays an unknown key."""
    from hydra.errors import ConfigCompositionException

    import bench
    from conftest import compose_cfg
    from nanogpt.config import to_train_config

    assert isinstance(to_train_config(compose_cfg("bench.iters=5", config_name="bench")).bench, bench.BenchSettings)
    assert to_train_config(compose_cfg()).bench is None
    with pytest.raises(ConfigCompositionException, match="bench.iters"):
        compose_cfg("bench.iters=5")


@pytest.mark.parametrize("script", ["train.py", "bench.py", "sample.py"])
def test_commands_collect_garbage_again_once_imported(script):
    # the imports run with the collector off (start-up time); the run itself must not
    code = f"import gc, runpy; runpy.run_path({str(ROOT / script)!r}); print(gc.isenabled(), gc.get_freeze_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True" and int(out[1]) > 100_000  # torch's import objects stay out of later collections
