"""SVF tasks: records → prompts and references, splits, prompt formatting, scoring.

Kinds (detected from a record's fields, or named with ``kind=``):

========== ==================================================== =====================================
kind       fields                                               reference and scorer
========== ==================================================== =====================================
arithmetic (synthetic ``a+b=``; no file)                        the number (:func:`rewards.score_gsm8k`)
gsm8k      ``question``, ``answer`` (gold after ``####``)        the number (:func:`rewards.score_gsm8k`)
math       ``problem`` + ``solution`` (gold: its last            equivalence by math-verify
           ``\\boxed{}``) or ``answer``                          (:func:`rewards.score_math`)
arc        ``question``, ``choices`` {text, label}, ``answerKey`` the record's label (:func:`rewards.score_choice`)
mbpp       ``text`` or ``prompt``, ``test_list`` (+              tests run in the sandbox
           ``test_setup_code`` / ``test_imports``)               (:func:`sandbox.score_code`)
humaneval  ``prompt``, ``test``, ``entry_point``                 ``check(entry_point)`` in the sandbox
========== ==================================================== =====================================

Sources: ``arithmetic``; a hub id with its real config (``gsm8k`` → ``openai/gsm8k`` "main",
``arc_easy`` / ``arc_challenge`` or ``allenai/ai2_arc:ARC-Challenge``, ``competition_math`` →
``hendrycks/competition_math``, ``mbpp`` → ``google-research-datasets/mbpp`` "full" (``mbpp:sanitized``),
``humaneval`` → ``openai/openai_humaneval``; any other ``name[:config]`` is passed to
``datasets.load_dataset``); a folder with ``train.*`` / ``validation.*`` (or ``val``, ``valid``,
``dev``) / ``test.*`` files; or one json/jsonl/csv/parquet file, which is all of its split.

Splits: :func:`train_val` gives the training and validation sets — the source's own validation
split when it has one, else a fixed-seed carve of its train split — and never reads test;
:func:`load_task` with ``split="test"`` (the default) is for evaluation.

Prompts: each kind has an instruction; with a chat template the instruction is the system message
(merged into the user turn when the template has no system role) and the template adds BOS; without
one the plain prompt is encoded with the tokenizer's own special tokens (BOS where it expects it).
Stop strings end a completion (they are kept in it).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


class TaskError(ValueError):
    """A task that cannot be loaded or used."""


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    fields: str  # for error messages
    instruction: str
    stop: tuple[str, ...]  # plain (no chat template) prompts
    chat_stop: tuple[str, ...] = ()


QA_STOP = ("\nQuestion:", "\n\n\n")
KINDS = {
    "arithmetic": Kind("arithmetic", "(synthetic)", "", ()),
    "gsm8k": Kind("gsm8k", "question, answer", "Solve the math word problem. Reason step by step, then end with "
                  "'The answer is N.' where N is a number.", QA_STOP),
    "math": Kind("math", "problem and solution (or answer)", "Solve the competition math problem. Reason step by "
                 "step and put the final answer in \\boxed{}.", ("\nProblem:", "\n\n\n")),
    "arc": Kind("arc", "question, choices {text, label}, answerKey", "Answer the multiple-choice question. End with "
                "'The answer is X.' where X is the label of the correct choice.", QA_STOP),
    "mbpp": Kind("mbpp", "text (or prompt), test_list", "Write a Python function for the task. Give the complete "
                 "code in one ```python block.", ("\n```\n",), ("\n```\n",)),
    "humaneval": Kind("humaneval", "prompt, test, entry_point", "Complete the Python function. Give the complete "
                      "function in one ```python block.", ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"),
                      ("\n```\n",)),
    # Transformer²'s pass-1 question classification (lensjax.svf.adaptation); references are category names
    "category": Kind("category", "(built from expert tasks)", "", ("}",), ("}",)),
}
HUB = {
    "gsm8k": ("openai/gsm8k", "main"), "openai/gsm8k": ("openai/gsm8k", "main"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"), "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "ai2_arc": ("allenai/ai2_arc", "ARC-Easy"), "allenai/ai2_arc": ("allenai/ai2_arc", "ARC-Easy"),
    "competition_math": ("hendrycks/competition_math", None), "math": ("hendrycks/competition_math", None),
    "mbpp": ("google-research-datasets/mbpp", "full"),
    "google-research-datasets/mbpp": ("google-research-datasets/mbpp", "full"),
    "humaneval": ("openai/openai_humaneval", None), "openai_humaneval": ("openai/openai_humaneval", None),
}
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str
    prompts: tuple[str, ...]  # the user turn
    references: tuple[Any, ...]
    instruction: str | None = None  # replaces the kind's instruction when set ("" for none)

    def __len__(self):
        return len(self.prompts)

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    @property
    def instruction_text(self) -> str:
        return self.spec.instruction if self.instruction is None else self.instruction

    def subset(self, idx) -> "Task":
        return dataclasses.replace(self, prompts=tuple(self.prompts[i] for i in idx),
                                   references=tuple(self.references[i] for i in idx))

    def split(self, n_val: int, seed: int = 0) -> tuple["Task", "Task"]:
        """(rest, held out) with ``n_val`` examples held out, by a fixed-seed permutation."""
        if not 0 < n_val < len(self):
            raise TaskError(f"task {self.name!r} has {len(self)} examples; cannot hold out {n_val}")
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(order[n_val:]), self.subset(order[:n_val])

    def score(self, completion: str, reference) -> float:
        """1.0 when ``completion`` answers correctly, else 0.0."""
        return _scorer(self.kind)(completion, reference)

    def score_many(self, completions: Sequence[str], references: Sequence) -> np.ndarray:
        if self.kind in ("mbpp", "humaneval"):
            from lensjax.svf import sandbox

            return np.asarray(sandbox.score_many(list(completions), list(references)), np.float32)
        f = _scorer(self.kind)
        return np.asarray([f(c, r) for c, r in zip(completions, references)], np.float32)

    def stop_strings(self, templated: bool) -> tuple[str, ...]:
        return self.spec.chat_stop if templated else self.spec.stop


def _scorer(kind: str) -> Callable[[str, Any], float]:
    from lensjax.svf import rewards

    if kind in ("mbpp", "humaneval"):
        from lensjax.svf import sandbox

        return sandbox.score_code
    return {"arithmetic": rewards.score_gsm8k, "gsm8k": rewards.score_gsm8k, "math": rewards.score_math,
            "arc": rewards.score_choice, "category": rewards.score_category}[kind]


# ---------------------------------------------------------------------------------- records
def detect_kind(columns) -> str:
    c = set(columns)
    if {"prompt", "test", "entry_point"} <= c:
        return "humaneval"
    if "test_list" in c and c & {"text", "prompt"}:
        return "mbpp"
    if "problem" in c and c & {"solution", "answer"}:
        return "math"
    if {"question", "choices", "answerKey"} <= c:
        return "arc"
    if {"question", "answer"} <= c:
        return "gsm8k"
    kinds = "; ".join(f"{k.name}: {k.fields}" for k in KINDS.values() if k.name != "arithmetic")
    raise TaskError(f"records have none of the field sets of a task kind ({kinds}); found {sorted(c)}")


def _structured(v):
    """A list/dict field as a CSV cell writes it (JSON or a Python literal) back into a list/dict."""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except ValueError:
        return ast.literal_eval(v)


def _choices(ch) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(labels, texts) of ARC choices given as {"label": [...], "text": [...]} or [{"label", "text"}]."""
    ch = _structured(ch)
    if isinstance(ch, dict):
        return tuple(str(x) for x in ch["label"]), tuple(str(x) for x in ch["text"])
    return tuple(str(x["label"]) for x in ch), tuple(str(x["text"]) for x in ch)


