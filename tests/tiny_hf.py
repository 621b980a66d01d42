"""Tiny random Hugging Face PyTorch models, saved as safetensors, for parity tests (offline)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128


ENCODER_DECODER = ("t5", "t5v11", "mt5", "bart", "switch")


def config_for(family: str, *, gqa: bool = True, tied: bool | None = None, rope: str | None = None,
               sliding: int | None = None, max_pos: int = 64, scale_embedding: bool = False,
               inverse_layer: bool = False, capacity: int = 64, layers: int = 2):
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    t5_shape = dict(d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)
    if family == "gpt2":
        c = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=max_pos, scale_attn_by_inverse_layer_idx=inverse_layer,
                          reorder_and_upcast_attn=inverse_layer, **common)
    elif family == "t5":
        c = tf.T5Config(**t5_shape, **common)
    elif family == "t5v11":
        c = tf.T5Config(**t5_shape, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common)
    elif family == "mt5":
        c = tf.MT5Config(**t5_shape, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common)
    elif family == "switch":
        c = tf.SwitchTransformersConfig(**t5_shape, num_experts=4, expert_capacity=capacity,
                                        num_sparse_encoder_layers=layers // 2, num_sparse_decoder_layers=layers // 2,
                                        router_jitter_noise=0.0, **common)
    elif family == "bart":
        c = tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=max_pos,
                          scale_embedding=scale_embedding, decoder_start_token_id=2, forced_eos_token_id=None,
                          forced_bos_token_id=None, **common)
    elif family == "phi":
        c = tf.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=max_pos, partial_rotary_factor=0.5, **common)
    elif family in ("opt", "opt350m"):
        c = tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=max_pos, word_embed_proj_dim=16 if family == "opt350m" else 32,
                         do_layer_norm_before=family != "opt350m", **common)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2 if gqa else 4, max_position_embeddings=max_pos, head_dim=8, **common)
        if family == "mistral":
            kw["sliding_window"] = sliding
        if family == "qwen2" and sliding:
            kw.update(use_sliding_window=True, sliding_window=sliding, max_window_layers=1)
        if rope == "linear":
            kw["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
        elif rope == "dynamic":
            kw["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
        elif rope == "llama3":
            kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        c = cls(**kw)
    if tied is not None:
        c.tie_word_embeddings = tied
    return c


def make(family: str, directory, seed: int = 0, **kw):
    """Build, perturb (so biases and norms are not trivially 0/1) and save a tiny model.

    Encoder-decoders whose hub checkpoints have their own head (T5 v1.1, mT5) get an untied
    ``lm_head`` (transformers 5 builds them tied); BART's ``final_logits_bias`` (a buffer) is
    perturbed too. Switch's router is scaled up so that the experts differ in load."""
    torch.manual_seed(seed)
    cfg = config_for(family, **kw)
    auto = tf.AutoModelForSeq2SeqLM if family in ENCODER_DECODER else tf.AutoModelForCausalLM
    model = auto.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        if family in ("t5v11", "mt5"):
            model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
            model.config.tie_word_embeddings = False
        for name, p in model.named_parameters():
            p.add_((2.0 if "router" in name else 0.2) * torch.randn_like(p))
        if family == "bart":
            model.final_logits_bias.add_(0.5 * torch.randn_like(model.final_logits_bias))
    if family in ("t5v11", "mt5"):  # save_pretrained would drop the head as a tied copy
        from safetensors.torch import save_file

        model.save_pretrained(str(directory))
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not k.endswith("embed_tokens.weight")}
        save_file(state, str(directory / "model.safetensors") if hasattr(directory, "joinpath")
                  else f"{directory}/model.safetensors", metadata={"format": "pt"})
    else:
        model.save_pretrained(str(directory))
    return model


def left_padded_batch(rng, batch=3, length=12, pad_id=0):
    """Random ids [B, T] with rows of different lengths, left padded, and the mask."""
    import numpy as np

    ids = rng.integers(3, VOCAB, size=(batch, length))
    mask = np.ones((batch, length), bool)
    for b in range(1, batch):
        mask[b, : 2 * b + 1] = False
    ids[~mask] = pad_id
    return ids, mask


def hf_positions(mask):
    """Positions as HF generate computes them: cumsum(mask) - 1, padding set to 1."""
    import numpy as np

    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask, pos, 1)


def char_tokenizer():
    """A character-level fast tokenizer built offline (ids 0-2: pad, bos, eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789+-*=abcdefghijklmnopqrstuvwxyz ?.,")
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>"] + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()  # characters join without spaces when decoding
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_with_tokenizer(family, directory, **kw):
    model = make(family, directory, **kw)
    char_tokenizer().save_pretrained(str(directory))
    return model


def write_addition_jsonl(path, n=400, seed=0):
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.integers(0, 50, 2)
            fh.write(json.dumps({"input": f"{a}+{b}=", "target": str(a + b)}) + "\n")
    return path
