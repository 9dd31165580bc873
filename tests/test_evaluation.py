"""Capability evaluation: HellaSwag-style scoring checked against a plain one-example-at-a-time
computation, bits per byte against a hand computation, the download path against a local HTTP
server, and the evaluations inside training, resumed, across ranks and in the eval command."""

import csv
import functools
import http.server
import json
import math
import random
import subprocess
import sys
import threading
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import yaml
from jinja2 import Template

from conftest import ROOT, TINY, run_script, write_core_bundle
from nanogpt.config import ChoiceTaskConfig, CoreConfig
from nanogpt.distributed import DistInfo
from nanogpt.errors import UserError
from nanogpt.evaluation import bits_per_byte, core, multiple_choice, render_all
from nanogpt.model import GPT, GPTConfig
from nanogpt.rundir import read_metrics
from nanogpt.scoring import score_groups
from nanogpt.shards import TokenStream, write_shard
from nanogpt.tasks import ChoiceTask, CoreTask
from nanogpt.tokenizer import CharTokenizer, TiktokenTokenizer

# rows in the official HellaSwag layout (ctx, endings, label, and keys the scorer ignores)
HELLASWAG_ROWS = [
    {"ind": 4, "activity_label": "Theatre", "ctx_a": "ROMEO: I love thee", "ctx_b": "", "ctx": "ROMEO: I love thee",
     "endings": ["and my heart is thine.", "the river ran dry.", "with all my soul, fair Juliet.", "four."], "label": 2,
     "split": "val"},
    {"ctx": "JULIET: O Romeo, Romeo!", "endings": ["wherefore art thou Romeo?", "to the market.", "x", "a b c d e f g"],
     "label": 0},
    {"ctx": "First Citizen: Before we proceed any further, hear me speak.",
     "endings": ["All: Speak, speak.", "The cat sat on the mat.", "Speak!", "no"], "label": 0},
    {"ctx": "KING: What news from the north?", "endings": ["The armies gather, my lord.", "Blue.", "It rains.", "Yes"],
     "label": 0},
    {"ctx": "LADY: Good night, good night!", "endings": ["Parting is such sweet sorrow.", "Mmm.", "ok", "The end."],
     "label": 0},
]
TEXT = "ROMEO: I love thee, and my heart is thine. JULIET: O Romeo, Romeo! wherefore art thou Romeo? " * 3


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def hellaswag_file(tmp_path):
    return write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG_ROWS)


@functools.cache
def trained_gpt2_model(block_size: int = 64) -> GPT:
    """A tiny GPT-2-vocabulary model after a few steps on a text like the fixture's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, block_size=block_size, n_layer=2, n_head=2, n_embd=32, bias=False))
    tokens = torch.tensor(TiktokenTokenizer("gpt2").encode(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        starts = torch.randint(0, len(tokens) - block_size - 1, (4,))
        w = torch.stack([tokens[s : s + block_size + 1] for s in starts])
        _, loss = model(w[:, :-1], w[:, 1:].contiguous())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def reference_scores(model, tokenizer, ctx: str, ending: str, block_size: int) -> tuple[float, float]:
    """One example's ending alone, as written out by hand: summed and mean loss of its tokens."""
    context, choice = tokenizer.encode(ctx), tokenizer.encode(" " + ending)
    tokens = torch.tensor(context + choice)[-(block_size + 1):]  # cut from the left, as a block allows
    n_choice = min(len(choice), len(tokens) - 1)
    with torch.no_grad():
        logits, _ = model(tokens[None, :-1], tokens[None, 1:])
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    nll = -logp[torch.arange(len(tokens) - 1), tokens[1:]]
    ending_nll = nll[-n_choice:]
    return ending_nll.sum().item(), ending_nll.mean().item()


