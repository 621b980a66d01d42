"""Answer scorers for SVF RL rewards: GSM8K, MATH (competition math), ARC (multiple choice).

Each ``score_*`` is a pure ``(completion, reference) -> float`` giving 1.0 or 0.0; no randomness, and
it never raises on any completion string.

Numbers (:func:`parse_number` returns the first one in a text, or None): ``[sign]int[.frac]``, ASCII digits.
* sign: ``-`` or unicode ``−`` right before the digits, unless it follows a letter, digit, ``)`` or ``]``
  (``48-24`` is 48 then 24; ``dropped to −5`` is -5); an en dash is never a sign;
* thousands separators only in whole 3-digit groups: ``1,500,000`` = 1500000; ``1,5`` is 1 then 5;
* exact decimals (``3.50`` == 3.5 == 7/2, ``18.00`` == 18); a leading digit is required (``.5`` is 5);
* currency, ``%``, units, markdown and punctuation around it are ignored (``$18.``, ``**18**``,
  ``18 dollars``, ``18%`` are 18); not parsed: ``1/2`` (1 then 2), ``1e3`` (1), number words; > 60 digits.
GSM8K — gold: the text after the last ``####`` (else the whole text), stripped.  Prediction: the first
number within 80 characters after the LAST anchor having one ("answer is" / "answer:" / "####", any
case: "The final answer is", "**Answer:**"); else the first number in the last ``\\boxed{}``; else the
last number.  Compared as exact fractions.
MATH — gold: the last ``\\boxed{}``/``\\fbox{}`` of the solution (:func:`math_reference`).  Prediction: the
last box of the completion (nested braces, ``\\{`` escapes, brace-less ``\\boxed 5``; an unclosed last box
falls back to an earlier one), else the last "answer is X" / "answer: X" statement (``$X$``, ``\\(X\\)`` or
the text to the end of the sentence), else none (0).  Equivalence only by math_verify: both are parsed
as ``$\\boxed{X}$`` with ``math_verify.parse`` and compared by ``math_verify.verify(gold, pred)``.
Time bound: math_verify's signal timeouts work only in the main thread, so they are switched off
(``parsing_timeout=None``, ``timeout_seconds=None``).  Instead each check runs in one persistent helper
process (started on first use, shared by all threads, a new one after a fork) that runs it in *its*
main thread under a ``setitimer`` deadline of ``MATH_TIMEOUT_S`` s and a 4 GiB address-space limit; if
no reply comes ``MATH_TIMEOUT_S + 3`` s later the caller kills it (score 0; next call restarts it).  If
no helper can start, the check runs in-process: same deadline in the main thread, none elsewhere.
Answers (gold or prediction) longer than 1000 characters score 0.
ARC — :class:`Choice`: the answerKey, the record's labels, optionally the choice texts.  Labels are
case-sensitive (lowercase "a" is never "A"); a candidate not among the labels is skipped.  Cascade:
1. the LAST explicit statement: "[correct|right|best|final] answer|option|choice is|:|= [option] X"
   (X may be ``(X)``, ``**X**``), "option X is correct", ``\\boxed{X}`` / ``\\boxed{\\text{X}}``;
2. the completion starts with "X." / "X)" / "X:" / "(X)" / "[X]", or its first line is just "X"
   (so the article in "A plant needs..." is not label A);
3. exactly one choice text occurs in it (case-insensitive, as a whole phrase) -> its label;
4. the last "(X)" anywhere; else None (score 0), never a guess.
A plain-string reference to :func:`score_choice` means labels A-E (1-5 when it is a digit).
Category (Transformer²'s pass-1 classification) — the FIRST ``\\boxed{}`` of the completion (as the
reference code's ``re.search``), nested braces and ``\\text{}`` unwrapped, surrounding spaces, quotes,
``*`` and a final period dropped, lowercased; no box -> None (the caller's "other").
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import os
import re
import select
import subprocess
import sys
import threading
from typing import Sequence

MATH_TIMEOUT_S = 2.0  # per score_math call, for the parses and the verify together
_MAX_LEN = 1000       # longer MATH answers (gold or prediction) score 0

_NUM = re.compile(r"((?<![A-Za-z0-9)\]])[-−])?([0-9]{1,3}(?:,[0-9]{3}){1,8}(?![0-9])|[0-9]+)(\.[0-9]+)?")
_ANCHOR = re.compile(r"answer\s*(?:is\b|:)|####", re.I)
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_STATED = re.compile(r"answer\s*(?:is\b|:)[\s:]*(?:\$\$?([^$]{1,500})\$|\\\((.{1,500}?)\\\)|\\\[(.{1,500}?)\\\]|"
                     r"([^\n]{1,500}?)(?:\.(?:\s|$)|\n|$))", re.I)


def _value(m: re.Match | None) -> fractions.Fraction | None:
    digits = m.group(2).replace(",", "") + (m.group(3) or "") if m else ""
    if not digits or len(digits) > 60:
        return None
    return -fractions.Fraction(digits) if m.group(1) else fractions.Fraction(digits)


def _numbers(text: str):
    return (v for v in map(_value, _NUM.finditer(text)) if v is not None)


def parse_number(text: str) -> fractions.Fraction | None:
    return next(_numbers(text), None)


def gsm8k_reference(answer_field: str) -> str:
    return answer_field.rsplit("####", 1)[-1].strip()


def gsm8k_extract(completion: str) -> fractions.Fraction | None:
    for m in reversed(list(_ANCHOR.finditer(completion))):
        n = _NUM.search(completion, m.end(), m.end() + 80)
        v = _value(_NUM.match(completion, n.start())) if n else None  # re-match: the number may run past 80
        if v is not None:
            return v
    v = parse_number(last_boxed(completion) or "")
    return v if v is not None else next(reversed(list(_numbers(completion))), None)


def score_gsm8k(completion: str, reference: str) -> float:
    gold, pred = parse_number(gsm8k_reference(str(reference))), gsm8k_extract(completion)
    return float(gold is not None and pred == gold)


def _braced(text: str, i: int, limit: int = 4000) -> str | None:
    """Content of the group opening at text[i] == '{' (nested braces, backslash escapes skipped), or None."""
    depth, j, end = 0, i, min(len(text), i + limit)
    while j < end:
        if text[j] == "\\":
            j += 2
            continue
        depth += (text[j] == "{") - (text[j] == "}")
        if depth == 0:
            return text[i + 1:j]
        j += 1
    return None


def last_boxed(text: str) -> str | None:
    for m in list(_BOX.finditer(text))[:-9:-1]:  # the last 8 boxes, last first
        rest = text[m.end():m.end() + 4100]
        if rest.lstrip().startswith("{"):
            content = _braced(rest, len(rest) - len(rest.lstrip()))
        else:
            bare = re.match(r"\s+([^\s${}]+)", rest)
            content = bare.group(1).rstrip(".,;") if bare else None
        if content is not None:
            return content.strip()
    return None


def math_reference(solution: str) -> str:
    box = last_boxed(solution)
    if box is None:
        raise ValueError("solution has no \\boxed{...} answer")
    return box


class _Deadline(BaseException):
    """From the SIGALRM handler; a BaseException so math_verify's ``except Exception`` lets it through."""


