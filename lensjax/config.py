"""ModelConfig: one frozen dataclass that describes every supported model.

Read from a Hugging Face ``config.json`` (``ModelConfig.from_hf``). The forward pass branches only
on these static fields. Supported ``model_type``: decoder-only gpt2, opt, llama, mistral, qwen2,
phi; encoder-decoder t5, mt5, bart, switch_transformers. For an encoder-decoder the per-layer
fields (heads, widths, norms) describe both stacks (lensjax refuses configs whose encoder and
decoder differ in anything but the number of layers), ``num_layers`` is the decoder's depth and
``encoder_layers`` the encoder's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

SUPPORTED = ("gpt2", "opt", "llama", "mistral", "qwen2", "phi", "t5", "mt5", "bart", "switch_transformers")
ENCODER_DECODER = ("t5", "mt5", "bart", "switch_transformers")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not supported."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # KVH (= H without grouped-query attention)
    head_dim: int  # Dh
    intermediate_size: int  # F
    max_positions: int
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    pre_norm: bool = True  # False: OPT-350m's post-norm blocks
    final_norm: bool = True
    activation: str = "silu"  # "gelu_new" | "relu" | "silu" | "gelu"
    gated_mlp: bool = True  # up * act(gate)
    positions: str = "rope"  # "learned" | "rope" | "relative" (T5 buckets)
    position_offset: int = 0  # OPT's learned positions start at index 2
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm has a bias
    tie_word_embeddings: bool = False
    layer_windows: tuple[int, ...] = ()  # per-layer sliding window (0 = full attention)
    word_embed_dim: int = 0  # OPT's word_embed_proj_dim when it differs from D (project in/out)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # --- options of the other families (defaults: the decoder-only behaviour above) ---
    attn_scale: float = 0.0  # multiplier of q·k; 0: 1/sqrt(head_dim). T5: 1 (no scaling)
    inverse_layer_scale: bool = False  # GPT-2 scale_attn_by_inverse_layer_idx: scores / (layer + 1)
    rotary_dim: int = 0  # Phi's partial rotary: RoPE on the first rotary_dim dims of a head (0: all)
    parallel_block: bool = False  # Phi: x + attn(norm(x)) + mlp(norm(x)), one shared norm
    encoder_layers: int = 0  # > 0: an encoder-decoder; num_layers is then the decoder's depth
    rel_buckets: int = 0  # T5 relative-position buckets (0: none)
    rel_max_distance: int = 128
    embed_scale: float = 1.0  # BART scale_embedding: sqrt(D)
    embed_norm: bool = False  # BART layernorm_embedding after token + position embeddings
    head_scale: float = 1.0  # T5 v1.0 / Switch tied head: d_model ** -0.5 before the head
    head_bias: bool = False  # Phi lm_head.bias, BART final_logits_bias
    num_experts: int = 0  # Switch Transformers: experts per sparse layer
    expert_capacity: int = 0
    router_bias: bool = False
    encoder_sparse_step: int = 0  # Hugging Face's rule: layer i sparse iff step > 0 and (i % step == 1 or step == 1)
    decoder_sparse_step: int = 0
    decoder_start_token_id: int | None = None
    # --- how the forward pass computes (not from the checkpoint) ---
    # "" : every matmul in the parameters' dtype. "bfloat16" / "float16": mixed precision, the
    # dense layers and the head round their operands to that type and accumulate in float32
    # (lensjax.kernels.mixed; set by the training steps' compute_dtype, parameters stay float32)
    matmul_dtype: str = ""
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    # ------------------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT-350m: word_embed_proj_dim, else D)."""
        return self.word_embed_dim or self.hidden_size

    @property
    def has_projection(self) -> bool:
        return self.embed_dim != self.hidden_size

    @property
    def sliding(self) -> bool:
        return any(w > 0 for w in self.layer_windows)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_layers > 0

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def sparse_layers(self, stack: str = "decoder") -> tuple[bool, ...]:
        """Which layers of a stack hold the mixture of experts (Hugging Face Switch's rule)."""
        n = self.encoder_layers if stack == "encoder" else self.num_layers
        step = self.encoder_sparse_step if stack == "encoder" else self.decoder_sparse_step
        if not self.num_experts or step <= 0:
            return (False,) * n
        return tuple(i % step == 1 or step == 1 for i in range(n))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (tuple(e) if isinstance(e, (tuple, list)) else (int(e),))

    def __hash__(self):  # hf_config is excluded, so configs can be static jit arguments
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "hf_config"))

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UnsupportedModelError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_hf(data, source=str(path))

    @classmethod
    def from_hf(cls, c: dict[str, Any], source: str = "config") -> "ModelConfig":
        mt = c.get("model_type")
        if mt not in SUPPORTED:
            raise UnsupportedModelError(
                f"{source}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED)}"
            )
        if mt not in _BUILDERS:
            from lensjax.families import BUILDERS

            _BUILDERS.update(BUILDERS)
        return _BUILDERS[mt](c, source)


