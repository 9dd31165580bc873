"""GPT-2 weights in and out: Hugging Face folders and the Hub cache, export, finetuning, nanoGPT's
own checkpoints. No network: a tiny random GPT2LMHeadModel stands in for OpenAI's weights."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from nanogpt.checkpoint import load_checkpoint, model_from_state, weights_file
from nanogpt.errors import UserError
from nanogpt.export import export
from nanogpt.model import GPT, GPTConfig
from nanogpt.pretrained import load_pretrained
from nanogpt.tokenizer import TiktokenTokenizer

VOCAB = 50257  # GPT-2's, so the Tiny Shakespeare BPE data and the GPT-2 tokenizer fit


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(a random 2-layer, 64-wide GPT2LMHeadModel, the folder save_pretrained wrote it to)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero biases, gains off one: a mix-up shows in the logits
    folder = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(folder)
    return model, folder


def logits(model, idx: torch.Tensor) -> torch.Tensor:
    idx = idx.contiguous()
    with torch.no_grad():
        if isinstance(model, GPT):
            return model.eval()(idx, idx)[0]  # with targets: every position's logits
        return model.eval()(idx).logits


def greedy(model: GPT, prompt: str, n: int) -> str:
    from nanogpt.sampling import Sampling, generate

    tok = TiktokenTokenizer("gpt2")
    (row,) = generate(model, [tok.encode(prompt)], 1, n, Sampling(temperature=1.0, top_k=1))  # through the cache
    return tok.decode(row.tokens)


def export_cli(run, out) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "nanogpt.export", str(run), str(out)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("layout", ["safetensors", "file", "sharded", "openai_bin"])
def test_hugging_face_folder_loads_with_equal_logits(hf_model, tmp_path, layout):
    from safetensors.torch import save_file

    hf, saved = hf_model
    folder = tmp_path / layout
    folder.mkdir()
    shutil.copy(saved / "config.json", folder)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    if layout in ("safetensors", "file"):
        shutil.copy(saved / "model.safetensors", folder)
    elif layout == "sharded":  # as save_pretrained writes a model larger than its shard size
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, names in shards.items():
            save_file({k: state[k] for k in names}, folder / name, metadata={"format": "pt"})
        weight_map = {k: name for name, names in shards.items() for k in names}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:  # as OpenAI's files on the Hub: GPT2Model names (no "transformer."), causal-mask buffers, a pickle
        old = {k.removeprefix("transformer."): v for k, v in state.items()}
        old |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)}
        torch.save(old, folder / "pytorch_model.bin")

    init_from = folder / "model.safetensors" if layout == "file" else folder
    model = load_pretrained(str(init_from), GPTConfig())
    assert (model.config.activation, model.config.block_size, model.config.bias) == ("gelu_tanh", 64, True)
    idx = torch.randint(0, VOCAB, (2, 64))
    assert (logits(model, idx) - logits(hf, idx)).abs().max() < 1e-5


def test_shorter_block_size_crops_and_keeps_the_prefix_logits(hf_model):
    hf, folder = hf_model
    model = load_pretrained(str(folder), GPTConfig(block_size=16, dropout=0.1))
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape[0] == 16
    assert model.config.dropout == 0.1  # the one architecture setting a run may change
    idx = torch.randint(0, VOCAB, (2, 64))
    assert (logits(model, idx[:, :16]) - logits(hf, idx)[:, :16]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="longer than block_size"):
        logits(model, idx[:, :17])


@pytest.mark.parametrize(
    "setting",
    [{"pos_emb": "rope"}, {"norm": "rmsnorm"}, {"qk_norm": True}, {"tie_embeddings": False},
     {"logit_softcap": 15.0}, {"activation": "relu2"}],
)
def test_architecture_settings_the_weights_lack_are_refused(hf_model, setting):
    _, folder = hf_model
    key = next(iter(setting))
    with pytest.raises(UserError, match=rf"model\.{key}=.*architecture comes from the weights"):
        load_pretrained(str(folder), GPTConfig(**setting))


def test_unknown_names_and_folders_are_refused(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="gpt3.*choose scratch, resume, gpt2, gpt2-medium"):
        load_pretrained("gpt3", GPTConfig())
    with pytest.raises(UserError, match="neither a ckpt.pt .* nor a config.json"):
        load_pretrained(str(tmp_path), GPTConfig())
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="llama model: only GPT-2-shaped"):
        load_pretrained(str(tmp_path), GPTConfig())
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the hf extra were not installed
    with pytest.raises(UserError, match=r"pip install -e '\.\[hf\]'"):
        load_pretrained("gpt2", GPTConfig())


@pytest.mark.slow
def test_gpt2_by_name_samples_from_the_hugging_face_cache(hf_model, tmp_path):
    """sample.py init_from=gpt2 with no run: the weights come from the Hub's cache, as
    from_pretrained("gpt2") leaves them; with no copy, the error says where to put one."""
    _, folder = hf_model
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, snapshot)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["start=ROMEO:", "num_samples=1", "max_new_tokens=8", "top_k=1", "device=cpu"]

    proc = run_script("sample.py", "init_from=gpt2", *args, cwd=tmp_path, env=env)
    assert greedy(load_pretrained(str(folder), GPTConfig()), "ROMEO:", 8) in proc.stdout

    proc = run_script("sample.py", "init_from=gpt2-xl", *args, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2
    assert "no network and no copy in the Hugging Face cache" in proc.stderr
    assert "init_from=/path/to/gpt2-xl" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [["model.bias=false"], ["model.bias=true", "model.tie_embeddings=false", "model.activation=relu2"]],
    ids=["no_bias_gelu", "bias_untied_relu2"],
)
def test_export_opens_in_transformers_with_equal_logits(train_run, tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    train_run(*overrides, "max_iters=2", "eval_interval=2", "eval_iters=1")
    written, note = export(tmp_path / "run", tmp_path / "hf")
    assert sorted(written) == ["config.json", "model.safetensors"]  # a character vocabulary: no GPT-2 tokenizer files
    assert note == "no tokenizer files: the run's vocabulary is characters"

    ours = model_from_state(load_checkpoint(weights_file(tmp_path / "run")))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert hf.config.activation_function == ours.config.activation  # gelu (exact) and relu2 keep their names
    assert hf.config.tie_word_embeddings == ours.config.tie_embeddings
    idx = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size))
    assert (logits(hf, idx) - logits(ours, idx)).abs().max() < 1e-5
    if not ours.config.bias:
        assert all((p == 0).all() for n, p in hf.named_parameters() if n.endswith(".bias"))
    # and back: the exported folder is an init_from like any other
    back = load_pretrained(str(tmp_path / "hf"), GPTConfig())
    assert (logits(back, idx) - logits(ours, idx)).abs().max() < 1e-5


def test_export_refuses_what_gpt2_cannot_express(tmp_path):
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=1, n_head=2, n_embd=32, pos_emb="rope",
                       norm="rmsnorm", qk_norm=True, logit_softcap=15.0)
    torch.save({"model": GPT(config).state_dict(), "model_args": dataclasses.asdict(config)}, tmp_path / "ckpt.pt")
    proc = export_cli(tmp_path / "ckpt.pt", tmp_path / "hf")
    assert proc.returncode == 2
    for setting in ("model.norm='rmsnorm'", "model.pos_emb='rope'", "model.qk_norm=True", "model.logit_softcap=15.0"):
        assert setting in proc.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_finetune_from_a_local_gpt2_folder_and_export_with_the_tokenizer(hf_model, train_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf, folder = hf_model
    train_run("experiment=finetune_shakespeare_cpu", f"init_from={folder}", "model.block_size=32",
              "gradient_accumulation_steps=1", "max_iters=4", "eval_interval=2", "eval_iters=1")
    run = tmp_path / "run"
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert (run / "best.pt").exists()  # the preset keeps the best val loss's weights
    state = load_checkpoint(run / "ckpt.pt")
    args = state["model_args"]
    assert (args["n_layer"], args["n_embd"], args["vocab_size"], args["block_size"]) == (2, 64, VOCAB, 32)
    assert args["activation"] == "gelu_tanh"
    # it started from the folder's weights: 4 steps at lr 3e-5 move them far less than a fresh init differs
    moved = (state["model"]["transformer.wpe.weight"] - hf.transformer.wpe.weight[:32]).abs().max()
    assert 0 < moved < 1e-3

    proc = export_cli(run, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).exists()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "ROMEO:\nBut soft, what light through yonder window breaks?<|endoftext|> héllo 🤖"
    assert tok(text)["input_ids"] == TiktokenTokenizer("gpt2").encode(text)


@pytest.mark.slow
def test_nanogpt_checkpoint_samples_and_trains(train_run, tmp_path):
    """A checkpoint as nanoGPT's train.py writes it: a compiled model's _orig_mod. names, its own
    model_args keys only, the singular "optimizer", a tensor best_val_loss, no vocabulary."""
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=True, vocab_size=50304, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))  # nanoGPT's parameter names are ours
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, VOCAB, (2, 64))
    model(x, x)[1].backward()
    optimizer.step()
    out_dir = tmp_path / "out-shakespeare"
    out_dir.mkdir()
    checkpoint = {
        "model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "model_args": args,
        "iter_num": 1,
        "best_val_loss": torch.tensor(10.9),
        "config": {"dataset": "shakespeare", "init_from": "scratch", "compile": True, "learning_rate": 6e-4},
    }
    torch.save(checkpoint, out_dir / "ckpt.pt")

    proc = run_script("sample.py", f"init_from={out_dir}", "start=ROMEO:", "num_samples=1", "max_new_tokens=8",
                      "top_k=1", "device=cpu", cwd=tmp_path)
    assert greedy(model, "ROMEO:", 8) in proc.stdout  # no vocabulary saved: the GPT-2 BPE, as nanoGPT

    train_run(f"init_from={out_dir / 'ckpt.pt'}", "data=shakespeare", "max_iters=2", "eval_interval=2", "eval_iters=1")
    state = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert state["iter_num"] == 2  # its weights only: a fresh optimizer and iteration count
    args = state["model_args"]
    assert (args["vocab_size"], args["block_size"]) == (50304, 32)  # the block cropped to model=tiny's

    written, note = export(out_dir, tmp_path / "hf")  # the GPT-2 BPE, as sample.py reads it
    assert {"vocab.json", "merges.txt"} <= set(written) and note is None


def test_export_of_a_checkpoint_without_a_vocabulary_says_what_it_cannot_know(tmp_path):
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=65, dropout=0.0)
    torch.save({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args}, tmp_path / "ckpt.pt")  # nanoGPT's char run
    written, note = export(tmp_path / "ckpt.pt", tmp_path / "hf")
    assert "does not record its vocabulary, and 65 tokens are not GPT-2's" in note  # what export prints
    assert sorted(written) == sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
