"""Every group option composes; typos and wrong types fail at start-up with Hydra's message."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF, ROOT, compose_cfg, run_script
from nanogpt.config import SCHEMAS, to_train_config
from nanogpt.errors import UserError

GROUPS = ["model", "data", "optim", "schedule", "system", "logger", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "text"):
        (tmp_path / "notes.txt").write_text("some notes\n")
        overrides.append(f"data.source=[{tmp_path / 'notes.txt'}]")  # the one required key: files that exist
    if (group, option) == ("data", "mix"):
        overrides.append("data.mix={shakespeare_char:1,shakespeare:1}")  # the one required key: the sources
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


def schema_of(yaml_file) -> str | None:
    """The schema a YAML option names in its defaults list (`- /<schema>@_here_`)."""
    defaults = OmegaConf.load(yaml_file).get("defaults") or []
    named = [str(d).split("@")[0].lstrip("/") for d in defaults if str(d).endswith("_schema@_here_")]
    return named[0] if named else None


def preset_files() -> dict[str, list]:
    """Schema name -> the YAML options that name it."""
    by_schema = {}
    for group in GROUPS:
        for f in sorted((CONF / group).glob("*.yaml")):
            if schema_of(f):
                by_schema.setdefault(schema_of(f), []).append(f)
    return by_schema


@pytest.mark.parametrize("schema,files", sorted(preset_files().items()))
def test_each_default_lives_in_one_place(schema, files):
    """A schema with one YAML option (optim, schedule, logger): the YAML equals the schema, so the
    compose API, a test or a notebook gets the run the command line gets. A schema with several
    presets (model, data, system): each preset sets only the keys that differ from the schema."""
    defaults = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[schema]), resolve=False)
    for f in files:
        keys = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(f), resolve=False).items() if k != "defaults"}
        assert set(keys) <= set(defaults), (f.name, set(keys) - set(defaults))
        if len(files) == 1:
            assert {**defaults, **keys} == defaults, f"{f.name} differs from {schema}"
        else:
            same = [k for k, v in keys.items() if v == defaults[k]]
            assert not same, f"{f.name} repeats the schema's defaults: {same}"


@pytest.mark.slow
def test_schemas_are_not_offered_as_options():
    assert not [o for g in GROUPS for o in options(g) if o.endswith("_schema")]
    for script in ("train.py", "sample.py", "bench.py"):
        proc = run_script(script, "--help", cwd=ROOT)
        assert "_schema" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout
        assert proc.stdout.startswith(f"python {script} ["), proc.stdout[:200]  # our page, not Hydra's
    assert "model: baby, depth, gpt2_large, gpt2_medium, gpt2_small, gpt2_xl, mini, modern, tiny" in run_script(
        "train.py", "--help", cwd=ROOT).stdout