def _req(c, key, source):
    if key not in c or c[key] is None:
        raise UnsupportedModelError(f"{source}: config has no {key!r}")
    return c[key]


def _common_ids(c):
    return dict(bos_token_id=c.get("bos_token_id"), eos_token_id=_tupleize(c.get("eos_token_id")),
                pad_token_id=c.get("pad_token_id"))


def _tupleize(x):
    return tuple(x) if isinstance(x, list) else x


def _gpt2(c, source):
    # reorder_and_upcast_attn only changes where HF computes in float32; lensjax's scores are
    # always float32, so it needs nothing. The two scalings are exact options.
    if c.get("add_cross_attention"):
        raise UnsupportedModelError(f"{source}: GPT-2 with cross-attention is not supported")
    d, h = _req(c, "n_embd", source), _req(c, "n_head", source)
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(f"{source}: activation {act!r} is not supported")
    return ModelConfig(
        family="gpt2", vocab_size=_req(c, "vocab_size", source), hidden_size=d,
        num_layers=_req(c, "n_layer", source), num_heads=h, num_kv_heads=h, head_dim=d // h,
        intermediate_size=c.get("n_inner") or 4 * d, max_positions=_req(c, "n_positions", source),
        norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5), activation=act, gated_mlp=False,
        positions="learned", qkv_bias=True, o_bias=True, mlp_bias=True, norm_bias=True,
        tie_word_embeddings=c.get("tie_word_embeddings", True), layer_windows=(0,) * c["n_layer"],
        attn_scale=0.0 if c.get("scale_attn_weights", True) else 1.0,
        inverse_layer_scale=bool(c.get("scale_attn_by_inverse_layer_idx", False)),
        hf_config=dict(c), **_common_ids(c),
    )


def _opt(c, source):
    if not c.get("layer_norm_elementwise_affine", True):
        raise UnsupportedModelError(f"{source}: OPT without elementwise-affine LayerNorm is not supported")
    act = c.get("activation_function", "relu")
    if act not in ("relu", "gelu", "gelu_new"):
        raise UnsupportedModelError(f"{source}: activation {act!r} is not supported")
    d, h = _req(c, "hidden_size", source), _req(c, "num_attention_heads", source)
    pre = c.get("do_layer_norm_before", True)
    bias = c.get("enable_bias", True)
    wdim = c.get("word_embed_proj_dim") or d
    return ModelConfig(
        family="opt", vocab_size=_req(c, "vocab_size", source), hidden_size=d,
        num_layers=_req(c, "num_hidden_layers", source), num_heads=h, num_kv_heads=h, head_dim=d // h,
        intermediate_size=_req(c, "ffn_dim", source), max_positions=_req(c, "max_position_embeddings", source),
        norm="layernorm", norm_eps=1e-5, pre_norm=pre, final_norm=pre and not c.get("_remove_final_layer_norm", False),
        activation=act, gated_mlp=False, positions="learned", position_offset=2,
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, norm_bias=True,
        tie_word_embeddings=c.get("tie_word_embeddings", True), layer_windows=(0,) * c["num_hidden_layers"],
        word_embed_dim=wdim if wdim != d else 0, hf_config=dict(c), **_common_ids(c),
    )


