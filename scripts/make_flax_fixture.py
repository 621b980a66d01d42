"""Make tiny Hugging Face ``flax_model.msgpack`` fixtures with the real HF Flax code.

The fixtures under ``tests/fixtures/flax/{gpt2,llama,t5}/`` exercise lensjax's msgpack loader
against checkpoints written by Hugging Face's own ``FlaxPreTrainedModel.save_pretrained``, with
reference logits computed by the HF Flax model itself. transformers 5 dropped the Flax models,
so this script runs in a separate throwaway virtualenv (outside the repo) with transformers 4.x:

    python3 -m venv /tmp/flaxvenv
    /tmp/flaxvenv/bin/pip install "transformers==4.46.3" "flax==0.8.5" \\
        "jax==0.4.30" "jaxlib==0.4.30" "numpy<2"
    HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu /tmp/flaxvenv/bin/python scripts/make_flax_fixture.py

(run from the repository root; ``--out DIR`` changes the output root, default
``tests/fixtures/flax``; ``--only t5`` makes one fixture). The committed files were produced with Python 3.11.7,
transformers 4.46.3, flax 0.8.5, jax/jaxlib 0.4.30, numpy 1.26.4, on CPU.

Nothing is downloaded: both models are built from a config with random weights (seed 0).
``initializer_range`` is raised to 0.2 so that the logits are far from zero (GPT-2's attention/MLP
Conv1D kernels, whose HF init ignores ``initializer_range``, are multiplied by 10 to reach the same
std), and every bias and norm parameter (which HF initialises to 0 or 1) gets deterministic noise
(std 0.1) added, so that a loader that swaps, drops or transposes any tensor gives different
logits. The perturbed params are assigned to ``model.params`` before ``save_pretrained``.

Each output folder holds
  * ``config.json``, ``generation_config.json`` and ``flax_model.msgpack``: written by
    ``save_pretrained``;
  * ``reference.npz`` with
      - ``input_ids``     int32   [2, 8]        (no padding; the attention mask is all ones),
      - ``logits``        float32 [2, 8, 128]   from the HF Flax model,
      - ``hidden_states`` float32 [L+1, 2, 8, d] HF ``output_hidden_states`` (L = 2): index 0 is
        the embedding output (GPT-2: wte + wpe), index i (1 <= i < L) the residual stream after
        block i-1, and index L is the output of the last block WITH the final norm (GPT-2
        ``ln_f`` / Llama ``norm``) applied, as HF Flax does; the un-normed last-block output is
        not stored.

The ``t5`` fixture (T5 v1.0: ReLU FFN, tied head with the d_model^-0.5 rescale, relative-position
buckets) stores instead ``input_ids`` int32 [2, 8] with ``attention_mask`` (row 1 right-padded
after 5 tokens, as T5's tokenizer pads), ``decoder_input_ids`` int32 [2, 5] (start token 0
first) and ``logits`` float32 [2, 5, 128] of the HF Flax T5 decoder.

The script then reloads each folder with ``from_pretrained`` and checks that the logits match.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from transformers import (  # noqa: E402
    FlaxGPT2LMHeadModel,
    FlaxLlamaForCausalLM,
    FlaxT5ForConditionalGeneration,
    GPT2Config,
    LlamaConfig,
    T5Config,
)

INPUT_IDS = np.array([[5, 17, 33, 2, 99, 64, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.int32)


def gpt2_model():
    config = GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return FlaxGPT2LMHeadModel(config, seed=0, dtype=jnp.float32)


def llama_model():
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return FlaxLlamaForCausalLM(config, seed=0, dtype=jnp.float32)


def t5_model():
    config = T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )
    return FlaxT5ForConditionalGeneration(config, seed=0, dtype=jnp.float32)


T5_MASK = np.array([[1] * 8, [1] * 5 + [0] * 3], dtype=np.int32)
T5_DECODER = np.array([[0, 9, 18, 27, 36], [0, 101, 3, 77, 64]], dtype=np.int32)


def make_t5(out_root: Path, seed: int):
    out_dir = out_root / "t5"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = t5_model()
    model.params = perturb_params(model.params, seed)
    model.save_pretrained(out_dir)
    ids = np.where(T5_MASK == 1, INPUT_IDS, 0).astype(np.int32)

    def logits_of(m):
        out = m(jnp.asarray(ids), attention_mask=jnp.asarray(T5_MASK), decoder_input_ids=jnp.asarray(T5_DECODER))
        return np.asarray(out.logits, dtype=np.float32)

    logits = logits_of(model)
    assert logits.shape == (2, 5, 128) and np.std(logits) > 0.1, (logits.shape, np.std(logits))
    np.savez(out_dir / "reference.npz", input_ids=ids, attention_mask=T5_MASK, decoder_input_ids=T5_DECODER,
             logits=logits)
    reloaded = FlaxT5ForConditionalGeneration.from_pretrained(out_dir, dtype=jnp.float32)
    np.testing.assert_allclose(logits_of(reloaded), logits, rtol=1e-6, atol=1e-6)
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    print(f"t5: logits std {np.std(logits):.3f}, reload OK, files {sizes}")


def perturb_params(params, seed: int, kernel_scale: float = 1.0):
    """Add noise to biases and norm parameters (HF initialises them to exactly 0 or 1).

    ``kernel_scale`` multiplies every Dense/Conv1D ``kernel``: HF's Flax GPT-2 ``FlaxConv1D``
    ignores ``initializer_range`` (hard-coded std 0.02), which leaves the blocks nearly inert.
    """
    flat = flatten_dict(params)
    rng = np.random.default_rng(seed)
    out = {}
    for path, value in sorted(flat.items()):
        value = np.asarray(value)
        leaf = path[-1]
        is_norm = any("ln" in p or "norm" in p for p in path)
        if leaf == "bias" or (is_norm and leaf in ("scale", "weight")):
            value = value + rng.normal(0.0, 0.1, size=value.shape).astype(value.dtype)
        elif leaf == "kernel":
            value = value * kernel_scale
        out[path] = jnp.asarray(value, dtype=jnp.float32)
    return unflatten_dict(out)


def run(model):
    out = model(
        jnp.asarray(INPUT_IDS),
        attention_mask=jnp.ones_like(INPUT_IDS),
        output_hidden_states=True,
    )
    logits = np.asarray(out.logits, dtype=np.float32)
    hidden = np.stack([np.asarray(h, dtype=np.float32) for h in out.hidden_states])
    return logits, hidden


def make(name, build, cls, out_root: Path, seed: int, kernel_scale: float = 1.0):
    out_dir = out_root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build()
    model.params = perturb_params(model.params, seed, kernel_scale)
    model.save_pretrained(out_dir)
    logits, hidden = run(model)
    assert logits.shape == (2, 8, 128), logits.shape
    assert np.all(np.isfinite(logits)) and np.std(logits) > 0.1, np.std(logits)
    np.savez(out_dir / "reference.npz", input_ids=INPUT_IDS, logits=logits, hidden_states=hidden)

    reloaded = cls.from_pretrained(out_dir, dtype=jnp.float32)
    logits2, _ = run(reloaded)
    np.testing.assert_allclose(logits2, logits, rtol=1e-6, atol=1e-6)
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    print(f"{name}: logits std {np.std(logits):.3f}, reload OK, files {sizes}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/flax"))
    parser.add_argument("--only", choices=("gpt2", "llama", "t5"), action="append")
    args = parser.parse_args()
    only = set(args.only or ("gpt2", "llama", "t5"))
    print("jax", jax.__version__)
    # GPT-2 Conv1D kernels: std 0.02 -> 0.2, to match initializer_range.
    if "gpt2" in only:
        make("gpt2", gpt2_model, FlaxGPT2LMHeadModel, args.out, seed=1, kernel_scale=10.0)
    if "llama" in only:
        make("llama", llama_model, FlaxLlamaForCausalLM, args.out, seed=2)
    if "t5" in only:
        make_t5(args.out, seed=3)


if __name__ == "__main__":
    main()
