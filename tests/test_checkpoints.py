"""Checkpoint formats and bad input: msgpack fixtures from HF's Flax code, sharded safetensors,
and clear errors naming the file or tensor."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lensjax
from lensjax import CheckpointError, UnsupportedModelError
from tiny_hf import make

FIXTURES = Path(__file__).parent / "fixtures" / "flax"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_flax_msgpack_fixture_matches_hf_flax_logits(family):
    """Fixtures and reference logits made by transformers 4.46 Flax code (scripts/make_flax_fixture.py)."""
    ref = np.load(FIXTURES / family / "reference.npz")
    model = lensjax.load(FIXTURES / family)
    got = np.asarray(lensjax.forward(model.config, model.params, ref["input_ids"]))
    np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=0)


def test_flax_msgpack_t5_fixture_matches_hf_flax_logits():
    """A T5 v1.0 flax_model.msgpack written by HF's Flax T5 (transformers 4.46), padded encoder."""
    ref = np.load(FIXTURES / "t5" / "reference.npz")
    model = lensjax.load(FIXTURES / "t5")
    assert model.config.family == "t5" and model.config.tie_word_embeddings and model.config.head_scale != 1.0
    got = np.asarray(lensjax.forward(model.config, model.params, ref["input_ids"], ref["attention_mask"],
                                     decoder_input_ids=ref["decoder_input_ids"]))
    np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "switch"])
def test_sharded_safetensors_index(tmp_path, family):
    from tiny_hf import ENCODER_DECODER

    hf = make(family, tmp_path / "one")
    tensors = load_file(str(tmp_path / "one" / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(tmp_path / "one" / "config.json", out / "config.json")
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wm = {}
    for fn, ns in parts.items():
        save_file({n: tensors[n] for n in ns}, str(out / fn), metadata={"format": "pt"})
        wm.update({n: fn for n in ns})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    a, b = lensjax.load(tmp_path / "one"), lensjax.load(out)
    ids = np.arange(3, 13)[None]
    kw = dict(decoder_input_ids=ids[:, :4]) if family in ENCODER_DECODER else {}
    np.testing.assert_array_equal(np.asarray(lensjax.forward(a.config, a.params, ids, **kw)),
                                  np.asarray(lensjax.forward(b.config, b.params, ids, **kw)))
    del hf


@pytest.fixture
def llama_dir(tmp_path):
    make("llama", tmp_path / "m")
    return tmp_path / "m"


def _rewrite(d, fn):
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_unsupported_family(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"] = "bert"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'bert' is not supported; supported: gpt2, opt, llama, mistral, qwen2"):
        lensjax.load(llama_dir)


def test_missing_tensor(llama_dir):
    _rewrite(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        lensjax.load(llama_dir)


def test_unexpected_tensor(llama_dir):
    _rewrite(llama_dir, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model\.layers\.0\.extra\.weight"):
        lensjax.load(llama_dir)


def test_misshaped_tensor(llama_dir):
    _rewrite(llama_dir, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((8, 32), np.float32)))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[8, 32\], expected \[16, 32\]"):
        lensjax.load(llama_dir)


def test_pickle_only_checkpoint_is_refused_without_unpickling(llama_dir):
    os.remove(llama_dir / "model.safetensors")
    # A file that would run code if unpickled: the loader must not open it.
    (llama_dir / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch PWNED'\ntR.")
    with pytest.raises(CheckpointError, match=r"only pickle checkpoints \(pytorch_model\.bin\).*never unpickles.*safetensors"):
        lensjax.load(llama_dir)
    assert not Path("PWNED").exists()


def test_corrupt_safetensors(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        lensjax.load(llama_dir)


def test_truncated_safetensors(llama_dir):
    p = llama_dir / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        lensjax.load(llama_dir)


def test_empty_directory_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty"):
        lensjax.load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"not found"):
        lensjax.load(tmp_path / "nope")


def test_no_config(llama_dir):
    os.remove(llama_dir / "config.json")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        lensjax.load(llama_dir)