def _rope(c, source, partial=False):
    params = c.get("rope_parameters") or {}
    legacy = c.get("rope_scaling") or {}
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", c.get("rope_theta", 10000.0))
    rtype = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rtype not in ROPE_TYPES:
        raise UnsupportedModelError(f"{source}: rope type {rtype!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if merged.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0 and not partial:
        raise UnsupportedModelError(f"{source}: partial rotary embeddings are not supported for this family")
    out = dict(rope_theta=float(theta), rope_type=rtype, rope_factor=float(merged.get("factor", 1.0)))
    if rtype == "llama3":
        out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
                   rope_high_freq_factor=float(merged["high_freq_factor"]),
                   rope_original_max_positions=int(merged["original_max_position_embeddings"]))
    return out


def _llama_like(c, source, family):
    d, h = _req(c, "hidden_size", source), _req(c, "num_attention_heads", source)
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_new", "relu", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(f"{source}: activation {act!r} is not supported")
    n_layers = _req(c, "num_hidden_layers", source)
    windows = (0,) * n_layers
    if family == "mistral" and c.get("sliding_window"):
        windows = (int(c["sliding_window"]),) * n_layers
    if family == "qwen2" and c.get("use_sliding_window") and c.get("sliding_window"):
        types = c.get("layer_types") or [
            "sliding_attention" if i >= c.get("max_window_layers", n_layers) else "full_attention" for i in range(n_layers)
        ]
        windows = tuple(int(c["sliding_window"]) if t == "sliding_attention" else 0 for t in types)
    qkv_bias = c.get("attention_bias", False) if family != "qwen2" else True
    return ModelConfig(
        family=family, vocab_size=_req(c, "vocab_size", source), hidden_size=d, num_layers=n_layers,
        num_heads=h, num_kv_heads=c.get("num_key_value_heads") or h, head_dim=c.get("head_dim") or d // h,
        intermediate_size=_req(c, "intermediate_size", source),
        max_positions=_req(c, "max_position_embeddings", source), norm="rmsnorm",
        norm_eps=c.get("rms_norm_eps", 1e-6), activation=act, gated_mlp=True, positions="rope",
        qkv_bias=qkv_bias, o_bias=c.get("attention_bias", False) if family != "qwen2" else False,
        mlp_bias=c.get("mlp_bias", False), tie_word_embeddings=c.get("tie_word_embeddings", False),
        layer_windows=windows, hf_config=dict(c), **_rope(c, source), **_common_ids(c),
    )


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_compute_dtype(compute_dtype: str) -> None:
    """A training step's ``compute_dtype``: "float32" or a mixed-precision type."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16; got {compute_dtype!r}")


def compute_config(config: ModelConfig, compute_dtype: str = "float32") -> ModelConfig:
    """``config`` set to compute its matmuls in ``compute_dtype``: "float32" (as loaded) or
    "bfloat16" / "float16" (mixed precision: :attr:`ModelConfig.matmul_dtype`)."""
    check_compute_dtype(compute_dtype)
    return dataclasses.replace(config, matmul_dtype="" if compute_dtype == "float32" else compute_dtype)


_BUILDERS = {
    "gpt2": _gpt2,
    "opt": _opt,
    "llama": lambda c, s: _llama_like(c, s, "llama"),
    "mistral": lambda c, s: _llama_like(c, s, "mistral"),
    "qwen2": lambda c, s: _llama_like(c, s, "qwen2"),
}
