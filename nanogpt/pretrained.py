"""OpenAI's GPT-2 weights (through Hugging Face transformers) and the Hugging Face format."""

from nanogpt.config import ConfigError
from nanogpt.model import GPT, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def load_pretrained(init_from: str, model: GPTConfig) -> GPT:
    raise ConfigError(f"init_from={init_from!r}: choose scratch, resume, {', '.join(GPT2_NAMES)}, or a path")
