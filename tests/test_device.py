"""What `system` switches on for the process and picks for this machine. Process-wide switches
run in their own interpreter."""

import platform
import subprocess
import sys

import pytest
import torch

from conftest import compose_cfg
from nanogpt.config import to_train_config
from nanogpt.flops import cpu_has_fast_bf16

# a step's large activations, allocated, touched and freed, five steps over
PAGE_FAULTS = """
import resource, sys, torch
from nanogpt.config import SystemConfig
from nanogpt.device import configure_backends
configure_backends(SystemConfig(device="cpu", cpu_memory_cache=sys.argv[1] == "on"), torch.device("cpu"))
def step():
    a = torch.ones(32 * 2**20)  # 128 MiB, above glibc's largest mmap threshold (32 MiB)
    b = torch.ones(16 * 2**20)
    del a, b
step(); step()  # the first steps fault their pages in
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(cache: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PAGE_FAULTS, cache], capture_output=True, text=True, check=True)
    return int(proc.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the CPU memory cache tunes glibc's malloc")
def test_cpu_memory_cache_reuses_freed_memory_instead_of_faulting_it_in_again():
    cached, uncached = page_faults("on"), page_faults("off")
    # without the cache every step maps 192 MiB afresh: ~49,000 faults of 4 KiB pages (fewer
    # with transparent huge pages). With it the heap's pages are reused: none, or once a block
    # when a small allocation has moved the heap's top
    assert uncached > 5 * 100
    assert cached * 5 < uncached, (cached, uncached)


def test_cpu_fast_takes_bf16_where_this_cpu_multiplies_it_faster():
    config = to_train_config(compose_cfg("system=cpu_fast"))
    assert (config.system.compile, config.system.parallel_dropout) == (False, True)
    # the preset follows the process's one measurement (bf16 at >= 2x fp32's rate). How fast each
    # runs is not asserted: on a loaded machine one timing can be descheduled and off by 10x
    assert config.system.dtype == ("bfloat16" if cpu_has_fast_bf16() else "float32")
