"""Every group option composes; typos and wrong types fail at start-up with Hydra's message."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF, compose_cfg, run_script
from nanogpt.config import to_train_config
from nanogpt.errors import UserError

GROUPS = ["model", "data", "optim", "schedule", "system", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "text"):
        overrides.append("data.source=[notes.txt]")  # the one required key
    config = to_train_config(compose_cfg(*overrides))
    assert config.max_iters >= 0 and config.model.n_embd % config.model.n_head == 0


def test_defaults_are_the_cpu_recipe():
    c = to_train_config(compose_cfg())
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size) == (4, 4, 128, 64)
    assert (c.data.batch_size, c.max_iters, c.eval_iters, c.model.dropout) == (12, 2000, 20, 0.0)
    assert c.schedule.lr_decay_iters == 2000 and c.data.name == "shakespeare_char"


def test_presets_reproduce_nanogpt_configs():
    owt = to_train_config(compose_cfg("experiment=gpt2_owt"))
    assert owt.model.bias is False and owt.model.vocab_pad_multiple == 64 and owt.model.vocab_size == 50257
    assert owt.data.batch_size * owt.gradient_accumulation_steps * owt.model.block_size == 491520
    char = to_train_config(compose_cfg("experiment=shakespeare_char"))
    assert (char.model.n_layer, char.model.n_embd, char.model.dropout, char.data.batch_size) == (6, 384, 0.2, 64)


@pytest.mark.parametrize("override", ["optim.learnin_rate=1", "model.n_layer=abc", "system.compile=maybe", "nope=1"])
def test_typos_and_wrong_types_fail_at_composition(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)):
        to_train_config(compose_cfg(override))


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.n_head=5", "divisible by n_head"),
        ("data.batch_size=0", "data.batch_size=0 must be positive"),
        ("eval_iters=-1", "eval_iters=-1 must be positive"),
        ("system.dtype=float8", "system.dtype"),
        ("model.norm=batchnorm", "model.norm"),
    ],
)
def test_invalid_values_raise_our_error(override, message):
    with pytest.raises(UserError, match=message):
        to_train_config(compose_cfg(override))


def test_command_line_typo_is_one_hydra_message(tmp_path):
    proc = run_script("train.py", "optim.learnin_rate=1", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "learnin_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "ckpt.pt").exists()
