"""Code named by `_target_`: a user's option typed by their builder's dataclass or read as an
untyped Option; what cannot be imported is one line; and trust follows where a target's text
comes from: the current command's config files and command line, never a run folder."""

import pickle
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, ROOT
from nanogpt.checkpoint import model_from_state
from nanogpt.cli import compose_command, expand_resume, split_flags
from nanogpt.config import to_dict, to_train_config
from nanogpt.errors import UserError
from nanogpt.targets import MissingKey, NotTrusted, Option, override_targets, trusted_names

EXAMPLE = ROOT / "examples" / "own_code"
sys.path.insert(0, str(EXAMPLE))  # the example package: importable, as if installed
from myresearch.model import SwiGLUConfig, SwiGLUGPT  # noqa: E402
from myresearch.optim import LionConfig  # noqa: E402

LION = "myresearch.optim.build_lion"


def compose(*args: str):
    """The config train.py composes for these arguments (--config-dir included)."""
    return compose_command(["train.py", *args], CONF, "config")


def convert(*args: str):
    return to_train_config(compose(*args))


def one_line_error(*args: str) -> str:
    with pytest.raises(UserError) as e:
        convert(*args)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


# -- typing ----------------------------------------------------------------------------------------

def test_a_users_option_is_typed_by_its_builders_dataclass():
    config = convert("--config-dir", str(EXAMPLE / "conf"), "experiment=lion_swiglu", "optim.beta1=0.8")
    assert isinstance(config.optim, LionConfig) and config.optim.beta1 == 0.8 and config.optim.learning_rate == 2e-4
    assert isinstance(config.model, SwiGLUConfig) and config.model.hidden_multiple == 32 and config.model.dropout == 0.0
    assert config.schedule.warmup_iters == 100 and type(config.schedule).__name__ == "InverseSqrtConfig"
    assert type(config.eval.tasks["next_line"]).__name__ == "NextLineConfig"
    conf = ["--config-dir", str(EXAMPLE / "conf"), "optim=lion"]
    assert one_line_error(*conf, "+optim.betas=1") == "optim: Key 'betas' not in 'LionConfig' (myresearch.optim.LionConfig)"
    assert one_line_error(*conf, "optim.beta1=1.5") == "optim.beta1=1.5 must be in [0, 1)"  # its valid() ranges too
    assert "could not be converted to Float" in one_line_error(*conf, "optim.beta1=fast")


def test_a_primary_config_of_ones_own_adds_folders_with_hydra_searchpath(tmp_path):
    (tmp_path / "more" / "optim").mkdir(parents=True)
    (tmp_path / "more" / "optim" / "lion2.yaml").write_text(f"_target_: {LION}\nlearning_rate: 5e-5\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text(
        f"defaults:\n  - config\n  - _self_\nmax_iters: 7\nhydra:\n  searchpath: [file://{tmp_path / 'more'}]\n")
    config = convert("--config-dir", str(tmp_path / "conf"), "--config-name", "mine", "optim=lion2")
    assert isinstance(config.optim, LionConfig) and config.optim.learning_rate == 5e-5 and config.max_iters == 7


def write_option(tmp_path, group: str, name: str, text: str):
    (tmp_path / "conf" / group).mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / group / f"{name}.yaml").write_text(text)
    return ["--config-dir", str(tmp_path / "conf")]


def build_sgd(c, *, model, device_type):  # an untyped builder: no dataclass to read
    return torch.optim.SGD(model.parameters(), lr=c.learning_rate, momentum=c.momentum)


def test_an_untyped_option_is_read_by_attribute_and_a_missing_key_is_one_line(tmp_path):
    conf = write_option(tmp_path, "optim", "sgd", "_target_: test_targets.build_sgd\nlearning_rate: 0.1\nmomentun: 0.9\n")
    config = convert(*conf, "optim=sgd")
    assert isinstance(config.optim, Option) and config.optim.learning_rate == 0.1 and dict(config.optim)["momentun"] == 0.9
    with pytest.raises(MissingKey) as e:
        build_sgd(config.optim, model=torch.nn.Linear(2, 2), device_type="cpu")
    assert str(e.value) == ("optim.momentum: read by test_targets.build_sgd, but optim has no such key "
                            "(it has learning_rate, momentun)")
    assert not hasattr(config.optim, "momentum")  # an AttributeError too
    assert pickle.loads(pickle.dumps(config.optim)) == config.optim  # ranks started by spawn receive it
    assert to_dict(config)["optim"] == {"_target_": "test_targets.build_sgd", "learning_rate": 0.1, "momentun": 0.9}
    assert type(to_dict(config)["optim"]) is dict  # what a checkpoint holds loads with weights_only
    write_option(tmp_path, "optim", "nolr", "_target_: test_targets.build_sgd\nmomentum: 0.9\n")
    assert one_line_error(*conf, "optim=nolr").startswith("optim (test_targets.build_sgd) has no learning_rate")


def test_a_target_that_cannot_be_imported_is_one_line_naming_it_and_the_module():
    assert one_line_error("optim._target_=nosuch.optim.build") == (
        "optim._target_=nosuch.optim.build: cannot import module nosuch.optim (No module named 'nosuch'): install "
        "your package (pip install -e <folder>) or put its folder on PYTHONPATH")
    assert one_line_error("schedule._target_=nanogpt.optim.no_such") == (
        "schedule._target_=nanogpt.optim.no_such: module nanogpt.optim has no no_such")
    assert "does not take a schedule builder's arguments" in one_line_error("schedule._target_=builtins.print")


def untyped_model(config):  # a model builder whose argument names no config dataclass
    raise AssertionError("never built")


