"""Hugging Face checkpoints → the common tree, and back.

Reads ``model.safetensors``, sharded ``model.safetensors.index.json`` and ``flax_model.msgpack``
(never pickle). Leaves are built one at a time from the file (safetensors slices), cast and put on
device before the next, so peak host memory stays near one copy of the weights. With a mesh every
leaf is made by ``jax.make_array_from_callback``: each device's block is read from its own slice
of the file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np

from lensjax.checkpoints import bart, gpt2, llama, opt, phi, t5
from lensjax.checkpoints.keymap import source_index, source_shape
from lensjax.config import ModelConfig, UnsupportedModelError
from lensjax.models.tree import flatten, leaf_specs, nest

FAMILIES = {"gpt2": gpt2, "opt": opt, "llama": llama, "mistral": llama, "qwen2": llama, "phi": phi, "t5": t5,
            "mt5": t5, "switch_transformers": t5, "bart": bart}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "flax_model.msgpack", "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json",
                "*.model", "*.tiktoken"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is (missing, mis-shaped or unsafe files/tensors)."""


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: dict
    tokenizer: Any = None
    path: str | None = None


# ------------------------------------------------------------------------------------ sources
class _SafetensorsSource:
    """Tensor name → (file) over one or more safetensors files; opens files per use."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.files = files  # name -> path
        self._open: dict[Path, Any] = {}

    @classmethod
    def from_dir(cls, root: Path) -> "_SafetensorsSource":
        index = root / "model.safetensors.index.json"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
            files = {name: root / fn for name, fn in wm.items()}
            for p in set(files.values()):
                if not p.exists():
                    raise CheckpointError(f"{index} names {p.name}, which is missing")
            src = cls(files)
            for p in set(files.values()):  # the index must match the files' contents
                names = set(src._handle(p).keys())
                listed = {n for n, q in files.items() if q == p}
                if listed - names:
                    raise CheckpointError(f"{p}: tensors listed in the index are missing: {sorted(listed - names)[:5]}")
            src.close()
            return src
        paths = sorted(root.glob("*.safetensors"))
        files: dict[str, Path] = {}
        src = cls(files)
        for p in paths:
            for name in src._handle(p).keys():
                files[name] = p
        src.close()
        return src

    def _handle(self, path: Path):
        h = self._open.get(path)
        if h is None:
            try:
                h = self._safe_open(str(path), framework="numpy")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            self._open[path] = h
        return h

    def names(self):
        return self.files.keys()

    def shape(self, name):
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def read(self, name, index):
        try:
            return np.asarray(self._handle(self.files[name]).get_slice(name)[index])
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({exc})") from None
        finally:
            # Unmap after every read: touched pages of the mapping would otherwise count in RSS
            # until the whole leaf is done.
            self.close()

    def close(self):
        self._open.clear()  # safe_open handles unmap when released


class _DictSource:
    """In-memory tensors (the restored ``flax_model.msgpack``), named like the PyTorch weights."""

    def __init__(self, tensors: dict[str, np.ndarray], path: Path):
        self.tensors, self.path = tensors, path

    def names(self):
        return self.tensors.keys()

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, index):
        return np.asarray(self.tensors[name][index])

    def close(self):
        pass


def _flax_to_torch_names(state: dict, path: Path) -> dict[str, np.ndarray]:
    """Flax names/layouts → PyTorch names/layouts, the rule HF's own converter uses.

    ``kernel`` → ``weight`` transposed (Flax Dense ``[in, out]`` ↔ torch Linear ``[out, in]``;
    HF's Flax GPT-2 Conv1D kernel ``[out, in]`` ↔ torch Conv1D ``[in, out]``), ``embedding`` →
    ``weight``, LayerNorm ``scale`` → ``weight``.
    """
    out = {}
    for key, value in flatten(state).items():
        parts = key.split("/")
        arr = np.asarray(value)
        if parts[-1] == "kernel":
            if arr.ndim != 2:
                raise CheckpointError(f"{path}: {key} has {arr.ndim} dims; only 2-D kernels are supported")
            parts[-1], arr = "weight", arr.T
        elif parts[-1] in ("embedding", "scale"):
            parts[-1] = "weight"
        out[".".join(parts)] = arr
    return out


# ------------------------------------------------------------------------------------ resolve
def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub id fetched with huggingface_hub (config, tokenizer and
    weight files only; never pickle files)."""
    p = Path(path_or_id)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: expected a checkpoint folder, got a file")
        return p
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
        raise CheckpointError(f"checkpoint folder not found: {p}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise CheckpointError(f"{path_or_id}: not a local folder, and fetching it from the hub failed ({exc})") from None


def _weights_source(root: Path):
    st = sorted(root.glob("*.safetensors"))
    if (root / "model.safetensors.index.json").exists() or st:
        return _SafetensorsSource.from_dir(root)
    msgpack = root / "flax_model.msgpack"
    if msgpack.exists():
        from flax.serialization import msgpack_restore

        try:
            state = msgpack_restore(msgpack.read_bytes())
        except Exception as exc:
            raise CheckpointError(f"{msgpack}: not a readable msgpack checkpoint ({exc})") from None
        return _DictSource(_flax_to_torch_names(state, msgpack), msgpack)
    pickles = sorted(q.name for q in root.iterdir() if q.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root}: only pickle checkpoints ({', '.join(pickles)}); lensjax never unpickles. Convert them to "
            "safetensors first, e.g. in PyTorch: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
            "safe_serialization=True)"
        )
    raise CheckpointError(f"{root}: no weights (model.safetensors, model.safetensors.index.json or flax_model.msgpack)")


# ------------------------------------------------------------------------------------ load
def _key_prefix(src, family_mod, cfg: ModelConfig, root: Path) -> str:
    probe = family_mod.entries(cfg)[0][1]
    names = set(src.names())
    for pre in family_mod.PREFIXES:
        if pre + probe in names:
            return pre
    raise CheckpointError(f"{root}: missing tensor {family_mod.PREFIXES[0] + probe!r} (no known prefix matches)")


def _entries(cfg: ModelConfig, pre: str):
    """(path, [source names in the order of the leaf's leading axes], lead shape, op) per leaf."""
    fam = FAMILIES[cfg.family]
    out = []
    for entry in fam.entries(cfg):
        path, key, op = entry[:3]
        full = key[1:] if key.startswith("/") else pre + key
        lead: tuple[int, ...] = ()
        names = [full]
        if "{i}" in key:
            stack = path.split("/")[0] if cfg.is_encoder_decoder else "decoder"
            layers = entry[3] if len(entry) > 3 else range(cfg.encoder_layers if stack == "encoder" else cfg.num_layers)
            layers = list(layers)
            lead = (len(layers),)
            if "{x}" in key:
                lead += (cfg.num_experts,)
                names = [full.format(i=i, x=x) for i in layers for x in range(cfg.num_experts)]
            else:
                names = [full.format(i=i) for i in layers]
        out.append((path, names, lead, op))
    return out


def adjust_config(cfg: ModelConfig, names) -> ModelConfig:
    """Family rules that depend on the file: T5-style checkpoints use ``lm_head.weight`` when it
    is there (mT5, T5 v1.1) and the shared embedding when it is not, as Hugging Face does."""
    key = getattr(FAMILIES[cfg.family], "UNTIE_IF_PRESENT", None)
    if key is not None:
        tied = key not in set(names)
        if tied != cfg.tie_word_embeddings:
            cfg = dataclasses.replace(cfg, tie_word_embeddings=tied)
    return cfg


def _plan(cfg: ModelConfig, src, root: Path):
    """For every leaf: (shape, logical axes, [source names], op, lead). Checks names and shapes."""
    fam = FAMILIES[cfg.family]
    pre = _key_prefix(src, fam, cfg, root)
    specs = leaf_specs(cfg)
    names = set(src.names())
    used, missing, plan = set(), [], {}
    for path, srcs, lead, op in _entries(cfg, pre):
        shape, axes = specs[path]
        if tuple(shape[:len(lead)]) != lead:
            raise CheckpointError(f"{root}: internal key map error for {path}: leaf {shape}, sources {lead}")
        plan[path] = (shape, axes, srcs, op, lead)
        for s in srcs:
            (used.add(s) if s in names else missing.append(s))
    if missing:
        raise CheckpointError(f"{root}: missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    missing_leaves = sorted(set(specs) - set(plan))
    if missing_leaves:
        raise CheckpointError(f"{root}: no key map entry for {', '.join(missing_leaves)} ({cfg.family})")
    ignore = [re.compile(r) for r in fam.IGNORE]
    tied_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in names - used - tied_extra if not any(r.search(n) for r in ignore))
    if unexpected:
        raise CheckpointError(f"{root}: unexpected tensors (not part of a {cfg.family} model with this config): "
                              + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
    for path, (shape, _, srcs, op, lead) in plan.items():
        want = source_shape(op, shape[len(lead):])
        for s in srcs:
            got = src.shape(s)
            if got != want:
                raise CheckpointError(f"{root}: tensor {s!r} has shape {list(got)}, expected {list(want)} "
                                      f"(for {path} of this {cfg.family} config)")
    return plan


def _leaf_reader(src, shape, srcs, op, lead, dtype) -> Callable[[tuple], np.ndarray]:
    """Reads any block of a leaf (a device's shard): one source tensor at a time for stacked leaves."""
    n = len(lead)

    def read_one(name, rest):
        sidx, tr = source_index(op, rest, shape[n:])
        b = src.read(name, sidx)
        if op == "row":
            b = b[0]
        return b.T if tr else b

    def read(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if not n:
            return np.ascontiguousarray(read_one(srcs[0], index).astype(dtype, copy=False))
        ranges = [range(*index[d].indices(lead[d])) for d in range(n)]
        rest = index[n:]
        out = None
        for pos in np.ndindex(*[len(r) for r in ranges]):  # one source tensor at a time, into the block
            flat = 0
            for d in range(n):
                flat = flat * lead[d] + ranges[d][pos[d]]
            b = read_one(srcs[flat], rest)
            if out is None:
                out = np.empty(tuple(len(r) for r in ranges) + b.shape, dtype)
            out[pos] = b
        return out

    return read


CHUNK_BYTES = 32 << 20


def _release_host_memory():
    """Return freed heap to the OS (glibc keeps freed blocks of up to 32 MB in the heap, which
    would count as resident on top of the loaded parameters). A no-op where there is no glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buf, block, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, block, start, axis=0)


def _put_chunked(read, shape, dtype) -> jax.Array:
    """Build a device array from host blocks of at most CHUNK_BYTES rows, written in place
    (donated buffer), so the host never holds more than one block of a large leaf."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    rows = max(1, int(shape[0] * CHUNK_BYTES // max(nbytes, 1)))
    if rows >= shape[0]:
        return jax.device_put(read(()))
    buf = jnp.zeros(shape, dtype)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        buf = _write_rows(buf, jax.device_put(read((slice(start, stop),))), start)
        buf.block_until_ready()
        _release_host_memory()
    return buf


def load_params(cfg: ModelConfig, root: Path, dtype="float32", mesh: jax.sharding.Mesh | None = None) -> dict:
    from lensjax.parallel import sharding_for

    dtype = jnp.dtype(dtype)
    np_dtype = np.dtype(dtype.name) if dtype.name != "bfloat16" else ml_dtypes.bfloat16
    src = _weights_source(root)
    try:
        plan = _plan(cfg, src, root)
        flat = {}
        for path, (shape, axes, srcs, op, lead) in plan.items():
            read = _leaf_reader(src, shape, srcs, op, lead, np_dtype)
            if mesh is None:
                flat[path] = _put_chunked(read, shape, dtype)
            else:
                flat[path] = jax.make_array_from_callback(shape, sharding_for(axes, mesh, shape), read)
            src.close()  # release the mapping before the next leaf
            _release_host_memory()
    finally:
        src.close()
    return nest(flat)


def load(path_or_id: str | os.PathLike, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
         tokenizer: bool = True) -> Model:
    """Load a Hugging Face causal-LM checkpoint (local folder or hub id) into the common tree.

    ``dtype``: parameter dtype ("float32" or "bfloat16"); ``mesh``: shard the parameters by the
    logical-axis rules of :mod:`lensjax.parallel`. The tokenizer (if the folder has one) is loaded
    with ``transformers.AutoTokenizer``; torch is never needed.
    """
    root = resolve(path_or_id)
    if not any(root.iterdir()):
        raise CheckpointError(f"{root}: the folder is empty")
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{root}: no config.json")
    cfg = ModelConfig.from_file(cfg_path)
    src = _weights_source(root)
    try:
        cfg = adjust_config(cfg, src.names())
    finally:
        src.close()
    params = load_params(cfg, root, dtype=dtype, mesh=mesh)
    tok = _load_tokenizer(root) if tokenizer else None
    return Model(config=cfg, params=params, tokenizer=tok, path=str(root))


def _load_tokenizer(root: Path):
    if not any((root / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root))


# ------------------------------------------------------------------------------------ save
def _to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Common tree → HF tensor names and layouts (the inverse of the key map)."""
    fam = FAMILIES[cfg.family]
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
    out: dict[str, np.ndarray] = {}
    fused: dict[str, list] = {}
    for path, names, lead, op in _entries(cfg, fam.PREFIXES[0]):
        arr = flat[path]
        blocks = arr.reshape((-1,) + arr.shape[len(lead):]) if lead else arr[None]
        for name, a in zip(names, blocks):
            if op == "id":
                out[name] = a
            elif op == "T":
                out[name] = a.T
            elif op == "row":
                out[name] = a[None]
            else:
                fused.setdefault(name, [None] * op[2])[op[1]] = a
    for name, blocks in fused.items():
        out[name] = np.concatenate(blocks, axis=-1)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save(model: Model, directory: str | os.PathLike) -> Path:
    """Write an HF-layout checkpoint (``model.safetensors`` + ``config.json`` [+ tokenizer]) that
    ``transformers`` loads. Written to a temporary folder beside ``directory`` and renamed into
    place, so a failed save leaves nothing half-written."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tensors = _to_hf(model.config, model.params)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = dict(model.config.hf_config)
        hf.setdefault("model_type", model.config.family)
        dtypes = {str(v.dtype) for v in tensors.values()}
        hf["torch_dtype"] = hf["dtype"] = "bfloat16" if "bfloat16" in dtypes else "float32"
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


__all__ = ["CheckpointError", "Model", "load", "load_params", "save", "resolve", "UnsupportedModelError"]