def _on_alarm(signum, frame):
    raise _Deadline


def _equal(gold: str, pred: str) -> bool:
    """math_verify equivalence with its signal timeouts off; bounded by one setitimer in the main thread."""
    import signal

    import math_verify

    main = threading.current_thread() is threading.main_thread()
    if main:
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, MATH_TIMEOUT_S)
    try:
        g = math_verify.parse(f"$\\boxed{{{gold}}}$", parsing_timeout=None)
        p = math_verify.parse(f"$\\boxed{{{pred}}}$", parsing_timeout=None) if g else []
        return bool(p) and math_verify.verify(g, p, timeout_seconds=None)
    except (_Deadline, Exception):
        return False
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


class _Helper:
    """One persistent process, shared by all threads, that runs :func:`_equal` in its own main thread."""

    def __init__(self):
        self.lock, self.proc, self.broken = threading.Lock(), None, False

    def _line(self, timeout: float) -> str | None:
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        return self.proc.stdout.readline().strip() if ready else None

    def _stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def equal(self, gold: str, pred: str) -> bool | None:
        """None when no helper can run (the caller then checks in-process)."""
        with self.lock:
            if not self.broken and (self.proc is None or self.proc.poll() is not None):
                self._stop()
                code = "import runpy,sys; runpy.run_path(sys.argv[1], run_name='__rewards_helper__')"
                try:
                    self.proc = subprocess.Popen([sys.executable, "-c", code, os.path.abspath(__file__)], text=True,
                                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=subprocess.DEVNULL, bufsize=1)
                    self.broken = self._line(120) != "ready"
                except (OSError, ValueError):
                    self.broken = True
            if self.broken:
                self._stop()
                return None
            try:
                self.proc.stdin.write(json.dumps([gold, pred]) + "\n")
                self.proc.stdin.flush()
                reply = self._line(MATH_TIMEOUT_S + 3)
            except (OSError, ValueError):
                reply = None
            if reply not in ("0", "1"):  # overran or died on this input: kill it, score 0, restart next call
                self._stop()
            return reply == "1"