def test_a_model_needs_a_config_dataclass_with_the_protocols_keys(tmp_path):
    conf = write_option(tmp_path, "model", "untyped", "_target_: test_targets.untyped_model\nblock_size: 8\n")
    assert "a model's first argument is annotated with its config dataclass" in one_line_error(*conf, "model=untyped")


# -- trust -----------------------------------------------------------------------------------------

def run_folder(tmp_path, *overrides: str, config_dir=None, config_name="config"):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(list(overrides)))
    sources = [{"path": str(CONF), "schema": "file", "provider": "main"}]
    sources += [{"path": str(config_dir), "schema": "file", "provider": "command-line"}] if config_dir else []
    hydra = {"hydra": {"runtime": {"config_sources": sources}, "job": {"config_name": config_name}}}
    (run / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra))
    return run


def resume(run, *args):
    return expand_resume(["train.py", f"resume={run}", *args], CONF, "config")


@pytest.mark.parametrize("planted", [f"optim._target_={LION}", f"+logger.x={{_target_: {LION}}}",
                                     f"+eval.tasks.x={{_target_: {LION}, path: a}}"])
def test_a_run_folders_target_of_ones_own_package_needs_extensions_from_this_command(tmp_path, planted):
    run = run_folder(tmp_path, "model=tiny", planted, "extensions=[myresearch]")  # a saved extensions counts for nothing
    with pytest.raises(UserError) as e:
        resume(run)
    assert str(e.value) == (f"{run}/.hydra/overrides.yaml holds {planted!r}, which would run code of its own choosing: "
                            "refused; if that code is yours, add extensions=[myresearch] to the command")
    argv, _ = resume(run, "extensions=[myresearch]")  # typed now: trusted
    assert planted in argv and "extensions=[myresearch]" not in argv[1:argv.index(planted)]
    # ... or listed in a config file of this command: a primary config of its own config folder
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nextensions: [myresearch]\n")
    run = run_folder(tmp_path / "b", "model=tiny", planted, config_dir=tmp_path / "conf", config_name="mine")
    resume(run, "--config-dir", str(tmp_path / "conf"), "--config-name", "mine", "max_iters=3")


@pytest.mark.parametrize("planted", ["schedule._target_=builtins.print", "+logger.x={_target_: builtins.print}",
                                     "+eval.tasks.x={a: [{_target_: os.system}]}", "optim=\"_target_ is here\"",
                                     "hydra.callbacks.x._target_=builtins.print"])
def test_a_run_folders_foreign_target_is_refused_wherever_it_hides(tmp_path, planted):
    run = run_folder(tmp_path, planted)
    with pytest.raises(UserError, match="which would run code of its own choosing: refused"):
        resume(run)


def test_an_option_of_this_commands_config_folder_is_trusted_when_a_run_folder_selects_it(tmp_path):
    conf = EXAMPLE / "conf"
    run = run_folder(tmp_path, "optim=lion", "model=swiglu", config_dir=conf)
    argv, run_dir = resume(run, "--config-dir", str(conf), "max_iters=5")
    assert argv == ["train.py", "--config-dir", str(conf), "optim=lion", "model=swiglu", "max_iters=5",
                    f"hydra.run.dir={run}"] and run_dir == run
    with pytest.raises(UserError) as e:
        resume(run, "max_iters=5")
    assert str(e.value) == (f"{run} was made with --config-dir {conf}: resume with the same "
                            f"(python {__import__('pathlib').Path(sys.argv[0]).name} --config-dir {conf} resume={run})")
    with pytest.raises(UserError, match="--config-dir"):
        resume(run, "--config-dir", str(tmp_path))
    run = run_folder(tmp_path / "b", "max_iters=5", config_name="mine")
    with pytest.raises(UserError, match=f"{run} was made with --config-name mine: resume with the same"):
        resume(run)


def test_overrides_are_read_for_targets_the_way_hydra_reads_them():
    assert override_targets("optim._target_=a.b") == ["a.b"]
    assert override_targets("+logger.x={_target_: a.b, k: [{_target_: c.d}]}") == ["a.b", "c.d"]
    assert override_targets("optim.learning_rate=1e-3") == []
    with pytest.raises(ValueError):
        override_targets("optim='_target_'")
    assert split_flags(["--config-dir", "x", "-cn", "y", "max_iters=1", "optim=lion"]) == (
        ["--config-dir", "x", "-cn", "y"], ["max_iters=1", "optim=lion"])
    assert split_flags(["max_iters=1", "optim=lion", "--config-dir", "x"]) == (["--config-dir", "x"], ["max_iters=1", "optim=lion"])


def test_a_checkpoints_model_class_is_imported_only_when_this_command_trusts_it():
    torch.manual_seed(0)
    model = SwiGLUGPT(SwiGLUConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
    state = {"model_args": to_dict(model.config), "model": model.state_dict()}
    with pytest.raises(NotTrusted) as e:
        model_from_state(state, where="run/ckpt.pt")
    assert str(e.value) == ("run/ckpt.pt names myresearch.model.SwiGLUGPT: a run folder cannot make a command import "
                            "code; if it is yours, add extensions=[myresearch] to the command")
    for trusted in (["myresearch"], ["myresearch.model"], ["myresearch.model.SwiGLUGPT"]):
        rebuilt = model_from_state(state, trusted=trusted)
        assert type(rebuilt) is SwiGLUGPT and all(torch.equal(v, model.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    with pytest.raises(NotTrusted):
        model_from_state(state, trusted=["myresearch.optim", "myres"])  # another module, a mere prefix
    config = convert("--config-dir", str(EXAMPLE / "conf"), "optim=lion", "extensions=[other.pkg]")
    assert {"myresearch.optim", "nanogpt.model", "nanogpt.data", "other.pkg"} <= set(trusted_names(config))
