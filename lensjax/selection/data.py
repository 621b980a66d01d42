"""Fine-tuning data: prompt/target pairs from Hugging Face ``datasets`` (hub name or local
json/jsonl/csv/parquet), tokenised per candidate, batched with bucketed lengths."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
LENGTH_BUCKET = 16
MAX_HELD_OUT = 1000  # default cap of a dataset's own validation/test split


class DataError(ValueError):
    """A dataset that cannot be used as asked."""


@dataclasses.dataclass(frozen=True)
class Pairs:
    prompts: tuple[str, ...]
    targets: tuple[str, ...]

    def __len__(self):
        return len(self.prompts)

    def take(self, idx) -> "Pairs":
        return Pairs(tuple(self.prompts[i] for i in idx), tuple(self.targets[i] for i in idx))


def load_pairs(name_or_path: str, *, prompt_column: str = "input", target_column: str = "target",
               split: str = "train", eval_split: str | None = None, n_eval: int | None = None,
               seed: int = 0) -> tuple[Pairs, Pairs]:
    """(train, held-out) pairs. The held-out split is ``eval_split``, else the dataset's
    "validation" or "test" split, capped at ``n_eval`` examples (default 1,000) drawn with the fixed
    ``seed``; else ``n_eval`` examples (default 10%, at most 500) split off the training data with
    the fixed seed."""
    import datasets

    p = Path(name_or_path)
    try:
        if p.exists():
            fmt = LOCAL_FORMATS.get(p.suffix.lower())
            if fmt is None:
                raise DataError(f"{p}: unsupported file type {p.suffix!r}; use one of {sorted(LOCAL_FORMATS)}")
            ds = datasets.load_dataset(fmt, data_files=str(p))
        else:
            ds = datasets.load_dataset(str(name_or_path))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot load dataset {name_or_path!r}: {exc}") from None
    if split not in ds:
        raise DataError(f"dataset {name_or_path!r} has no split {split!r} (has {sorted(ds)})")
    train = ds[split]
    cols = train.column_names
    for col, what in ((prompt_column, "prompt"), (target_column, "target")):
        if col not in cols:
            raise DataError(f"dataset {name_or_path!r} has no {what} column {col!r}; its columns are {cols}")
    if len(train) == 0:
        raise DataError(f"dataset {name_or_path!r} split {split!r} is empty")
    held_name = eval_split or next((s for s in ("validation", "test") if s in ds and s != split), None)

    def pairs(d) -> Pairs:
        return Pairs(tuple(str(x) for x in d[prompt_column]), tuple(str(x) for x in d[target_column]))

    if held_name is not None:
        if held_name not in ds:
            raise DataError(f"dataset {name_or_path!r} has no split {held_name!r}")
        held = pairs(ds[held_name])
        if len(held) == 0:
            raise DataError(f"dataset {name_or_path!r} split {held_name!r} is empty")
        cap = MAX_HELD_OUT if n_eval is None else n_eval
        if cap <= 0:
            raise DataError(f"n_eval must be > 0; got {cap}")
        if len(held) > cap:
            held = held.take(np.sort(np.random.default_rng(seed).permutation(len(held))[:cap]))
        return pairs(train), held
    allp = pairs(train)
    n = len(allp)
    k = n_eval if n_eval is not None else min(500, max(1, n // 10))
    if not 0 < k < n:
        raise DataError(f"dataset {name_or_path!r} has {n} examples: too few to hold out {k} for evaluation")
    order = np.random.default_rng(seed).permutation(n)
    return allp.take(order[k:]), allp.take(order[:k])


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """Token ids per example, with the number of prompt tokens (the rest is the target).

    ``decoder_start`` set: an encoder-decoder's data — the prompt feeds the encoder and the
    decoder reads ``decoder_start`` then the target (teacher forcing)."""

    ids: tuple[tuple[int, ...], ...]
    n_prompt: tuple[int, ...]
    decoder_start: int | None = None

    def __len__(self):
        return len(self.ids)

    @property
    def mean_tokens(self) -> float:
        return float(np.mean([len(x) for x in self.ids]))


def tokenize(tokenizer, pairs: Pairs, max_len: int = 128, add_eos: bool = True,
             decoder_start: int | None = None) -> Tokenized:
    """prompt + target (+ EOS) per example; the prompt is cut from the left when the example is
    longer than ``max_len`` (the target is kept whole up to ``max_len``).

    With ``decoder_start`` (an encoder-decoder's ``decoder_start_token_id``) the prompt (its last
    ``max_len`` tokens, an EOS if it is empty) is the encoder input and the target (+ EOS) is cut
    to ``max_len − 1`` so that the start token and the target fit the same length."""
    if tokenizer is None:
        raise DataError("the model has no tokenizer (tokenizer.json / tokenizer_config.json in its folder)")
    p_ids = tokenizer(list(pairs.prompts), add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(list(pairs.targets), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    ids, n_prompt = [], []
    if decoder_start is not None:
        for p, t in zip(p_ids, t_ids):
            p = list(p)[-max_len:] or (eos or [tokenizer.pad_token_id or 0])[:1]
            t = (list(t) + eos)[: max_len - 1]
            ids.append(tuple(p + t))
            n_prompt.append(len(p))
        return Tokenized(tuple(ids), tuple(n_prompt), int(decoder_start))
    for p, t in zip(p_ids, t_ids):
        t = (list(t) + eos)[:max_len]
        p = list(p)[max(0, len(p) - (max_len - len(t))):] if len(t) < max_len else []
        if not p:  # at least one context token, so the first target token is scored
            p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (eos or [0])[0]]
            t = t[: max_len - 1]
        ids.append(tuple(p + t))
        n_prompt.append(len(p))
    return Tokenized(tuple(ids), tuple(n_prompt))


def bucket(n: int, multiple: int = LENGTH_BUCKET) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def scored_count(tok: Tokenized, i: int) -> int:
    """How many of example i's target tokens a batch scores (positions t ≥ 1: a decoder-only
    sequence's first token has no logits before it; an encoder-decoder's decoder start is not a
    target): the rows of ``logit_pos`` that example needs (:func:`lensjax.models.lm.logit_positions`)."""
    n, p = len(tok.ids[i]), tok.n_prompt[i]
    return n - p if tok.decoder_start is not None else n - max(p, 1)


def make_batch(tok: Tokenized, idx, pad_id: int = 0, length: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded arrays ``ids``, ``attn``, ``target`` [B, bucket(max length)].

    Encoder-decoder data: ``ids``/``attn`` [B, Te] are the encoder input and ``dec_ids``,
    ``dec_attn``, ``dec_target`` [B, Td] the decoder's (start token, then the target; every target
    token counts). ``length`` fixes both lengths."""
    if tok.decoder_start is not None:
        return _make_encdec_batch(tok, idx, pad_id, length)
    rows = [tok.ids[i] for i in idx]
    T = length or bucket(max(len(r) for r in rows))
    ids = np.full((len(rows), T), pad_id, np.int32)
    attn = np.zeros((len(rows), T), bool)
    target = np.zeros((len(rows), T), bool)
    for b, (i, r) in enumerate(zip(idx, rows)):
        ids[b, : len(r)] = r
        attn[b, : len(r)] = True
        target[b, tok.n_prompt[i]: len(r)] = True
    return {"ids": ids, "attn": attn, "target": target}


def _make_encdec_batch(tok: Tokenized, idx, pad_id, length):
    enc = [tok.ids[i][: tok.n_prompt[i]] for i in idx]
    dec = [(tok.decoder_start,) + tuple(tok.ids[i][tok.n_prompt[i]:]) for i in idx]
    out = {}
    for name, rows in (("", enc), ("dec_", dec)):
        T = length or bucket(max(len(r) for r in rows))
        ids = np.full((len(rows), T), pad_id, np.int32)
        attn = np.zeros((len(rows), T), bool)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
            attn[b, : len(r)] = True
        out[name + "ids"], out[name + "attn"] = ids, attn
    out["dec_target"] = out["dec_attn"].copy()
    out["dec_target"][:, 0] = False  # the start token is context, not a target
    return out
