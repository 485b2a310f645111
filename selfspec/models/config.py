"""`ModelConfig`: everything our decoder needs to know about an architecture, read either from GGUF
metadata or from a Hugging Face `config.json`. Frozen; built only through the two constructors
(and `from_dict`, which reads back what `to_dict` wrote into the weight cache)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from selfspec.errors import UnsupportedArchitectureError

# Families our decoder implements. GGUF names on the left, HF `model_type` values on the right.
GGUF_ARCHS = ("llama", "qwen2", "gemma2", "gemma3")
HF_ARCHS = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" (also Mistral), "qwen2", "gemma2", "gemma3"
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    # Gemma-3 uses a different RoPE base on its sliding-window layers.
    rope_theta_local: float | None = None
    # Per layer: window size for sliding-window layers, 0 for global attention.
    sliding_window: tuple[int, ...] = ()
    attn_softcap: float | None = None  # Gemma-2
    final_softcap: float | None = None  # Gemma-2
    qkv_bias: bool = False  # Qwen2
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden)
    activation: str = "silu"  # "silu" or "gelu_tanh"
    query_scale: float = 0.0  # attention score scale; 0 -> 1/sqrt(head_dim)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.sliding_window:
            object.__setattr__(self, "sliding_window", (0,) * self.n_layers)
        if not self.query_scale:
            object.__setattr__(self, "query_scale", 1.0 / math.sqrt(self.head_dim))

    @property
    def is_gemma(self) -> bool:
        return self.arch in ("gemma2", "gemma3")

    # ----------------------------------------------------------------------------------- GGUF
    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "ModelConfig":
        """`meta` maps GGUF metadata keys to plain Python values."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHS:
            raise UnsupportedArchitectureError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHS)}"
            )

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        n_layers = int(get("block_count"))
        hidden = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // n_heads)
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        common = dict(
            arch=arch,
            n_layers=n_layers,
            hidden=hidden,
            intermediate=int(get("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv") or n_heads),
            head_dim=head_dim,
            vocab_size=int(vocab),
            context_length=int(get("context_length")),
            rms_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_eos_ids(meta.get("tokenizer.ggml.eos_token_id")),
        )
        if get("rope.scaling.type") not in (None, "none"):
            raise UnsupportedArchitectureError(
                f"RoPE scaling {get('rope.scaling.type')!r} is not supported yet; supported: none"
            )
        window = int(get("attention.sliding_window") or 0)
        if arch == "llama":
            return cls(**common, sliding_window=(window,) * n_layers if window else ())
        if arch == "qwen2":
            return cls(**common, qkv_bias=True)
        gemma = dict(embed_scale=math.sqrt(hidden), activation="gelu_tanh")
        if arch == "gemma2":
            # Gemma-2 alternates local (even layers) and global attention.
            return cls(
                **common,
                **gemma,
                sliding_window=tuple(window if i % 2 == 0 else 0 for i in range(n_layers)),
                attn_softcap=float(get("attn_logit_softcapping", 50.0)),
                final_softcap=float(get("final_logit_softcapping", 30.0)),
                query_scale=1.0 / math.sqrt(float(get("attention.query_pre_attn_scalar", head_dim) or head_dim)),
            )
        # Gemma-3: every 6th layer is global, the others slide; local layers use RoPE base 10k.
        return cls(
            **common,
            **gemma,
            sliding_window=tuple(0 if (i + 1) % 6 == 0 else window for i in range(n_layers)),
            rope_theta_local=10000.0,
        )

    # ------------------------------------------------------------------------------ HF config
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """`cfg` is the parsed `config.json` of a Hugging Face model folder."""
        model_type = cfg.get("model_type")
        if model_type == "gemma3" and "text_config" in cfg:
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        arch = HF_ARCHS.get(model_type)
        if arch is None:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(HF_ARCHS)}"
            )
        rope = _hf_rope(cfg)
        n_layers = int(cfg["num_hidden_layers"])
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        eos = cfg.get("eos_token_id")
        common = dict(
            arch=arch,
            n_layers=n_layers,
            hidden=hidden,
            intermediate=int(cfg["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            context_length=int(cfg.get("max_position_embeddings", 4096)),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope["global"],
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(eos),
        )
        if arch == "llama":
            window = int(cfg.get("sliding_window") or 0)
            return cls(**common, sliding_window=(window,) * n_layers if window else (),
                       qkv_bias=bool(cfg.get("attention_bias", False)))
        if arch == "qwen2":
            window = int(cfg.get("sliding_window") or 0) if cfg.get("use_sliding_window") else 0
            if window:
                raise UnsupportedArchitectureError("Qwen2 with use_sliding_window=true is not supported")
            return cls(**common, qkv_bias=True)
        windows = _layer_windows(cfg, n_layers, arch)
        gemma = dict(
            embed_scale=math.sqrt(hidden),
            activation="gelu_tanh",
            sliding_window=windows,
            query_scale=float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        )
        if arch == "gemma2":
            return cls(**common, **gemma, attn_softcap=cfg.get("attn_logit_softcapping"),
                       final_softcap=cfg.get("final_logit_softcapping"))
        return cls(**common, **gemma, rope_theta_local=rope["local"],
                   attn_softcap=cfg.get("attn_logit_softcapping"),
                   final_softcap=cfg.get("final_logit_softcapping"))

    # --------------------------------------------------------------------- the weight cache
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; `from_dict` gives back an equal config (the weight cache's manifest)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}  # older fields: dropped
        return cls(**{**known, "sliding_window": tuple(d["sliding_window"]), "eos_token_ids": tuple(d["eos_token_ids"])})


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _hf_rope(cfg: dict[str, Any]) -> dict[str, float]:
    """RoPE bases from a config of either transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`, possibly per layer type). Scaled RoPE variants are refused, not guessed."""
    params = cfg.get("rope_parameters")
    if params is None:
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise UnsupportedArchitectureError(f"RoPE scaling {scaling!r} is not supported yet")
        theta = float(cfg.get("rope_theta", 10000.0))
        return {"global": theta, "local": float(cfg.get("rope_local_base_freq", theta))}
    per_type = params if "full_attention" in params else {"full_attention": params}
    for p in per_type.values():
        if p.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError(f"RoPE type {p['rope_type']!r} is not supported yet")
    glob = float(per_type["full_attention"].get("rope_theta", 10000.0))
    local = float(per_type.get("sliding_attention", {}).get("rope_theta", glob))
    return {"global": glob, "local": local}


def _layer_windows(cfg: dict[str, Any], n_layers: int, arch: str) -> tuple[int, ...]:
    window = int(cfg.get("sliding_window") or 0)
    types = cfg.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    if arch == "gemma2":
        return tuple(window if i % 2 == 0 else 0 for i in range(n_layers))
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return tuple(0 if (i + 1) % pattern == 0 else window for i in range(n_layers))
