"""The lm-evaluation-harness model and the eval group's CORE and lm-eval tasks, on one tiny
GPT-2-vocabulary run trained here (evaluating both inside training): its scores equal lm-eval's
Hugging Face backend on the same model exported with `python -m nanogpt.export`, request by
request; the eval command, over two ranks, scores the run's checkpoint as training scored it. Offline: every
task reads local files."""

import json
import os
import subprocess
import sys

import pytest
import torch

import nanogpt.export
from conftest import ROOT, TINY, run_script, write_core_bundle
from nanogpt.checkpoint import save_checkpoint
from nanogpt.export import export
from nanogpt.model import GPT, GPTConfig
from nanogpt.plot import run_figures
from nanogpt.rundir import read_metrics, task_scores
from nanogpt.tokenizer import TiktokenTokenizer

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
LINES = ["First Citizen: Before we proceed any further, hear me speak.", "All: Speak, speak.",
         "First Citizen: You are all resolved rather to die than to famish?", "All: Resolved. resolved.",
         "MENENIUS: What work's, my countrymen, in hand? where go you", "ROMEO: I love thee, and my heart is thine."]
# multiple choice: the right ending and three from other lines; some contexts end in a space (lm-eval
# moves it into the continuation) and some rows are longer than the tiny model's block of 32 tokens
CHOICE_ROWS = [{"context": line[: len(line) // 2] + (" " if i % 2 else ""),
                "choices": [line[len(line) // 2 :].strip()] + [other[-12:].strip() for other in LINES[i + 1 : i + 4]],
                "label": 0} for i, line in enumerate(LINES[:3])]
CHOICE_ROWS.append({"context": " ".join(LINES), "choices": ["Romeo.", "Juliet, fair and good.", "no"], "label": 1})

TASKS = {  # lm-eval task YAMLs: {data} is the task's jsonl file
    "nanogpt_mc": """task: nanogpt_mc
dataset_path: json
dataset_kwargs: {{data_files: {{validation: "{data}"}}}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    "nanogpt_rolling": """task: nanogpt_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{validation: "{data}"}}}}
validation_split: validation
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
""",
    "nanogpt_gen": """task: nanogpt_gen
dataset_path: json
dataset_kwargs: {{data_files: {{validation: "{data}"}}}}
validation_split: validation
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n", "."], max_gen_toks: 24, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""",
}
TASK_ROWS = {
    "nanogpt_mc": CHOICE_ROWS,
    "nanogpt_rolling": [{"text": "\n".join(LINES)}, {"text": LINES[0]}],  # the first: several windows of the block
    "nanogpt_gen": [{"context": line[:20], "target": line[20:]} for line in LINES[:4]],
}
CORE_TASKS = {
    "mc": {"kind": "multiple_choice", "fewshot": 1, "baseline": 25.0,
           "rows": [{"query": r["context"].strip(), "choices": r["choices"], "gold": r["label"]} for r in CHOICE_ROWS]},
    "lm": {"kind": "language_modeling", "fewshot": 0, "baseline": 0.0,
           "rows": [{"context": line[:12], "continuation": line[12:18]} for line in LINES]},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    """One tiny GPT-2-vocabulary run that evaluated CORE and the lm-eval tasks at its last
    iteration, with the bundle and task folder it read, and the run exported for Hugging Face."""
    tmp = tmp_path_factory.mktemp("harness")
    bundle = write_core_bundle(tmp / "eval_bundle", CORE_TASKS)
    (tmp / "tasks").mkdir()
    for name, yaml in TASKS.items():
        data = tmp / "tasks" / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in TASK_ROWS[name]))
        (tmp / "tasks" / f"{name}.yaml").write_text(yaml.format(data=data))
    run_dir = tmp / "run"
    run_script("train.py", *TINY, "data=shakespeare", f"data.root={data_root}", f"hydra.run.dir={run_dir}",
               "eval.interval=20", *eval_overrides(bundle, tmp / "tasks"), cwd=tmp, env=OFFLINE)
    export = tmp / "hf"
    nanogpt.export.main([str(run_dir), str(export)])  # python -m nanogpt.export <run> <folder>
    with pytest.MonkeyPatch.context() as env:  # offline for the tests' own lm-eval calls too
        for key, value in OFFLINE.items():
            env.setenv(key, value)
        yield {"dir": run_dir, "bundle": bundle, "tasks": tmp / "tasks", "hf": export, "tmp": tmp}


def eval_overrides(bundle, tasks) -> list[str]:
    """CORE, the lm-eval tasks, and our own multiple-choice task on the lm-eval task's file."""
    return ["eval=[core,lm_eval,hellaswag]", f"eval.tasks.core.path={bundle}", f"eval.tasks.lm_eval.include_path={tasks}",
            f"eval.tasks.lm_eval.tasks=[{','.join(TASKS)}]", f"eval.tasks.hellaswag.path={tasks / 'nanogpt_mc.jsonl'}",
            "eval.tasks.hellaswag.format=choices"]


