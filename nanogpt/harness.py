"""lm-evaluation-harness on this project's models: an lm-eval `LM` over any model `init_from`
reads (our runs, sharded runs, nanoGPT checkpoints, GPT-2), registered as the model `nanogpt`.

    python -m nanogpt.eval init_from=<run> eval=[lm_eval] eval.tasks.lm_eval.tasks=[hellaswag]
    python train.py eval=[lm_eval] eval.tasks.lm_eval.tasks=[arc_easy] eval.interval=500

    import lm_eval, nanogpt.harness                       # the import registers the model
    lm_eval.simple_evaluate(model="nanogpt", model_args="init_from=outputs/...", tasks=["hellaswag"])
    lm_eval.simple_evaluate(model=nanogpt.harness.NanoGPTLM.load("gpt2"), tasks=["arc_easy"])

Requests are tokenised as lm-eval's `TemplateLM` does (a context's trailing spaces move into the
continuation; an empty context starts from the end-of-text token) and cut from the left as its
Hugging Face backend cuts them, so log-likelihoods equal that backend's on the exported model.
They are scored by nanogpt/scoring.py: requests that share a context read it once.
"""

import math
from contextlib import nullcontext

import lm_eval.models  # noqa: F401  lm-eval's own models first: it registers them only into an empty registry
import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from torch.distributed.fsdp import FSDPModule

from nanogpt import distributed
from nanogpt.checkpoint import load_model, rng_state, set_rng_state
from nanogpt.device import autocast
from nanogpt.errors import UserError
from nanogpt.sampling import Sampling, generate
from nanogpt.scoring import Row, score_groups
from nanogpt.tasks import LmEvalTask
from nanogpt.tokenizer import EOT, Tokenizer, tokenizer_from_meta


