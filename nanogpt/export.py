"""A run as a Hugging Face GPT-2 folder, which `transformers.GPT2LMHeadModel.from_pretrained` opens.

    python -m nanogpt.export <run folder | checkpoint> <out folder> [--weights ema]

Writes config.json, model.safetensors and the run's tokenizer: GPT-2's own files (vocab.json,
merges.txt) for the GPT-2 BPE, a tokenizer.json for a BPE trained on the data (data.tokenizer=bpe),
both read by `AutoTokenizer` with the ids the run used; a character vocabulary has none. A nanoGPT
checkpoint records no vocabulary: one of GPT-2's size is taken as GPT-2's BPE (as sample.py does). The run's best.pt is taken when there is one, else ckpt.pt.
A run without biases exports zero biases (Hugging Face's GPT-2 always has them); settings GPT-2
cannot express (rotary positions, RMSNorm, QK-norm, logit soft-capping) are refused. A muP run
is exported with its multipliers folded into the weights (GPT.as_sp): the same logits.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from nanogpt.checkpoint import checkpoint_model
from nanogpt.errors import UserError
from nanogpt.model import GPT
from nanogpt.pretrained import HF_ACTIVATION, HF_EXTRA, conv1d_weights, not_in_gpt2
from nanogpt.targets import NotTrusted
from nanogpt.tokenizer import EOT
# tiktoken's gpt2 encoding is built from OpenAI's original GPT-2 files, which are exactly
# Hugging Face's vocab.json and merges.txt; tiktoken caches them (TIKTOKEN_CACHE_DIR) by URL
GPT2_BPE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {  # file name here: (file name there, its sha256 as tiktoken checks it)
    "vocab.json": ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
GPT2_EOT = 50256  # <|endoftext|>


def hf_config(model: GPT, eot: int | None) -> dict:
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,  # as trained: 50304 for a padded GPT-2 vocabulary
        "n_positions": c.block_size,
        "n_ctx": c.block_size,  # older readers take the context from here
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": HF_ACTIVATION[c.activation],
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": 1e-5,  # torch's LayerNorm default, which ours use
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our tensors under Hugging Face's names and layout: Conv1D weights transposed, zeros for the
    biases a bias-free model lacks, the LM head only when it is not tied to the token embedding."""
    transposed = conv1d_weights(model)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and name != "lm_head":
            w = module.weight.detach()
            out[f"{name}.weight"] = w.t() if f"{name}.weight" in transposed else w
            bias = module.bias.detach() if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            out[f"{name}.bias"] = bias
    out["transformer.wte.weight"] = model.transformer.wte.weight.detach()
    out["transformer.wpe.weight"] = model.transformer.wpe.weight.detach()
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight.detach()
    return {k: v.contiguous() for k, v in out.items()}


def gpt2_tokenizer_files(block_size: int) -> dict[str, bytes]:
    """GPT-2's tokenizer as Hugging Face reads it: OpenAI's own files, from tiktoken's cache."""
    import tiktoken.load  # reads TIKTOKEN_CACHE_DIR, or downloads on first use

    files = {}
    for name, (source, sha256) in GPT2_FILES.items():
        try:
            files[name] = tiktoken.load.read_file_cached(GPT2_BPE + source, sha256)
        except Exception as e:  # no network and no cached copy
            raise UserError(
                f"could not get GPT-2's tokenizer file {source} ({type(e).__name__}): "
                "offline, point TIKTOKEN_CACHE_DIR at tiktoken's cache, as for preparing the data"
            ) from None
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size}
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return files


def trained_tokenizer_files(meta: dict, block_size: int) -> dict[str, bytes]:
    """A BPE trained on the data (tiktoken ranks) as a Hugging Face fast tokenizer, converted by
    transformers' own tiktoken converter."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        raise UserError(f"exporting a trained tokenizer needs transformers: {HF_EXTRA}") from None
    with tempfile.TemporaryDirectory() as tmp:
        ranks = Path(tmp) / "ranks.tiktoken"
        ranks.write_text(meta["ranks"])
        converted = TikTokenConverter(vocab_file=str(ranks), pattern=meta["pattern"], extra_special_tokens=[EOT]).converted()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=EOT, eos_token=EOT, model_max_length=block_size)
        tokenizer.save_pretrained(Path(tmp) / "out")
        return {f.name: f.read_bytes() for f in (Path(tmp) / "out").iterdir()}


def export(run: Path, out: Path, weights: str = "raw") -> tuple[list[str], str | None]:
    """Write the run's model (weights="ema": with the EMA of its weights) into out as a Hugging
    Face GPT-2 folder; return the files written and, when no tokenizer files are among them, why."""
    try:
        model, meta = checkpoint_model(Path(run), weights)  # nanogpt's GPT only: another class has no GPT-2 form
    except NotTrusted as e:
        raise UserError(f"cannot export {run} as GPT-2: its model is {e.target}, not nanogpt's GPT") from None
    model = model.as_sp()  # muP's multipliers folded into the weights: GPT-2 has none
    bad = not_in_gpt2(model.config)
    if bad:
        raise UserError(f"cannot export {run} as GPT-2: {', '.join(bad)} has no equivalent in GPT-2's format")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(f"export needs safetensors: {HF_EXTRA}") from None

    tokenizer, note = vocabulary(meta, model.config.vocab_size, run)
    eot = GPT2_EOT if tokenizer == "gpt2" else meta["vocab_size"] - 1 if tokenizer == "bpe" else None
    files = {"config.json": (json.dumps(hf_config(model, eot), indent=2) + "\n").encode()}
    if tokenizer == "gpt2":
        files |= gpt2_tokenizer_files(model.config.block_size)  # before writing anything: it may fail offline
    elif tokenizer == "bpe":
        files |= trained_tokenizer_files(meta, model.config.block_size)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_bytes(content)
    save_file(hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})  # transformers wants "pt"
    return [*files, "model.safetensors"], note


def vocabulary(meta: dict | None, vocab_size: int, run: Path) -> tuple[str | None, str | None]:
    """The tokenizer to export (gpt2, bpe, or None), and why there is none. A checkpoint that
    records no vocabulary (nanoGPT's) is read as GPT-2's BPE, as sample.py and the eval command
    read it, when its model is that large; a smaller one had a vocabulary kept elsewhere."""
    if meta is None:
        if vocab_size >= GPT2_EOT + 1:
            return "gpt2", None
        return None, (f"no tokenizer files: {run} does not record its vocabulary, and {vocab_size} tokens are not "
                      "GPT-2's (nanoGPT keeps a character vocabulary in its data folder's meta.pkl)")
    if meta.get("tokenizer") in ("gpt2", "bpe"):
        return meta["tokenizer"], None
    return None, "no tokenizer files: the run's vocabulary is characters"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder (its best.pt, else ckpt.pt) or a checkpoint file")
    parser.add_argument("out", type=Path, help="the folder to write; created if needed")
    parser.add_argument("--weights", choices=["raw", "ema"], default="raw",
                        help="the weights as trained (raw) or their EMA (a run trained with ema_decay > 0)")
    args = parser.parse_args(argv)
    try:
        written, note = export(args.run, args.out, args.weights)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {', '.join(written)} to {args.out}")
    if note:
        print(note)


if __name__ == "__main__":
    main()