def score(model, file, tokenizer, block_size, batch_size, **task):
    t = ChoiceTask(ChoiceTaskConfig(path=str(file), format=task.pop("format", "hellaswag"), **task), "hs", "/nonexistent")
    rendered = render_all(t, tokenizer, block_size)
    return multiple_choice(model, rendered, batch_size, torch.device("cpu"), nullcontext(), DistInfo())


@pytest.mark.parametrize("block_size", [64, 12])  # 12: every example cut from the left
def test_choice_scores_equal_a_one_at_a_time_computation(hellaswag_file, block_size):
    tok = TiktokenTokenizer("gpt2")
    model = trained_gpt2_model()
    model64 = GPT(GPTConfig(**vars(model.config)))
    model64.load_state_dict(model.state_dict())
    model64.double()
    batched = score(model64, hellaswag_file, tok, block_size, batch_size=7)
    single = score(model64, hellaswag_file, tok, block_size, batch_size=1)
    correct = correct_norm = 0
    for i, row in enumerate(HELLASWAG_ROWS):
        ref = [reference_scores(model64, tok, row["ctx"], e, block_size) for e in row["endings"]]
        ours = batched.scores[i]
        for (ref_sum, ref_mean), (our_sum, n), (one_sum, _) in zip(ref, ours, single.scores[i]):
            assert our_sum == pytest.approx(ref_sum, abs=1e-9)
            assert our_sum / n == pytest.approx(ref_mean, abs=1e-9)
            assert one_sum == pytest.approx(our_sum, abs=1e-9)  # batch size 1 and batched
        sums, means = [s for s, _ in ref], [m for _, m in ref]
        correct += sums.index(min(sums)) == row["label"]
        correct_norm += means.index(min(means)) == row["label"]
    n = len(HELLASWAG_ROWS)
    assert (batched.examples, batched.skipped) == (n, 0)
    assert batched.cut == (n if block_size == 12 else 0)
    assert batched.metrics("hs") == {"hs/acc": correct / n, "hs/acc_norm": correct_norm / n}

    fp32 = score(model, hellaswag_file, tok, block_size, batch_size=3)  # the chosen endings hold in fp32
    assert (fp32.correct, fp32.correct_norm) == (batched.correct, batched.correct_norm)
    for i in range(n):
        chosen = lambda scores: min(range(4), key=lambda j: scores[j][0])  # noqa: E731
        assert chosen(fp32.scores[i]) == chosen(batched.scores[i])


def test_a_character_vocabulary_skips_examples_it_cannot_spell(tmp_path):
    chars = sorted(set(TEXT + "".join(r["ctx"] + "".join(r["endings"]) for r in HELLASWAG_ROWS[:2])))
    tok = CharTokenizer("".join(chars))
    rows = [{"context": r["ctx"], "choices": r["endings"], "label": r["label"]} for r in HELLASWAG_ROWS[:2]]
    rows.append({"context": "Café society", "choices": ["yes", "no"], "label": 0})  # é: not in the vocabulary
    file = write_jsonl(tmp_path / "task.jsonl", rows)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    result = score(model, file, tok, 64, 4, format="choices")
    assert (result.examples, result.skipped) == (2, 1)
    ref = reference_scores(model, tok, rows[0]["context"], rows[0]["choices"][1], 64)
    assert result.scores[0][1][0] == pytest.approx(ref[0], rel=1e-5)  # " " + choice, one token a character