def eval_command(run, *args: str) -> subprocess.CompletedProcess:
    """`python <args> init_from=<the run> system=cpu`, offline, importing this tree's nanogpt."""
    return subprocess.run([sys.executable, *args, f"init_from={run['dir']}", "system=cpu"], cwd=run["tmp"],
                          capture_output=True, text=True, env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)})


def simple_evaluate(model: str, model_args: str, tasks_folder, **kwargs) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import nanogpt.harness  # noqa: F401  registers the model "nanogpt"

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=3,
                                   task_manager=TaskManager(include_path=str(tasks_folder), include_defaults=False),
                                   bootstrap_iters=0, device="cpu", **kwargs)


def test_scores_and_every_request_equal_lm_evals_hugging_face_backend(run):
    ours = simple_evaluate("nanogpt", f"init_from={run['dir']}", run["tasks"])
    hf = simple_evaluate("hf", f"pretrained={run['hf']},dtype=float32", run["tasks"])
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["nanogpt_mc"][metric] == hf["results"]["nanogpt_mc"][metric]
    for task in TASKS:  # request by request: log-likelihoods (with greedy), rolling ones, generations
        ours_docs, hf_docs = ({s["doc_id"]: s["resps"] for s in r["samples"][task]} for r in (ours, hf))
        assert ours_docs.keys() == hf_docs.keys() == set(range(len(TASK_ROWS[task])))
        for doc_id, resps in ours_docs.items():
            for (mine,), (theirs,) in zip(resps, hf_docs[doc_id], strict=True):
                if task == "nanogpt_gen":
                    assert mine == theirs and "\n" not in mine and "." not in mine
                elif task == "nanogpt_mc":
                    assert mine[0] == pytest.approx(theirs[0], abs=1e-4) and mine[1] == theirs[1]
                else:
                    assert mine == pytest.approx(theirs, abs=1e-4)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["nanogpt_rolling"][metric] == pytest.approx(hf["results"]["nanogpt_rolling"][metric], rel=1e-4)


def test_generation_equals_lm_evals_hugging_face_backend_and_stops_at_its_until_strings(tmp_path, monkeypatch):
    """On a model of random weights (the trained tiny run greedily repeats one token, so its
    generations would all look alike): generate_until's texts equal lm-eval's Hugging Face
    backend's on the same model exported, and are cut before the first until string."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from nanogpt.harness import NanoGPTLM

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False)).eval()
    save_checkpoint({"model": model.state_dict(), "model_args": vars(model.config), "meta": {"tokenizer": "gpt2"}},
                    tmp_path / "ckpt.pt")
    export(tmp_path / "ckpt.pt", tmp_path / "hf")
    ours = NanoGPTLM(model, TiktokenTokenizer("gpt2"), batch_size=3)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=3)
    requests = lambda until: [Instance("generate_until", {}, (line[:20], {"until": until, "max_gen_toks": 10,  # noqa: E731
                                                                         "do_sample": False}), i) for i, line in enumerate(LINES[:3])]
    free = ours.generate_until(requests([]))  # 10 tokens each, different for each context
    assert len(set(free)) == 3 and all(free)
    stop = free[0][len(free[0]) // 2 :][:2]  # a string the first generation reaches midway
    cut = ours.generate_until(requests([stop, "never"]))
    assert cut == [text[: text.index(stop)] if stop in text else text for text in free] and len(cut[0]) < len(free[0])
    assert cut == theirs.generate_until(requests([stop, "never"]))


def test_training_recorded_core_and_lm_eval_and_the_eval_command_on_two_ranks_agrees(run):
    records = [r for r in read_metrics(run["dir"]) if r.get("kind") == "tasks"]
    assert [r["iter"] for r in records] == [20]
    last = records[-1]
    assert {"core", "core/mc", "core/lm", "hellaswag/acc", "lm_eval/nanogpt_mc/acc", "lm_eval/nanogpt_mc/acc_norm",
            "lm_eval/nanogpt_rolling/bits_per_byte", "lm_eval/nanogpt_gen/exact_match"} <= last.keys()
    assert last["core"] == pytest.approx((last["core/mc"] + last["core/lm"]) / 2)
    panels = [ax.get_ylabel() for ax in run_figures(run["dir"])["tasks"].axes if ax.get_visible()]
    assert panels == list(task_scores(last))  # a panel each
    out = run["tmp"] / "evaluated"  # over two ranks: each scores its share
    proc = eval_command(run, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanogpt.eval",
                        *eval_overrides(run["bundle"], run["tasks"]), f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((out / "eval.json").read_text())["scores"]
    assert scores == pytest.approx({k: v for k, v in last.items() if k in scores}, abs=1e-9)
    assert scores.keys() == task_scores(last).keys()


def test_an_lm_eval_task_that_does_not_exist_is_one_line_before_any_model_work(run):
    proc = eval_command(run, "-m", "nanogpt.eval", "eval=[lm_eval]", f"eval.tasks.lm_eval.include_path={run['tasks']}",
                        "eval.tasks.lm_eval.tasks=[nanogpt_mc,hellaswagg]", f"hydra.run.dir={run['tmp'] / 'refused'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: eval.tasks.lm_eval.tasks: lm-eval has no task 'hellaswagg'"), line
