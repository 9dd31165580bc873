"""OpenAI's GPT-2 weights, and any GPT-2-shaped model in the Hugging Face layout.

    init_from=gpt2 | gpt2-medium | gpt2-large | gpt2-xl   # from the Hugging Face Hub (or its cache)
    init_from=/path/to/folder                             # config.json + model.safetensors (or .bin)

The architecture comes from the weights' config.json; of the run's model settings only dropout and a
shorter block_size apply (the position embeddings are cropped). Hugging Face's GPT-2 keeps its
projections as Conv1D, weight (in, out); ours are nn.Linear, weight (out, in): those are transposed.
Everything else maps by name. nanogpt.export writes the same layout back.
"""

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig

log = logging.getLogger("nanogpt")

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_EXTRA = "pip install -e '.[hf]'"
# Hugging Face activation_function -> ours. gelu_new and gelu_pytorch_tanh are both GELU's tanh
# form; an export writes gelu_new, GPT-2's own (the first name of each of ours)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu2": "relu2"}
HF_ACTIVATION = {ours: hf for hf, ours in reversed(ACTIVATIONS.items())}
# model settings GPT-2's format has no place for, with the one value GPT-2 has
GPT2_FIXED = {"norm": "layernorm", "pos_emb": "learned", "qk_norm": False, "logit_softcap": 0.0}
# GPT2Config's defaults: save_pretrained writes only the values that differ from them
HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# model settings that change the architecture: the weights decide them, a run may not
ARCHITECTURE = ("activation", "tie_embeddings", *GPT2_FIXED)


def load_pretrained(init_from: str, model: GPTConfig) -> GPT:
    """GPT-2 by name or a Hugging Face folder/file, with model.dropout and a shorter model.block_size."""
    if init_from in GPT2_NAMES:
        folder, weights = _download(init_from), None
    else:
        path = Path(init_from).expanduser()
        if not path.exists():
            raise UserError(
                f"init_from={init_from!r}: choose scratch, resume, {', '.join(GPT2_NAMES)}, "
                "or the path of a run folder, a checkpoint or a Hugging Face GPT-2 folder"
            )
        folder, weights = (path, None) if path.is_dir() else (path.parent, path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"init_from={init_from}: {folder} has neither a ckpt.pt (a run) nor a config.json (a Hugging Face model)"
        )
    config = config_from_hf(json.loads(config_file.read_text()), source=str(config_file))
    _check_settings(model, config, init_from)

    gpt = GPT(dataclasses.replace(config, dropout=model.dropout))
    state = from_hf_state_dict(read_weights(folder, weights), gpt)
    try:
        gpt.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise UserError(f"the weights in {folder} do not match its config.json: {e}") from None
    if model.block_size < config.block_size:
        gpt.crop_block_size(model.block_size)
    elif model.block_size > config.block_size:
        log.info(f"{init_from} has {config.block_size} positions: model.block_size={model.block_size} is not used")
    return gpt


def _download(name: str) -> Path:
    """The Hub's copy of OpenAI's weights, fetched once into the Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise UserError(f"init_from={name} needs Hugging Face's libraries: {HF_EXTRA}") from None
    try:
        # safetensors only: the repositories also hold TF, Flax, ONNX and pickled copies
        return Path(snapshot_download(name, allow_patterns=["config.json", "model.safetensors"]))
    except LocalEntryNotFoundError:
        raise UserError(
            f"init_from={name}: no network and no copy in the Hugging Face cache. On a machine with internet run "
            f"`hf download openai-community/{name} config.json model.safetensors --local-dir {name}`, copy that "
            f"folder here and pass init_from=/path/to/{name}; or copy a Hugging Face cache holding models--{name} "
            f"(as from_pretrained({name!r}) leaves it) to ~/.cache/huggingface/hub or $HF_HUB_CACHE"
        ) from None


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """Our GPTConfig of a Hugging Face GPT-2 config.json; anything GPT-2's code would compute
    differently from ours is refused."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{source} describes a {hf['model_type']} model: only GPT-2-shaped models load")
    c = HF_DEFAULTS | hf
    refusals = {
        "activation_function": c["activation_function"] not in ACTIVATIONS,
        "n_inner": c["n_inner"] not in (None, 4 * c["n_embd"]),
        "layer_norm_epsilon": abs(c["layer_norm_epsilon"] - 1e-5) > 1e-12,
        "scale_attn_weights": not c["scale_attn_weights"],
        "scale_attn_by_inverse_layer_idx": c["scale_attn_by_inverse_layer_idx"],
        "add_cross_attention": c["add_cross_attention"],
    }
    bad = [f"{k}={c[k]!r}" for k, refused in refusals.items() if refused]
    if bad:
        raise UserError(f"{source}: {', '.join(bad)} has no equivalent in nanogpt's GPT")
    return GPTConfig(
        block_size=c["n_positions"],
        vocab_size=c["vocab_size"],
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        n_embd=c["n_embd"],
        bias=True,  # Hugging Face's GPT-2 always has biases (an export of a bias-free run holds zeros)
        activation=ACTIVATIONS[c["activation_function"]],
        tie_embeddings=c["tie_word_embeddings"],
    )


def not_in_gpt2(config: GPTConfig) -> list[str]:
    """The settings of a model that Hugging Face's GPT-2 cannot express."""
    return [f"model.{k}={getattr(config, k)!r}" for k, value in GPT2_FIXED.items() if getattr(config, k) != value]


def _check_settings(model: GPTConfig, loaded: GPTConfig, init_from: str) -> None:
    """Refuse architecture settings the run asks for that the weights do not have; the defaults
    (as in model=gpt2_small) mean "whatever the weights are"."""
    defaults = GPTConfig()
    asked = [
        f"model.{k}={getattr(model, k)!r} (the weights have {getattr(loaded, k)!r})"
        for k in ARCHITECTURE
        if getattr(model, k) != getattr(defaults, k) and getattr(model, k) != getattr(loaded, k)
    ]
    if asked:
        raise UserError(
            f"init_from={init_from}: {', '.join(asked)}: the architecture comes from the weights; only model.dropout "
            "and a shorter model.block_size apply. Drop those settings (e.g. model=gpt2_small)"
        )


def read_weights(folder: Path, file: Path | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face folder: model.safetensors (or its shards), else pytorch_model.bin."""
    index = folder / "model.safetensors.index.json"
    if file is None and (folder / "model.safetensors").is_file():
        file = folder / "model.safetensors"
    if file is None and index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_weights(folder, folder / shard).items()}
    if file is None and (folder / "pytorch_model.bin").is_file():
        file = folder / "pytorch_model.bin"
    if file is None:
        raise UserError(f"{folder} has a config.json but no model.safetensors or pytorch_model.bin")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"reading {file} needs safetensors: {HF_EXTRA}") from None
        return load_file(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)  # a pickle: never run its code
    except Exception as e:
        reason = type(e).__name__
        raise UserError(f"cannot load {file} as plain tensors ({reason}): convert it to safetensors") from None


def conv1d_weights(model: GPT) -> set[str]:
    """Our weights that Hugging Face's GPT-2 stores transposed: every Linear but the LM head."""
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def from_hf_state_dict(hf: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensor names and layout -> ours, for model.load_state_dict."""
    transposed = conv1d_weights(model)
    out = {}
    for key, t in hf.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older files, not weights
        if key != "lm_head.weight" and not key.startswith("transformer."):
            key = "transformer." + key  # GPT2Model files (as OpenAI's on the Hub) lack the prefix
        out[key] = t.t() if key in transposed else t
    if model.config.tie_embeddings and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]  # one tensor; a stored copy is ignored
    return out
