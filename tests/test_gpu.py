"""The CUDA paths, each run as a user runs the commands: bf16 and fp16 (with its GradScaler)
against fp32, compile, kill -9 then resume, sampling, DDP on NCCL, bench.py's MFU. They skip
without a CUDA device (conftest); scripts/device_check.sh runs them on the GPU machine
(docs/gpu.md). Later CUDA features add their tests here."""

import json
import math
import random
import signal
import statistics

import pytest
import torch

from conftest import TINY, run_script
from nanogpt.checkpoint import load_checkpoint
from nanogpt.flops import published_peak
from nanogpt.rundir import read_metrics, read_status
from test_distributed import torchrun
from test_reliability import history, run, start, train_cmd, wait_for
from test_train import train_losses

pytestmark = pytest.mark.gpu

# the tiny model on the GPU, eager, every loss logged; the dtype is given by each test
CUDA = ["system=cuda", "system.compile=false", "max_iters=30", "eval_interval=30", "log_interval=1"]
FP32 = ("system.dtype=float32", "system.tf32=false")  # the reference: full fp32 matmuls


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, data_root):
    """A function: overrides -> the folder of a tiny CUDA run with them, trained once a module."""
    runs = {}

    def train(*overrides: str):
        if overrides not in runs:
            run_dir = tmp_path_factory.mktemp("run")
            run_script("train.py", *TINY, *CUDA, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *overrides,
                       cwd=run_dir)  # fmt: skip
            runs[overrides] = run_dir
        return runs[overrides]

    return train


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_as_fp32_does(cuda_run, dtype):
    run_dir = cuda_run(f"system.dtype={dtype}")
    losses, reference = train_losses(run_dir), train_losses(cuda_run(*FP32))
    assert all(math.isfinite(x) for x in losses)
    assert statistics.mean(losses[-5:]) < statistics.mean(losses[:5]) - 0.1  # it learns
    assert losses[:5] == pytest.approx(reference[:5], abs=0.02)  # autocast rounds, nothing more
    # the GradScaler runs (and is saved) for fp16 only: bf16 has fp32's range
    scaler = load_checkpoint(run_dir / "ckpt.pt")["scaler"]
    assert (scaler.get("scale", 0) > 0) == (dtype == "float16"), scaler


def test_compiled_training_follows_eager(cuda_run):
    compiled = train_losses(cuda_run("system.dtype=bfloat16", "system.compile=true"))
    eager = train_losses(cuda_run("system.dtype=bfloat16"))
    assert compiled[:10] == pytest.approx(eager[:10], abs=0.02)  # fused kernels round otherwise


def test_kill_9_then_resume_is_bit_identical_on_cuda(tmp_path, data_root):
    """fp16 restores the most: weights, AdamW, the GradScaler's scale, the CUDA RNG of dropout.
    cuBLAS repeats its sums only with a fixed workspace, set before CUDA starts; deterministic
    mode picks deterministic kernels elsewhere (it warns, not fails, where it has none)."""
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    args = [*CUDA, "system.dtype=float16", "system.deterministic=true", "model.dropout=0.1",
            "max_iters=500", "eval_interval=25"]  # enough iterations to be killed mid-run on a fast GPU
    straight = run(train_cmd(data_root, tmp_path / "straight", *args), tmp_path, env=env)
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    cmd = train_cmd(data_root, killed_dir, *args)
    proc = start(cmd, tmp_path, env=env)
    kill_after = random.Random().randint(30, 200)  # past the first checkpoint
    wait_for(lambda: any(r["iter"] >= kill_after for r in read_metrics(killed_dir)) or proc.poll() is not None,
             what="training progress")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_status(killed_dir)["status"] == "running"  # killed mid-run, not after it finished
    resumed = run(cmd, tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at iteration" in resumed.stdout

    # a kernel without a deterministic version is named in a warning: the first suspect
    warnings = [line for line in resumed.stderr.splitlines() if "deterministic" in line]
    assert history(killed_dir) == history(tmp_path / "straight"), warnings
    a = load_checkpoint(tmp_path / "straight" / "ckpt.pt")["model"]
    b = load_checkpoint(killed_dir / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), warnings


def test_sampling_on_cuda_repeats_with_its_seed(cuda_run, tmp_path):
    args = [f"init_from={cuda_run('system.dtype=bfloat16')}", "device=cuda", "num_samples=2", "max_new_tokens=40",
            "format=json", "start=ROMEO:"]  # fmt: skip
    first, again = (run_script("sample.py", *args, cwd=tmp_path).stdout for _ in range(2))
    samples = [json.loads(line) for line in first.splitlines()]
    assert len(samples) == 2 and all(s["text"] for s in samples), first
    assert first == again


def test_ddp_on_nccl_with_one_rank_trains_as_one_process(cuda_run, tmp_path, data_root):
    proc = torchrun(*TINY, *CUDA, "system.dtype=bfloat16", f"data.root={data_root}", f"hydra.run.dir={tmp_path}/run",
                    cwd=tmp_path, nproc=1, env={"NCCL_DEBUG": "INFO"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "NCCL INFO" in proc.stdout + proc.stderr  # the process group ran on NCCL
    single = train_losses(cuda_run("system.dtype=bfloat16"))
    assert train_losses(tmp_path / "run") == pytest.approx(single, abs=0.01)


def test_bench_reports_mfu_against_the_cards_published_peak(tmp_path):
    proc = run_script(
        "bench.py", *TINY, "system=cuda", "system.compile=false", "system.dtype=bfloat16", "model.vocab_size=100",
        "bench.data=synthetic", "bench.iters=3", "bench.warmup=1", "bench.json=true", cwd=tmp_path,
    )  # fmt: skip
    r = json.loads(proc.stdout)
    device = torch.device("cuda")
    peak = published_peak(device)
    assert peak, f"{torch.cuda.get_device_name(device)} is not in nanogpt.flops.GPU_PEAK_BF16"
    assert r["device"] == torch.cuda.get_device_name(device) and r["dtype"] == "bfloat16"
    assert r["published_peak_tflops"] == pytest.approx(peak / 1e12)
    assert r["mfu_published"] == pytest.approx(r["achieved_tflops"] / r["published_peak_tflops"])
    assert 0 < r["mfu_published"] < 1 and 0 < r["mfu_measured"] < 1 and r["measured_peak_tflops"] > 0
    assert r["peak_memory_mb"] > 0


def test_document_masks_run_on_flex_attention_under_compile_with_the_eager_logits(monkeypatch):
    """model.doc_mask on CUDA: eager runs SDPA with a block-diagonal mask, compiled runs
    flex_attention with a BlockMask; the logits agree."""
    import nanogpt.model
    from nanogpt.model import GPT, GPTConfig

    flex_calls = []
    flex = nanogpt.model.flex_attention
    monkeypatch.setattr(nanogpt.model, "flex_attention", lambda *a, **kw: flex_calls.append(1) or flex(*a, **kw))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=100, n_layer=2, n_head=4, n_embd=64, doc_mask=True)).cuda().eval()
    idx = torch.randint(0, 100, (2, 256), device="cuda")
    lengths = [[100, 56, 100], [1, 200, 55]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).cuda()
    eager, _ = model(idx, idx, positions=positions)
    assert not flex_calls
    compiled, _ = torch.compile(model)(idx, idx, positions=positions)
    assert flex_calls
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