def _record(kind: str, r: dict, i: int, name: str) -> tuple[str, Any]:
    from lensjax.svf import rewards

    try:
        if kind == "gsm8k":
            return str(r["question"]).strip(), rewards.gsm8k_reference(str(r["answer"]))
        if kind == "math":
            gold = r.get("answer")
            ref = str(gold).strip() if gold not in (None, "") else rewards.math_reference(str(r["solution"]))
            return str(r["problem"]).strip(), ref
        if kind == "arc":
            labels, texts = _choices(r["choices"])
            opts = "\n".join(f"{lab}. {txt}" for lab, txt in zip(labels, texts))
            key = str(r["answerKey"]).strip()
            if key not in labels:
                raise TaskError(f"answerKey {key!r} is not one of the labels {list(labels)}")
            return f"{str(r['question']).strip()}\n{opts}", rewards.Choice(key, labels, texts)
        if kind == "mbpp":
            from lensjax.svf import sandbox

            tests = [str(t) for t in _structured(r["test_list"])]
            setup = r.get("test_setup_code") or "\n".join(_structured(r.get("test_imports") or []))
            text = str(r.get("text") or r.get("prompt")).strip()
            prompt = f"{text}\nYour code should pass these tests:\n\n" + "\n".join(tests)
            return prompt, sandbox.CodeRef(tests="\n".join(tests), setup=str(setup or ""))
        if kind == "humaneval":
            from lensjax.svf import sandbox

            p = str(r["prompt"])
            return p, sandbox.CodeRef(tests=str(r["test"]), prompt=p, entry_point=str(r["entry_point"]))
    except TaskError as exc:
        raise TaskError(f"{name}, record {i}: {exc}") from None
    except (KeyError, TypeError, ValueError, SyntaxError) as exc:
        raise TaskError(f"{name}, record {i}: not a valid {kind} record ({type(exc).__name__}: {exc})") from None
    raise TaskError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")


