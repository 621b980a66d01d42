"""Transformer² self-adaptation: two-pass inference over SVF experts.

Pass 1 decides, per question, which expert (or mixture) answers; pass 2 answers every question
with its choice in one batched call per task (per-row experts, :mod:`lensjax.svf.mixing`).

Strategies (:data:`STRATEGIES`):

* ``prompt`` — the base model classifies each question with :func:`classification_instruction`
  (the reference code's categories code / math / reasoning / other, answer as ``\\boxed{category}``);
  the label is the first ``\\boxed{}`` of its answer (:func:`lensjax.svf.rewards.category_extract`).
  "other", a category without an expert, or no parseable label → the **base weights** (the
  released code sends "other" to whichever expert it loaded last).
* ``classifier`` — the same prompt answered by the base model adapted with a classification
  expert, an SVF z trained by :func:`train_classifier` with the REINFORCE trainer (reward: the
  right category) on questions from the experts' **train** splits only (the released code trains
  it on GSM8K and ARC-Challenge test questions).
* ``fewshot`` — a CEM search over mixing weights α on a few shots with known answers
  (:mod:`lensjax.svf.fewshot`); every question is then answered by the chosen mixture.

:func:`adapt` returns an :class:`AdaptResult`: the answers, per-question choices (or α), accuracy
overall and per task, and each pass's wall time and token counts (prompt + generated tokens).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from lensjax.svf import core, mixing
from lensjax.svf.rewards import category_extract
from lensjax.svf.tasks import Task

STRATEGIES = ("prompt", "classifier", "fewshot")
OTHER = "other"
CLASSIFIER_PREFIX = "classifier:"  # the classification expert's task name: classifier:cat1,cat2,...
REFERENCE_CATEGORIES = ("code", "math", "reasoning")
DESCRIPTIONS = {
    "code": "questions asking for programs, functions or algorithms; they name programming terms, syntax or "
            "data structures.",
    "math": "questions that need calculations, formulas or statistics; they contain numbers, equations or "
            "mathematical operations.",
    "reasoning": "questions that need logical thinking, scientific knowledge or critical analysis of statements.",
}


def classification_instruction(categories: Sequence[str] = REFERENCE_CATEGORIES) -> str:
    """The pass-1 instruction: classify into ``categories`` plus "other", answer in ``\\boxed{}``."""
    cats = list(categories) + [OTHER]
    lines = [f"Classify the question into one of {len(cats)} categories: "
             + ", ".join(f"'{c}'" for c in cats) + "."]
    for i, c in enumerate(categories, 1):
        lines.append(f"{i}. {c.capitalize()}: {DESCRIPTIONS.get(c, f'questions about {c}.')}")
    lines.append(f"{len(cats)}. Other: questions that fit none of the categories above.")
    lines.append("Consider the main skill the question needs; if it spans several categories, choose the "
                 "dominant one. Give the category in \\boxed{}, for example \\boxed{" + cats[0] + "}.")
    lines.append("Format: Classification: \\boxed{category}")
    return "\n".join(lines)


def classification_task(questions: Sequence[str], labels: Sequence[str] | None = None, *,
                        categories: Sequence[str] = REFERENCE_CATEGORIES, instruction: str | None = None,
                        name: str = "classify") -> Task:
    """Questions as a ``category`` task (references: their category, or "other" when unknown)."""
    labels = [OTHER] * len(questions) if labels is None else list(labels)
    instr = classification_instruction(categories) if instruction is None else instruction
    return Task(name, "category", tuple(questions), tuple(labels), instruction=instr)


def classifier_training_set(train_tasks: Mapping[str, Task], *, per_category: int | None = None, seed: int = 0,
                            instruction: str | None = None) -> Task:
    """Labelled questions ``{category: its task's TRAIN split}`` → one shuffled ``category`` task
    (at most ``per_category`` questions of each, drawn with ``seed``), named
    ``classifier:<categories>`` so the expert file records what it predicts."""
    if not train_tasks:
        raise core.SVFError("the classifier needs at least one category with its training task")
    rng = np.random.default_rng(seed)
    qs, labs = [], []
    for cat, t in train_tasks.items():
        if len(t) == 0:
            raise core.SVFError(f"category {cat!r}: its training task is empty")
        idx = rng.permutation(len(t))[: per_category or len(t)]
        qs += [t.prompts[i] for i in idx]
        labs += [cat] * len(idx)
    order = rng.permutation(len(qs))
    return classification_task([qs[i] for i in order], [labs[i] for i in order], categories=tuple(train_tasks),
                               instruction=instruction, name=CLASSIFIER_PREFIX + ",".join(train_tasks))


def train_classifier(model, dec: core.Decomposition, train_tasks: Mapping[str, Task], cfg, out, *, n_val: int = 50,
                     per_category: int | None = None, instruction: str | None = None, on_step: Callable | None = None):
    """Train the classification expert with :func:`lensjax.svf.trainer.train` (reward: the right
    category, validation carved from the same training questions); writes ``out/best.safetensors``."""
    from lensjax.svf.trainer import train

    data = classifier_training_set(train_tasks, per_category=per_category, seed=cfg.seed, instruction=instruction)
    tr, val = data.split(min(n_val, len(data) // 2), cfg.seed)
    return train(model, dec, tr, val, cfg, out, on_step=on_step)


@dataclasses.dataclass
class AdaptResult:
    strategy: str
    completions: list[str]
    correct: list[float]
    task_of: list[str]  # which task each question came from
    choices: list[str] | None  # pass-1 category per question (prompt / classifier)
    alpha: list | None  # mixing weights (fewshot)
    pass1_seconds: float
    pass2_seconds: float
    pass1_tokens: int
    pass2_tokens: int
    pass1_completions: list[str] | None = None
    search: dict | None = None

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else 0.0

    def by_task(self) -> dict[str, float]:
        names = list(dict.fromkeys(self.task_of))
        c = np.asarray(self.correct)
        return {t: float(c[np.asarray(self.task_of) == t].mean()) for t in names}

    def to_json(self, experts: Mapping[str, str] | None = None) -> dict:
        out = {"strategy": self.strategy, "n": self.n, "accuracy": self.accuracy, "by_task": self.by_task(),
               "pass1_seconds": self.pass1_seconds, "pass2_seconds": self.pass2_seconds,
               "pass1_tokens": self.pass1_tokens, "pass2_tokens": self.pass2_tokens,
               "experts": dict(experts or {})}
        if self.choices is not None:
            out["choices"] = self.choices
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.search is not None:
            out["search"] = self.search
        out["completions"] = self.completions
        out["correct"] = self.correct
        return out


def parse_choice(completion: str, categories: Sequence[str]) -> str:
    """The category of a pass-1 answer; "other" when it names none of ``categories``."""
    c = category_extract(completion)
    return c if c in categories else OTHER


def _tokens(rolls) -> int:
    return int(sum(int(r.attn.sum()) for r in rolls))


def classify(model, params, questions: Sequence[str], categories: Sequence[str], *, instruction: str | None = None,
             max_new_tokens: int = 16, batch: int = 64, on_batch: Callable | None = None):
    """Pass 1 of ``prompt`` / ``classifier``: (categories, raw answers, tokens) with ``params``."""
    from lensjax.svf.rollout import complete

    task = classification_task(questions, categories=categories, instruction=instruction)
    texts, toks = [], 0
    size = min(batch, len(questions))  # every call has this many rows (the last batch padded): one compile
    for s in range(0, len(questions), size):
        chunk = list(questions[s:s + size])
        n = len(chunk)
        r = complete(model, params, task, chunk + [chunk[-1]] * (size - n), max_new_tokens=max_new_tokens)
        texts += r.texts[:n]
        toks += int(r.attn[:n].sum())
        if on_batch is not None:
            on_batch(n)
    labels = [parse_choice(t, categories) for t in texts]
    return labels, texts, toks


def answer(model, dec: core.Decomposition, sets, tasks: Sequence[Task], rows: Sequence[int], *,
           max_new_tokens: int = 256, batch: int = 64, on_batch: Callable | None = None):
    """Pass 2: question i (the tasks' questions in order) answered greedily by multiplier set
    ``rows[i]`` of ``sets``; one batched call per task and batch. (completions, correct, tokens)."""
    texts, correct, toks, at = [], [], 0, 0
    rows = np.asarray(rows, np.int32)
    for t in tasks:
        rolls = mixing.generate_rows(model, dec, sets, rows[at: at + len(t)], t, list(t.prompts),
                                     max_new_tokens=max_new_tokens, max_rows=batch, on_chunk=on_batch)
        got = [x for r in rolls for x in r.texts]
        texts += got
        correct += [float(c) for c in t.score_many(got, t.references)]
        toks += _tokens(rolls)
        at += len(t)
    return texts, correct, toks


def adapt(model, dec: core.Decomposition, experts: mixing.ExpertSet, test: Task | Sequence[Task], strategy: str, *,
          classifier_params: dict | None = None, shots: Task | None = None, val: Task | None = None,
          instruction: str | None = None, max_new_tokens: int = 256, classify_tokens: int = 16, batch: int = 64,
          fewshot: Mapping | None = None, on_progress: Callable | None = None) -> AdaptResult:
    """Two-pass inference on ``test`` (one task or a list: a mixed set) with ``strategy``.

    ``classifier_params``: the base parameters adapted with the classification expert (strategy
    ``classifier``). ``shots`` / ``val``: the few-shot set and the validation set from the target
    task's train/validation splits (``fewshot``); ``fewshot``: settings of
    :func:`lensjax.svf.fewshot.search`. ``instruction`` replaces the classification instruction.
    ``on_progress(pass_name, n_done)`` is called after every batch.
    """
    if strategy not in STRATEGIES:
        raise core.SVFError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    tasks = [test] if isinstance(test, Task) else list(test)
    if not tasks or sum(len(t) for t in tasks) == 0:
        raise core.SVFError("the test set is empty")
    questions = [q for t in tasks for q in t.prompts]
    tick = (lambda name: (lambda n: on_progress(name, n))) if on_progress else (lambda name: None)
    cats = experts.names
    choices = alpha = p1_texts = search = None
    t0 = time.perf_counter()
    if strategy in ("prompt", "classifier"):
        if strategy == "classifier" and classifier_params is None:
            raise core.SVFError("strategy 'classifier' needs the classification expert (classifier_params)")
        params = model.params if strategy == "prompt" else classifier_params
        choices, p1_texts, p1_tokens = classify(model, params, questions, cats, instruction=instruction,
                                                max_new_tokens=classify_tokens, batch=batch, on_batch=tick("pass 1"))
        sets = mixing.with_identity(experts, dec)  # index K: the base weights
        rows = [cats.index(c) if c in cats else len(cats) for c in choices]
    else:
        from lensjax.svf import fewshot as fs

        if shots is None or val is None:
            raise core.SVFError("strategy 'fewshot' needs shots and a validation set from the train/validation splits")
        search = fs.search(model, dec, experts, shots, val, max_new_tokens=max_new_tokens,
                           on_generation=tick("pass 1"), **dict(fewshot or {}))
        alpha = search["alpha"]
        p1_tokens = search["tokens"]
        sets = {p: g[None] for p, g in mixing.mix(experts, dec, np.asarray(alpha), space=search["space"],
                                                  normalise=search["normalise"]).items()}
        rows = [0] * len(questions)
    t1 = time.perf_counter()
    texts, correct, p2_tokens = answer(model, dec, sets, tasks, rows, max_new_tokens=max_new_tokens, batch=batch,
                                       on_batch=tick("pass 2"))
    t2 = time.perf_counter()
    task_of = [t.name for t in tasks for _ in range(len(t))]
    return AdaptResult(strategy, texts, correct, task_of, choices, alpha, t1 - t0, t2 - t1, p1_tokens, p2_tokens,
                       p1_texts, {k: v for k, v in search.items() if k != "alpha"} if search else None)