@register_model("nanogpt")
class NanoGPTLM(TemplateLM):
    """lm-eval's view of one of our models: loglikelihood (through TemplateLM), its rolling form
    for perplexity tasks, and generate_until through the KV-cache sampler."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int = 16, autocast=None,
                 dist: distributed.DistInfo | None = None, device: torch.device | None = None):
        super().__init__()
        if tokenizer.eot_token is None:
            raise UserError("lm-eval's requests start from the end-of-text token, which the model's vocabulary "
                            "(characters) lacks")
        self.model, self.vocab, self.batch_size = model, tokenizer, int(batch_size)
        self.autocast = autocast or nullcontext()
        self.dist = dist or distributed.DistInfo()
        self._device = device or next(model.parameters()).device
        self._rank, self._world_size = self.dist.rank, self.dist.world_size

    @classmethod
    def load(cls, init_from: str, device: str = "cpu", batch_size: int | str = 16, dtype: str = "float32",
             max_batch_size: int | None = None) -> "NanoGPTLM":
        """A model as `init_from` names it (a run folder, a checkpoint, gpt2*, a Hugging Face
        folder) on `device`, scored under autocast to `dtype` (float32: none). lm-eval's
        batch_size=auto takes 16; max_batch_size is lm-eval's and unused."""
        model, meta = load_model(str(init_from))
        device = torch.device(device)
        batch = int(batch_size) if str(batch_size).isdigit() else 16
        return cls(model.to(device).eval(), tokenizer_from_meta(meta or {"tokenizer": "gpt2"}), batch,
                   autocast(device, getattr(torch, dtype)), device=device)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "NanoGPTLM":
        """`--model_args init_from=<run>[,device=cuda]` (lm-eval's own entry)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls.load(**simple_parse_args_string(arg_string), **extra)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "NanoGPTLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls.load(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int:
        return self.vocab.eot_token

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.vocab.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (strings, context tokens, continuation tokens): the
        tokens cut from the left to block_size + 1 as lm-eval's Hugging Face backend cuts them;
        requests with the same context tokens share it, unless cut."""
        rows: list[Row] = []
        groups: dict[object, list[int]] = {}
        for n, (_, context, continuation) in enumerate(requests):
            tokens = [*context, *continuation]
            drop = max(len(tokens) - (self.max_length + 1), 0)
            rows.append((tokens[drop:], max(len(context) - drop, 1)))
            groups.setdefault(tuple(context) if not drop else n, []).append(n)  # a cut row is alone
        members = list(groups.values())
        scored = score_groups(self.model, [[rows[n] for n in ns] for ns in members], self.batch_size, self.device,
                              self.autocast, self.dist)
        out: list[tuple[float, bool]] = [(math.nan, False)] * len(requests)
        for ns, scores in zip(members, scored):
            for n, s in zip(ns, scores):
                out[n] = (-s.loss, s.greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of the block, as lm-eval's backends take
        it (the first token predicted from the end-of-text token)."""
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued (greedy unless do_sample) up to max_gen_toks tokens, cut before
        the first of its `until` strings or the end-of-text token; one batch per setting."""
        if self.dist.world_size > 1 and isinstance(self.model, FSDPModule):
            raise UserError("lm-eval's generation tasks cannot run on a sharded (FSDP) model over several ranks: "
                            "evaluate the run with python -m nanogpt.eval on one rank")
        by_setting: dict[tuple, list[int]] = {}
        stops, prompts = [], []
        for n, (context, kwargs) in enumerate(req.args for req in requests):
            until = kwargs.get("until") or []
            stops.append([*([until] if isinstance(until, str) else until), EOT])
            prompts.append(self.tok_encode(context) or [self.eot_token_id])
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            by_setting.setdefault((int(kwargs.get("max_gen_toks", 256)), temperature), []).append(n)
        out = [""] * len(requests)
        for (max_new, temperature), ns in by_setting.items():
            for i in range(0, len(ns), self.batch_size):
                batch = ns[i : i + self.batch_size]
                texts = self._generate([prompts[n] for n in batch], [stops[n] for n in batch], max_new, temperature)
                for n, text in zip(batch, texts):
                    out[n] = text
        return out

    def _generate(self, prompts: list[list[int]], stops: list[list[str]], max_new: int, temperature: float) -> list[str]:
        """Each prompt's new text, decoded as one batch, cut before the first of its stop strings."""
        new_text = lambda row: self.vocab.decode(row.tokens[len(prompts[row.prompt]) :])  # noqa: E731
        stopped = lambda row: any(s in new_text(row) for s in stops[row.prompt])  # noqa: E731
        with self.autocast:
            rows = generate(self.model, prompts, 1, max_new, Sampling(temperature), stopped)
        out = []
        for row in rows:  # one a prompt, in order
            text = new_text(row)
            for s in stops[row.prompt]:
                text = text.split(s)[0]
            out.append(text)
        return out

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.dist.enabled:
            return tensor.reshape(1)
        parts = [torch.empty_like(tensor) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts).reshape(-1)

    def gather_object(self, obj, dst: int = 0):
        return distributed.gather_objects(obj, self.dist) if self.dist.enabled else [obj]

    def barrier(self) -> None:
        if self.dist.enabled:
            torch.distributed.barrier()


def evaluate(task: LmEvalTask, model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int, device: torch.device,
             ctx, dist: distributed.DistInfo) -> dict[str, float]:
    """lm-eval's scores of the task's tasks, named <name>/<task>/<metric> (a metric that went
    through a filter other than lm-eval's `none`: <metric>,<filter>, as lm-eval spells it).
    lm-eval seeds the global random generators: theirs are put back, so training goes on as it would."""
    c = task.config
    lm = NanoGPTLM(model, tokenizer, batch_size, ctx, dist, device)
    saved = rng_state()
    try:
        results = simple_evaluate(model=lm, tasks=list(c.tasks), task_manager=task.manager, limit=c.limit,
                                  num_fewshot=c.num_fewshot, bootstrap_iters=0, log_samples=False)
    finally:
        set_rng_state(saved)
    scores = {}
    for name, metrics in (results or {}).get("results", {}).items():  # rank 0 has them
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if kind and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                scores[f"{task.name}/{name}/{metric if kind == 'none' else key}"] = float(value)
    return distributed.broadcast_object(scores, dist)