def test_fewshot_examples_come_before_the_context(tmp_path):
    rows = [{"context": f"Q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(5)]
    rows[0]["fewshot"] = [{"context": "Shown", "choices": ["no", "yes"], "label": 1}]
    task = ChoiceTask(ChoiceTaskConfig(path=str(write_jsonl(tmp_path / "t.jsonl", rows)), fewshot=2,
                                       fewshot_separator="|"), "t", "/nonexistent")
    examples = task.examples()
    tok = CharTokenizer("".join(sorted(set("Q0123456789abShownoyes |"))))
    assert tok.decode(task.render(examples[0], tok, 64).rows[1].tolist()) == "Shown yes|Q0 b"  # the row's own
    others = examples[3].fewshot
    assert len(others) == 2 and all(o.context != "Q3" for o in others)
    assert [o.context for o in task.examples()[3].fewshot] == [o.context for o in others]  # the same every time


def write_stream(path, tokens: list[int]) -> TokenStream:
    fp = bytes(32)
    write_shard(path, np.asarray(tokens, dtype=np.uint16), np.array([0]), fp)
    return TokenStream([path], fp)


def test_bits_per_byte_equals_a_hand_computation(tmp_path):
    tok = TiktokenTokenizer("gpt2")
    tokens = tok.encode(TEXT + "<|endoftext|>" + TEXT[:50])
    stream = write_stream(tmp_path / "val.bin", tokens)
    model = GPT(GPTConfig(**vars(trained_gpt2_model().config)))
    model.load_state_dict(trained_gpt2_model().state_dict())
    model.double()
    block = 16
    token_bytes = torch.from_numpy(np.pad(tok.token_bytes(), (0, 50304 - tok.vocab_size)))
    bpb, scored = bits_per_byte(model, stream, token_bytes, 10**6, block, 3, torch.device("cpu"), nullcontext(), DistInfo())

    nats = nbytes = counted = 0
    for start in range(0, len(tokens) - block, block):  # windows of block + 1 tokens, each token predicted once
        w = torch.tensor(tokens[start : start + block + 1])
        with torch.no_grad():
            logits, _ = model(w[None, :-1], w[None, 1:])
        logp = torch.log_softmax(logits[0], dim=-1)
        for t in range(block):
            target = int(w[t + 1])
            if target == tok.eot_token:  # <|endoftext|> stands for no bytes: it counts in neither sum
                continue
            nats -= logp[t, target].item()
            nbytes += len(tok.enc.decode_single_token_bytes(target))
            counted += 1
    assert scored == counted
    assert bpb == pytest.approx(nats / (math.log(2) * nbytes), abs=1e-9)


class Server:
    """A local HTTP server for one folder: the download path without a network."""

    def __init__(self, folder):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self):
        self.httpd.shutdown()


def test_a_task_file_is_downloaded_once_and_checked(tmp_path, hellaswag_file, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = Server(hellaswag_file.parent)
    try:
        url = f"{server.url}/{hellaswag_file.name}"
        blob = subprocess.run(["git", "hash-object", str(hellaswag_file)], capture_output=True, text=True, check=True)
        task = ChoiceTask(ChoiceTaskConfig(url=url, checksum=f"git-sha1:{blob.stdout.strip()}", format="hellaswag"),
                          "hellaswag", str(tmp_path / "cache"))
        assert task.fetch().read_bytes() == hellaswag_file.read_bytes()
        assert len(task.examples()) == len(HELLASWAG_ROWS)

        bad = ChoiceTask(ChoiceTaskConfig(url=url, checksum="sha256:" + "0" * 64), "other", str(tmp_path / "cache"))
        with pytest.raises(UserError, match="checksum mismatch.*eval.tasks.other.path="):
            bad.fetch()
        assert not any((tmp_path / "cache" / "other").iterdir())  # nothing half-checked left behind
        missing = ChoiceTask(ChoiceTaskConfig(url=f"{server.url}/nothing.jsonl"), "gone", str(tmp_path / "cache"))
        with pytest.raises(UserError, match="cannot download"):
            missing.fetch()
    finally:
        server.close()


def test_a_missing_task_file_stops_training_before_iteration_0(train_run, tmp_path):
    proc = train_run("eval=[hellaswag]", "eval.interval=5", f"eval.cache_dir={tmp_path}/cache",
                     "eval.tasks.hellaswag.url=http://127.0.0.1:9/hellaswag_val.jsonl", check=False)
    assert proc.returncode == 2
    assert "set eval.tasks.hellaswag.path=<file>" in proc.stderr
    assert "iter 1" not in proc.stdout


GOOD = {"context": "Q", "choices": ["a", "b"], "label": 1}
BROKEN_TASK_FILES = {  # the lines of a task file, one of them broken; the message expected about it
    "malformed line": ([GOOD, GOOD, '{"context": "Q", "choices": ["a", "b"], "lab', GOOD], ":3: not JSON ("),
    "not an object": ([GOOD, '["Q", ["a", "b"], 1]'], ":2: a JSON list, not an object"),
    "missing key": ([GOOD, {"context": "Q", "choices": ["a", "b"]}], ":2: no 'label' key"),
    "label outside the choices": ([{**GOOD, "label": 2}], ":1: label 2 is not one of the 2 choices"),
    "label not an index": ([{**GOOD, "label": True}], ":1: label True is not the index of a choice"),
    "empty choice": ([GOOD, GOOD, {**GOOD, "choices": ["a", ""]}], ":3: choices[1] is an empty string"),
    "one choice": ([{**GOOD, "choices": ["a"], "label": 0}], ":1: choices is not a list of at least two strings"),
    "empty context": ([{**GOOD, "context": ""}], ":1: an empty context and no few-shot examples"),
    "broken few-shot example": ([{**GOOD, "fewshot": [{**GOOD, "label": 5}]}], ":1: label 5 is not one of"),
    "empty file": (["", "  "], ": no examples: a task file holds one JSON object a line"),
    "few-shot example not an object": ([{**GOOD, "fewshot": ["Q a"]}], ":1: a JSON str where an example belongs"),
}


@pytest.mark.parametrize("case", list(BROKEN_TASK_FILES))
def test_a_broken_task_file_is_one_line_naming_the_file_and_line(tmp_path, case):
    lines, expected = BROKEN_TASK_FILES[case]
    file = tmp_path / "task.jsonl"
    file.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    task = ChoiceTask(ChoiceTaskConfig(path=str(file)), "mine", "/nonexistent")
    with pytest.raises(UserError) as e:
        render_all(task, TiktokenTokenizer("gpt2"), 64)
    assert str(e.value).startswith(f"{file}{expected}") and "\n" not in str(e.value), str(e.value)


def test_a_task_none_of_whose_examples_a_vocabulary_spells_is_refused(tmp_path, hellaswag_file):
    task = ChoiceTask(ChoiceTaskConfig(path=str(hellaswag_file), format="hellaswag"), "hs", "/nonexistent")
    with pytest.raises(UserError, match=rf"eval task hs: none of the 5 examples of {hellaswag_file} can be encoded"):
        render_all(task, CharTokenizer("abc "), 64)


def test_a_broken_task_file_stops_training_before_iteration_0(train_run, tmp_path, hellaswag_file):
    """The whole path, as a user meets it: HellaSwag's file with one row cut short, one line."""
    rows = hellaswag_file.read_text().splitlines()
    hellaswag_file.write_text("\n".join([*rows[:3], rows[3][:40], *rows[4:]]) + "\n")
    proc = train_run("eval=[hellaswag]", "eval.interval=5", f"eval.tasks.hellaswag.path={hellaswag_file}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {hellaswag_file}:4: not JSON (Unterminated string"), line
    assert "iter 1" not in proc.stdout


def test_the_eval_and_prepare_commands_have_help_pages_of_their_own():
    """--help prints the composed hydra.help.template: each command's, not train.py's."""
    from hydra import compose, initialize_config_dir

    for config_name, first_line in [("evaluate", "python -m nanogpt.eval init_from="),
                                    ("prepare", "python -m nanogpt.prepare data=")]:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name=config_name, return_hydra_config=True)
        assert cfg.hydra.help.template.startswith(first_line), cfg.hydra.help.template[:200]
        assert "$CONFIG" in cfg.hydra.help.template  # the keys, as composed
    assert cfg.hydra.output_subdir is None and cfg.hydra.run.dir == "."  # prepare writes no run folder


def test_sharing_a_context_changes_no_score(hellaswag_file):
    """Rows scored on top of their group's cached context equal each row scored alone (fp32,
    1e-5), whatever the chunking: groups larger than a batch, rows alone, prefixes near the block."""
    tok, model = TiktokenTokenizer("gpt2"), trained_gpt2_model()
    rng = random.Random(0)
    encoded = tok.encode(TEXT)
    groups = []
    for g in range(9):
        context = encoded[: rng.randrange(1, 50)] if g % 3 else encoded[:62]  # some leave no room but the choice
        groups.append([(context + encoded[s : s + rng.randrange(1, 64 - len(context) + 1)], len(context))
                       for s in rng.sample(range(len(encoded) - 64), rng.randrange(1, 7))])
    groups.append([(encoded[:20], 1)])  # scored from its second token: nothing to share
    shared = score_groups(model, groups, 4, torch.device("cpu"), nullcontext(), DistInfo())
    for rows, scores in zip(groups, shared):
        for (tokens, start), s in zip(rows, scores):
            x = torch.tensor(tokens)
            with torch.no_grad():
                logits, _ = model(x[None, :-1], x[None, 1:])
            logp = torch.log_softmax(logits[0].float(), -1)[start - 1 :]
            alone = -logp.gather(1, x[start:, None]).double().sum().item()
            assert s.loss == pytest.approx(alone, abs=1e-5) and s.tokens == len(tokens) - start
            assert s.greedy == bool((logp.argmax(-1) == x[start:]).all())


# nanochat/core_eval.py's prompt templates, as it writes them: the reference below renders with them
NANOCHAT_TEMPLATES = {
    "multiple_choice": """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip(),
    "schema": """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip(),
    "language_modeling": """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip(),
}


def nanochat_core(model, enc, bundle, max_seq_len: int, max_per_task: int):
    """CORE by nanochat's rules, written out with plain PyTorch, one example at a time: its files,
    shuffle, few-shot draw, templates, token spans, left crop, forward and decisions."""
    spec = yaml.safe_load((bundle / "core.yaml").read_text())
    with open(bundle / "eval_meta_data.csv") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    decisions, centered = {}, {}
    for task in spec["icl_tasks"]:
        kind, k, delim = task["icl_task_type"], task["num_fewshot"][0], task.get("continuation_delimiter", " ")
        data = [json.loads(line) for line in (bundle / "eval_data" / task["dataset_uri"]).read_text().splitlines()]
        random.Random(1337).shuffle(data)
        data = data[:max_per_task]
        template, picks = Template(NANOCHAT_TEMPLATES[kind]), []
        for idx, item in enumerate(data):
            shots = [data[i] for i in random.Random(1234 + idx).sample([i for i in range(len(data)) if i != idx], k)] if k else []
            args = {"fewshot_examples": shots, "continuation_delimiter": delim, "item": item}
            if kind == "multiple_choice":
                prompts = [template.render(choice=c, **args) for c in item["choices"]]
            elif kind == "schema":
                prompts = [template.render(context=c, **args) for c in item["context_options"]]
            else:
                prompts = [template.render(include_continuation=False, **args).strip(),
                           template.render(include_continuation=True, **args)]
            tokens = [[enc.eot_token] + enc.encode_ordinary(p) for p in prompts]
            if kind == "multiple_choice":
                n = next((i for i in range(min(map(len, tokens))) if len({t[i] for t in tokens}) > 1), min(map(len, tokens)))
                spans = [(n, len(t)) for t in tokens]
            elif kind == "schema":
                n = next((i for i in range(min(map(len, tokens))) if len({t[-1 - i] for t in tokens}) > 1), min(map(len, tokens)))
                spans = [(len(t) - n, len(t)) for t in tokens]
            else:
                assert tokens[1][: len(tokens[0])] == tokens[0]
                spans, tokens = [(len(tokens[0]), len(tokens[1]))], tokens[1:]
            crop = [max(len(t) - max_seq_len, 0) for t in tokens]
            tokens = [t[c:] for t, c in zip(tokens, crop)]
            spans = [(s - c, e - c) for (s, e), c in zip(spans, crop)]
            ids = torch.full((len(tokens), max(map(len, tokens))), enc.eot_token)  # padded with BOS, as nanochat
            for i, t in enumerate(tokens):
                ids[i, : len(t)] = torch.tensor(t)
            with torch.no_grad():
                logits, _ = model(ids, torch.roll(ids, -1, 1))
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.roll(ids, -1, 1).flatten(),
                                                       reduction="none").view_as(ids)
            if kind == "language_modeling":
                (s, e), = spans
                picks.append(bool((logits.argmax(-1)[0, s - 1 : e - 1] == ids[0, s:e]).all()))
                correct = picks[-1]
            else:
                means = [losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(spans)]
                picks.append(means.index(min(means)))
                correct = picks[-1] == item["gold"]
            decisions.setdefault(task["label"], []).append(correct)
        accuracy = sum(decisions[task["label"]]) / len(data)
        chance = 0.01 * baselines[task["label"]]
        centered[task["label"]] = (accuracy - chance) / (1 - chance)
        decisions[task["label"]] = picks
    return decisions, centered, sum(centered.values()) / len(centered)


def core_fixture_tasks(model, enc) -> dict:
    """One CORE task of each type on Shakespeare's lines; the language-modelling rows include
    continuations the model gets right (its own greedy next word) and ones it gets wrong."""
    words = TEXT.split()
    mc = [{"query": " ".join(words[i : i + 5]) + ":", "choices": [words[i + 5], words[i + 9], "a fish", "the end"],
           "gold": i % 4} for i in range(9)]
    mc.insert(0, {"query": " ".join(words * 2), "choices": ["yes", "no"], "gold": 1})  # longer than the block: cut
    schema = [{"context_options": [" ".join(words[i : i + 4]), " ".join(words[i + 7 : i + 10])],
               "continuation": " ".join(words[i + 4 : i + 7]), "gold": i % 2} for i in range(7)]
    lm = []
    for i in range(6):
        context = " ".join(words[i : i + 6]) + ("  " if i % 2 else "")  # trailing spaces: trimmed by the template
        with torch.no_grad():
            logits, _ = model(torch.tensor([[enc.eot_token] + enc.encode_ordinary(context.strip())]))
        greedy = enc.decode([int(logits[0, -1].argmax())])
        right = greedy.startswith(" ") and greedy[1:].isalpha() and i % 3 != 2
        lm.append({"context": context, "continuation": greedy[1:] if right else words[i + 8]})
    return {"mc_two_shot": {"kind": "multiple_choice", "fewshot": 2, "baseline": 25.0, "rows": mc},
            "schema_one_shot": {"kind": "schema", "fewshot": 1, "baseline": 50.0, "rows": schema},
            "lm_zero_shot": {"kind": "language_modeling", "fewshot": 0, "baseline": 0.0, "rows": lm, "delimiter": " "}}


def test_core_equals_nanochats_rules_one_example_at_a_time(tmp_path):
    tok, trained = TiktokenTokenizer("gpt2"), trained_gpt2_model()
    model = GPT(GPTConfig(**vars(trained.config)))
    model.load_state_dict(trained.state_dict())
    model.double().eval()
    bundle = write_core_bundle(tmp_path / "eval_bundle", core_fixture_tasks(model, tok.enc))
    task = CoreTask(CoreConfig(path=str(bundle), limit=9), "core", "/nonexistent")  # 9: one of mc's 10 rows left out
    subtasks = task.subtasks()
    rendered = [task.render(sub, tok, 64) for sub in subtasks]
    result = core(model, subtasks, rendered, 5, torch.device("cpu"), nullcontext(), DistInfo())
    decisions, centered, core_score = nanochat_core(model, tok.enc, bundle, 64, 9)

    assert {label: list(picked.values()) for label, picked in result.picked.items()} == decisions
    assert result.centered == pytest.approx(centered, abs=1e-12)
    assert result.metrics("core")["core"] == pytest.approx(core_score, abs=1e-12)
    assert {sub.label: len(sub.rows) for sub in subtasks} == {"mc_two_shot": 9, "schema_one_shot": 7, "lm_zero_shot": 6}
    assert True in decisions["lm_zero_shot"] and False in decisions["lm_zero_shot"]  # the rule is exercised both ways
    assert result.counts["mc_two_shot"]["cut"] >= 1  # the long row (and its few-shot neighbours) cut to the block


GOOD_CORE = {"mc": {"kind": "multiple_choice", "fewshot": 0, "baseline": 25.0,
                    "rows": [{"query": "Q", "choices": ["a", "b"], "gold": 1}] * 3}}


def break_bundle(bundle, case: str) -> str:
    """Break a good bundle one way; the start of the one line expected about it."""
    task_file = bundle / "eval_data" / "mine" / "mc.jsonl"
    if case == "missing task file":
        task_file.unlink()
        return f"{bundle / 'core.yaml'}: task mc: no file {task_file}"
    if case == "gold outside the choices":
        task_file.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 1}\n{"query": "Q", "choices": ["a", "b"], "gold": 2}\n')
        return f"{task_file}:2: gold 2 is not one of the 2 choices (0 to 1); a row is"
    if case == "no baseline":
        (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nother,25\n")
        return f"{bundle / 'eval_meta_data.csv'}: no row for task mc"
    if case == "unknown task type":
        (bundle / "core.yaml").write_text((bundle / "core.yaml").read_text().replace("multiple_choice", "ranking"))
        return f"{bundle / 'core.yaml'}: icl_tasks[0] (mc): icl_task_type 'ranking' is not one of"
    if case == "more shots than rows":
        (bundle / "core.yaml").write_text((bundle / "core.yaml").read_text().replace("- 0", "- 3"))
        return "eval task core: mc shows 3 solved examples before each row, drawn from the others of the 3 kept"
    (bundle / "core.yaml").unlink()
    return "eval task core: no core.yaml in eval.tasks.core.path="


@pytest.mark.parametrize("case", ["missing task file", "gold outside the choices", "no baseline", "unknown task type",
                                  "more shots than rows", "no core.yaml"])
def test_a_broken_core_bundle_is_one_line(tmp_path, case):
    bundle = write_core_bundle(tmp_path / "eval_bundle", GOOD_CORE)
    expected = break_bundle(bundle, case)
    with pytest.raises(UserError) as e:
        CoreTask(CoreConfig(path=str(bundle)), "core", "/nonexistent").subtasks()
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)


def test_core_and_lm_eval_refuse_a_vocabulary_without_end_of_text(tmp_path, tiny_config):
    from nanogpt.config import LmEvalConfig
    from nanogpt.tasks import LmEvalTask

    task = CoreTask(CoreConfig(path=str(write_core_bundle(tmp_path / "b", GOOD_CORE))), "core", "/nonexistent")
    with pytest.raises(UserError, match="eval task core: CORE's prompts start with the end-of-text token"):
        task.render(task.subtasks()[0], CharTokenizer("Qab "), 64)
    with pytest.raises(UserError, match="eval task lm_eval: lm-eval's requests start from the end-of-text token"):
        LmEvalTask(LmEvalConfig(tasks=["x"]), "lm_eval", "/nonexistent").load(CharTokenizer("Qab "))
    with pytest.raises(UserError, match=r"set eval.tasks.core.path=<folder>"):
        tiny_config("eval=[core]")
    with pytest.raises(UserError, match=r"eval.tasks.core.path: /no/bundle does not exist"):
        tiny_config("eval=[core]", "eval.tasks.core.path=/no/bundle")