_HELPER = _Helper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELPER.__init__)  # a forked child starts its own helper


def _serve():
    import resource

    import math_verify  # noqa: F401

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft > 4 << 30:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, hard))
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            ok = _equal(*map(str, json.loads(line)))
        except (_Deadline, Exception):
            ok = False
        print(int(ok), flush=True)


def score_math(completion: str, reference: str) -> float:
    reference = str(reference)
    if "\\boxed" in reference or "\\fbox" in reference:
        reference = last_boxed(reference) or reference
    pred = last_boxed(completion)
    if pred is None:  # the content of the last answer statement (which may sit inside an earlier one's text)
        starts = [m.start() for m in _ANCHOR.finditer(completion) if m.group() != "####"]
        stated = _STATED.match(completion, starts[-1]) if starts else None
        pred = _group(stated).strip().strip("*$ ").strip() if stated else None
    if not pred or not reference.strip() or max(len(pred), len(reference)) > _MAX_LEN:
        return 0.0
    ok = _HELPER.equal(reference, pred)
    return float(_equal(reference, pred) if ok is None else ok)


@dataclasses.dataclass(frozen=True)
class Choice:
    key: str
    labels: tuple[str, ...]
    texts: tuple[str, ...] = ()


_TOK = r"([A-Za-z0-9]+)(?![A-Za-z0-9]|\.[0-9])"
_EXPLICIT = re.compile(
    r"(?i:(?:correct|right|best|final)\s+)?(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be|must\s+be"
    r"|will\s+be)|\s*[:=])[\s*_:]*(?:(?i:option|choice)\s+)?(?:[(\[][*_]*)?" + _TOK
    + r"|(?i:option|choice|answer)\s*[(\[]?" + _TOK + r"[)\]]?\s+(?i:is\s+(?:the\s+)?(?:correct|right|best)\b)"
    + r"|\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?\(?" + _TOK)
_LEAD = re.compile(r"[\s*_]*(?:[(\[]\s*([A-Za-z0-9]+)\s*[)\]]|([A-Za-z0-9]+)[*_]*(?:[.):](?![0-9])|\s*(?:\n|$)))")
_PAREN = re.compile(r"[(\[]\s*([A-Za-z0-9]+)\s*[)\]]")


def _group(m: re.Match) -> str:
    return next(g for g in m.groups() if g is not None)


def choice_extract(completion: str, labels: Sequence[str], texts: Sequence[str] = ()) -> str | None:
    labels = [str(lab).strip() for lab in labels]
    stated = [s for s in map(_group, _EXPLICIT.finditer(completion)) if s in labels]
    if stated:
        return stated[-1]
    lead = _LEAD.match(completion)
    if lead and _group(lead) in labels:
        return _group(lead)
    if texts and len(texts) == len(labels):
        hits = {lab for lab, t in zip(labels, map(str.strip, map(str, texts)))
                if t and re.search(r"(?<!\w)" + re.escape(t) + r"(?!\w)", completion, re.I)}
        if len(hits) == 1:
            return hits.pop()
    parens = [s for s in (m.group(1) for m in _PAREN.finditer(completion)) if s in labels]
    return parens[-1] if parens else None


def score_choice(completion: str, reference: Choice | str) -> float:
    if isinstance(reference, str):
        key = reference.strip()
        reference = Choice(key, tuple("12345") if key.isdigit() else tuple("ABCDE"))
    got = choice_extract(completion, reference.labels, reference.texts)
    return float(got is not None and got == reference.key.strip())


if __name__ == "__rewards_helper__":
    _serve()


_WRAP = re.compile(r"^\\(?:text|textbf|textit|mathrm|mathbf|texttt)\s*\{(.*)\}$", re.S)


def category_extract(completion: str) -> str | None:
    """The category named in the first ``\\boxed{}`` (see the module notes), or None."""
    m = _BOX.search(completion)
    if m is None:
        return None
    rest = completion[m.end():m.end() + 400]
    if not rest.lstrip().startswith("{"):
        return None
    content = _braced(rest, len(rest) - len(rest.lstrip()), 400)
    if content is None:
        return None
    content = content.strip()
    while (w := _WRAP.match(content)) is not None:
        content = w.group(1).strip()
    content = content.strip(" \t\n*'\"`.")
    return content.lower() or None


def score_category(completion: str, reference: str) -> float:
    return 1.0 if category_extract(completion) == str(reference).strip().lower() else 0.0