def from_records(ds, name: str, kind: str | None = None, limit: int | None = None) -> Task:
    """A Task from a ``datasets.Dataset`` (or a list of dicts)."""
    if kind is not None and kind not in KINDS:
        raise TaskError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")
    rows = list(ds) if not hasattr(ds, "column_names") else ds
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows)))) if hasattr(rows, "select") else rows[:limit]
    if len(rows) == 0:
        raise TaskError(f"task {name!r} is empty")
    cols = rows.column_names if hasattr(rows, "column_names") else list(rows[0])
    kind = kind or detect_kind(cols)
    pairs = [_record(kind, dict(r), i, name) for i, r in enumerate(rows)]
    return Task(name, kind, tuple(p for p, _ in pairs), tuple(r for _, r in pairs))


def arithmetic(n: int = 2000, *, max_operand: int = 9, ops: str = "+", seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    prompts, answers = [], []
    for _ in range(n):
        a, b = rng.integers(0, max_operand + 1, 2)
        op = ops[rng.integers(len(ops))]
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        prompts.append(f"{a}{op}{b}=")
        answers.append(str(int(val)))
    return Task("arithmetic", "arithmetic", tuple(prompts), tuple(answers))


# ---------------------------------------------------------------------------------- sources
def _load_splits(source: str) -> tuple[str, dict[str, Callable]]:
    """(name, {split: loader of a datasets.Dataset}) for a folder, file or hub id; a single file
    gives {"all": ...}."""
    import datasets

    def local(path: Path):
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise TaskError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(FORMATS)})")
        return lambda: datasets.load_dataset(fmt, data_files=str(path), split="train")

    p = Path(source)
    if p.is_file():
        return p.stem, {"all": local(p)}
    if p.is_dir():
        found = {}
        for f in sorted(p.iterdir()):
            split = "validation" if f.stem in VALIDATION_NAMES else f.stem
            if split in ("train", "validation", "test") and f.suffix.lower() in FORMATS:
                found[split] = local(f)
        if not found:
            raise TaskError(f"{p}: no train/validation/test .json, .jsonl, .csv or .parquet files")
        return p.name, found
    name, _, config = source.partition(":")
    path, default_config = HUB.get(name, (name, None))
    config = config or default_config
    try:
        dd = datasets.load_dataset(path, config)
    except Exception as exc:  # the hub's errors are many; report them, with the name asked for
        raise TaskError(f"cannot load task {source!r} ({path}{':' + config if config else ''}): {exc}") from None
    return source, {s: (lambda s=s: dd[s]) for s in dd}


def load_task(source: str, split: str = "test", limit: int | None = None, kind: str | None = None) -> Task:
    """One split of a task (a single file: the whole file) — for evaluation, ``split="test"``."""
    if source == "arithmetic":
        return arithmetic(limit or 2000, seed={"train": 0, "validation": 1, "test": 2}.get(split, 0))
    name, splits = _load_splits(source)
    get = splits.get("all") or splits.get(split)
    if get is None:
        raise TaskError(f"task {source!r} has no {split!r} split (it has {', '.join(splits)})")
    try:
        ds = get()
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"cannot load task {source!r}: {exc}") from None
    return from_records(ds, name, kind, limit)


def train_val(source: str, n_val: int, seed: int = 0, limit: int | None = None,
              kind: str | None = None) -> tuple[Task, Task]:
    """Training and validation sets; test is never read. Validation is the source's own split
    (at most ``n_val`` examples) or ``n_val`` examples carved from train with ``seed``."""
    if source == "arithmetic":
        return arithmetic(limit or 2000).split(n_val, seed)
    name, splits = _load_splits(source)
    if "all" not in splits and "train" not in splits:
        raise TaskError(f"task {source!r} has no train split to train on (it has {', '.join(splits)})")
    train = load_task(source, "train", limit, kind)
    if "validation" in splits:
        val = load_task(source, "validation", None, kind or train.kind)
        return train, val.subset(range(min(n_val, len(val))))
    return train.split(n_val, seed)


# ---------------------------------------------------------------------------------- prompts
def format_prompt(tokenizer, task: Task, prompt: str) -> tuple[str, bool]:
    """(text, add_special_tokens): the chat template (which adds BOS itself) when the tokenizer has
    one, else the plain prompt, to be encoded with the tokenizer's special tokens."""
    instr = task.instruction_text
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        try:
            msgs = ([{"role": "system", "content": instr}] if instr else []) + user
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role (e.g. older Mistral, Gemma)
            merged = [{"role": "user", "content": f"{instr}\n\n{prompt}" if instr else prompt}]
            text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        return text, False
    if task.kind == "arithmetic":
        return prompt, True
    if task.kind == "humaneval":  # a base model continues the function body
        return prompt, True
    if task.kind == "mbpp":
        return f"{instr}\n\n{prompt}\n", True
    if task.kind == "category":
        return f"{instr}\n\nQuestion: {prompt}\nClassification:", True
    label = "Problem" if task.kind == "math" else "Question"
    return f"{instr}\n\n{label}: {prompt}\nAnswer:", True


def is_templated(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompts(tokenizer, task: Task, prompts: Sequence[str]) -> list[list[int]]:
    out = []
    for p in prompts:
        text, special = format_prompt(tokenizer, task, p)
        out.append(list(tokenizer(text, add_special_tokens=special)["input_ids"]))
    return out
