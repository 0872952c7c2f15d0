"""The tiny pair's synthetic task (CALM's key-value arithmetic), seeded and defined once.

    small model's facts    kazo3+tilo5+bemu1      made-up names, each followed by its digit
    large model's sums     3+5=8   003+5=8        digit arithmetic (leading zeros: operands of
                                                  several tokens, like the names)
    the pair's questions   kazo+tilo=8            arithmetic on names: the sum of their digits

Each knows what the other does not: the small model knows every name's digit and no arithmetic,
the large model adds and knows no names. Names are split: the bridges are trained (`align`) on
questions over the *training* names and scored on questions over the *held-out* names, whose digits
the small model learnt but the bridges never saw. Every sequence ends with the end-of-text token,
so answers stop by themselves.

Sequences are built from token ids (a name's ids are the same wherever it stands: names whose
tokens change next to `+`, `=` or a digit are not drawn), so the prompt text of a question
tokenizes back to exactly the ids the models were trained on.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np

SYLLABLES = tuple(c + v for c in "bdfgkmnprstvz" for v in "aeiou")


@dataclass(frozen=True)
class Example:
    """Token ids and the positions whose next token is trained (the answer's)."""
    ids: tuple[int, ...]
    answer_from: int             # ids[answer_from:] is the answer (its loss positions: answer_from-1 ...)


@dataclass(frozen=True)
class Question:
    names: tuple[str, str]
    digits: tuple[int, int]

    @property
    def answer(self) -> str:
        return str(sum(self.digits))

    @property
    def prompt(self) -> str:
        return f"{self.names[0]}+{self.names[1]}="

    @property
    def digit_prompt(self) -> str:
        """The same question with the true digits in place of the names (the large model alone)."""
        return f"{self.digits[0]}+{self.digits[1]}="


@dataclass(frozen=True)
class PairTask:
    """`num_names` names with seeded digits; `held_out` of them never reach the bridges."""
    seed: int = 0
    num_names: int = 400
    held_out: int = 200

    @cached_property
    def tokenizer(self):
        from dualbrain.exporter.tiny import build_tokenizer

        return build_tokenizer()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    @cached_property
    def eos(self) -> int:
        return self.tokenizer.token_to_id("<|endoftext|>")

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Made-up words of two or three syllables (several tokens each), none a prefix of another."""
        rng = np.random.default_rng(self.seed)
        out: list[str] = []
        while len(out) < self.num_names:
            name = "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), rng.integers(2, 4)))
            if any(name.startswith(o) or o.startswith(name) for o in out) or not self._stable(name):
                continue
            out.append(name)
        return tuple(out)

    def _stable(self, name: str) -> bool:
        ids = self.encode(name)
        return len(ids) >= 2 and all(self.encode(a + name + b) == self.encode(a) + ids + self.encode(b)
                                     for a, b in (("1+", "="), ("+", "3"), ("", "+")))

    @cached_property
    def digit(self) -> dict[str, int]:
        rng = np.random.default_rng(self.seed + 1)
        return dict(zip(self.names, (int(d) for d in rng.integers(0, 10, len(self.names)))))

    @property
    def train_names(self) -> tuple[str, ...]:
        return self.names[self.held_out:]

    @property
    def held_out_names(self) -> tuple[str, ...]:
        return self.names[:self.held_out]

    # ---- the three corpora ---------------------------------------------------------------------

    def facts(self, rng: np.random.Generator, most: int = 4) -> Example:
        """1..`most` facts of any names joined by `+`; every digit is trained."""
        names = [self.names[i] for i in rng.integers(0, len(self.names), rng.integers(1, most + 1))]
        text = "+".join(f"{n}{self.digit[n]}" for n in names)
        return Example(tuple(self.encode(text)) + (self.eos,), 0)

    def sum_example(self, rng: np.random.Generator, zeros: float = 0.3) -> Example:
        """`a+b=s`, each operand given leading zeros with probability `zeros`; the sum is trained."""
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        ops = ["0" * int(rng.integers(1, 4)) * (rng.random() < zeros) + str(x) for x in (a, b)]
        return self._qa(f"{ops[0]}+{ops[1]}=", str(a + b))

    def question_example(self, q: Question) -> Example:
        return self._qa(q.prompt, q.answer)

    def _qa(self, prompt: str, answer: str) -> Example:
        p = self.encode(prompt)
        return Example(tuple(p + self.encode(answer)) + (self.eos,), len(p))

    # ---- questions -----------------------------------------------------------------------------

    def questions(self, names: tuple[str, ...], n: int, seed: int) -> list[Question]:
        """`n` distinct name pairs (ordered, repeats allowed), seeded."""
        pairs = list(itertools.product(range(len(names)), repeat=2))
        pick = np.random.default_rng(seed).permutation(len(pairs))[:n]
        return [Question((names[pairs[i][0]], names[pairs[i][1]]),
                         (self.digit[names[pairs[i][0]]], self.digit[names[pairs[i][1]]])) for i in pick]

    def held_out_questions(self, n: int = 500) -> list[Question]:
        return self.questions(self.held_out_names, n, self.seed + 2)

    def bridge_questions(self, n: int) -> list[Question]:
        return self.questions(self.train_names, n, self.seed + 3)


def batch(examples: list[Example], pad: int):
    """Right-padded (ids, attention mask, loss mask) int64 arrays (align's `Sequences`): the loss mask
    marks the positions whose *next* token is an answer token (or, for facts, any token)."""
    from dualbrain.exporter.align import Sequences

    s = Sequences.examples([(e.ids[:e.answer_from], e.ids[e.answer_from:]) for e in examples], pad)
    return s.ids, s.attention, s.loss
