"""A multiple-choice task made from a text: which of a few lines follows a given one. The true
next line against lines drawn from elsewhere in the text; the model's loss on each, as any
multiple-choice task of nanogpt is scored (nanogpt/evaluation.py)."""

import random
from dataclasses import dataclass

from nanogpt.checks import POSITIVE, Range, valid
from nanogpt.config import ChoiceTaskConfig
from nanogpt.tasks import ChoiceTask, Example


@dataclass
class NextLineConfig(ChoiceTaskConfig):
    _target_: str = "myresearch.tasks.NextLine"
    join: str = "\n"  # the context's line, then a choice on the next line
    choices: int = valid(4, Range(2))
    examples: int = valid(200, POSITIVE)
    from_fraction: float = valid(0.9, Range(0, 1, high_open=True))  # lines from here to the end: a text file's val split
    seed: int = 0


class NextLine(ChoiceTask):
    """The file comes from `path` (or `url`) as for any ChoiceTask; its examples are made here
    (few-shot examples are not shown)."""

    def __init__(self, config: NextLineConfig, name: str, cache_dir: str):
        super().__init__(config, name, cache_dir)

    def examples(self) -> list[Example]:
        c = self.config
        text = self.fetch().read_text(encoding="utf-8")
        lines = [s for s in text[int(len(text) * c.from_fraction) :].splitlines()[1:] if s.strip()]
        rng = random.Random(c.seed)
        out = []
        for i in rng.sample(range(len(lines) - 1), min(c.examples, len(lines) - 1)):
            answer, wrong = lines[i + 1], set()
            while len(wrong) < c.choices - 1:  # other lines, none the same text as the answer ("ROMEO:" recurs)
                wrong |= {lines[rng.randrange(len(lines))]} - {answer}
            choices = [answer, *sorted(wrong)]
            rng.shuffle(choices)
            out.append(Example(lines[i], choices, choices.index(answer)))
        return out[: c.limit] if c.limit else out
