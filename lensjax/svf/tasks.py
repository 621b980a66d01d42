"""SVF tasks: prompts, reference answers and rewards.

* ``arithmetic`` — synthetic ``a+b=`` (or ``-``/``*``) problems; no download. Answer: the number.
* GSM8K-style — records with ``question`` and ``answer``; the reference is the number after
  ``####`` in the answer; the model's answer is the last number in its output. A hub name
  (``gsm8k``) or a local json/jsonl file with those fields (``--task path.jsonl``).
* ARC-style — ``question``, ``choices`` (``{"text": [...], "label": [...]}``) and ``answerKey``;
  the model's answer is the first choice letter in its output.

Rewards are 1 for a correct answer, 0 otherwise. Prompts use the tokenizer's chat template when it
has one, else the plain text.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class TaskError(ValueError):
    """A task that cannot be loaded or used."""


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "number" | "choice"
    prompts: tuple[str, ...]
    answers: tuple[str, ...]

    def __len__(self):
        return len(self.prompts)

    def split(self, n_val: int, seed: int = 0) -> tuple["Task", "Task"]:
        if not 0 < n_val < len(self):
            raise TaskError(f"task {self.name!r} has {len(self)} examples; cannot hold out {n_val}")
        order = np.random.default_rng(seed).permutation(len(self))
        take = lambda idx: dataclasses.replace(self, prompts=tuple(self.prompts[i] for i in idx),  # noqa: E731
                                               answers=tuple(self.answers[i] for i in idx))
        return take(order[n_val:]), take(order[:n_val])

    def reward(self, completion: str, answer: str) -> float:
        return float(extract(completion, self.kind) == normalise(answer, self.kind))


def normalise(answer: str, kind: str) -> str:
    if kind == "number":
        m = NUMBER.findall(answer.replace(",", ""))
        if not m:
            return answer.strip()
        v = float(m[-1])
        return str(int(v)) if v == int(v) else str(v)
    return answer.strip().upper()[:1]


def extract(completion: str, kind: str) -> str | None:
    if kind == "number":
        m = NUMBER.findall(completion.replace(",", ""))
        if not m:
            return None
        v = float(m[0])
        return str(int(v)) if v == int(v) else str(v)
    m = re.search(r"\b([A-E])\b", completion.upper())
    return m.group(1) if m else None


def arithmetic(n: int = 2000, *, max_operand: int = 9, ops: str = "+", seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    prompts, answers = [], []
    for _ in range(n):
        a, b = rng.integers(0, max_operand + 1, 2)
        op = ops[rng.integers(len(ops))]
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        prompts.append(f"{a}{op}{b}=")
        answers.append(str(int(val)))
    return Task("arithmetic", "number", tuple(prompts), tuple(answers))


def load_task(name_or_path: str, split: str = "train", limit: int | None = None) -> Task:
    """``arithmetic`` or a GSM8K-/ARC-style dataset (hub name or local json/jsonl/csv/parquet)."""
    if name_or_path == "arithmetic":
        return arithmetic(limit or 2000)
    import datasets

    p = Path(name_or_path)
    try:
        if p.exists():
            fmt = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix.lower())
            if fmt is None:
                raise TaskError(f"{p}: unsupported file type {p.suffix!r}")
            ds = datasets.load_dataset(fmt, data_files=str(p))["train"]
        else:
            ds = datasets.load_dataset(name_or_path, "main" if name_or_path.endswith("gsm8k") else None)[split]
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"cannot load task {name_or_path!r}: {exc}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    cols = set(ds.column_names)
    if len(ds) == 0:
        raise TaskError(f"task {name_or_path!r} is empty")
    if {"question", "answer"} <= cols:
        answers = []
        for a in ds["answer"]:
            a = str(a)
            answers.append(a.split("####")[-1].strip() if "####" in a else a.strip())
        prompts = tuple(f"Question: {q}\nAnswer:" for q in ds["question"])
        return Task(p.stem if p.exists() else name_or_path, "number", prompts, tuple(answers))
    if {"question", "choices", "answerKey"} <= cols:
        prompts = []
        for q, ch in zip(ds["question"], ds["choices"]):
            opts = "\n".join(f"{lab}. {txt}" for lab, txt in zip(ch["label"], ch["text"]))
            prompts.append(f"Question: {q}\n{opts}\nAnswer:")
        return Task(p.stem if p.exists() else name_or_path, "choice", tuple(prompts), tuple(ds["answerKey"]))
    raise TaskError(f"task {name_or_path!r}: expected fields question+answer (GSM8K-style) or "
                    f"question+choices+answerKey (ARC-style); found {sorted(cols)}")


def format_prompt(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt
