"""Load a model: weights from a GGUF file (dequantised with the `gguf` package) or a Hugging Face
safetensors folder, plus its tokenizer and chat template. Never pickle, never remote code."""
from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from selfspec.cache import KVCache
from selfspec.errors import ModelLoadError, SelfspecError
from selfspec.machine import WEIGHT_BITS, resolve_dtype
from selfspec.models.config import ModelConfig
from selfspec.models.registry import REGISTRY, cache_dir
from selfspec.models.transformer import Layer, Transformer, make_linear

DEFAULT_CTX = 4096


@dataclass
class Model:
    """A loaded model: the decoder, its tokenizer, and where it came from."""

    name: str  # registry alias or file/folder name
    path: Path
    config: ModelConfig
    transformer: Transformer
    tokenizer: object  # a transformers tokenizer
    dtype: str  # "fp32" | "bf16" | "int8" | "int4"
    ctx_size: int
    load_seconds: float
    kernel: str = "F.linear"
    _cache: KVCache | None = None

    def cache(self) -> KVCache:
        """The model's KV cache, allocated once and reset for each new sequence."""
        if self._cache is None:
            self._cache = self.transformer.new_cache(self.ctx_size)
        self._cache.reset()
        return self._cache

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def encode(self, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids of a prompt: through the chat template when the model has one (unless
        chat=False), raw text otherwise. No system message unless `system` is given."""
        use_chat = self.has_chat_template if chat is None else chat
        if use_chat and not self.has_chat_template:
            raise SelfspecError(f"model {self.name!r} has no chat template; use raw text (--no-chat)")
        if use_chat:
            messages = ([{"role": "system", "content": system}] if system else [])
            messages.append({"role": "user", "content": prompt})
            return self.encode_messages(messages)
        return list(self.tokenizer(prompt).input_ids)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_model(model: str | Path, dtype: str = "auto", ctx_size: int | None = None,
               threads: int | None = None, compile: bool = False) -> Model:
    """Load `model`: a registry alias (`selfspec models`), a `.gguf` file or an HF folder.
    `dtype` int8/int4 quantises the linear layers' weights (selfspec/models/quant.py); `compile`
    wraps the decoder in torch.compile (selfspec/models/compiled.py)."""
    t0 = time.perf_counter()
    if threads is not None:
        if threads < 1:
            raise SelfspecError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch_dtype, dtype_name = resolve_dtype(dtype)
    spec = str(model)
    if spec in REGISTRY:
        path, name = REGISTRY[spec].path(), spec
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            known = ", ".join(REGISTRY)
            raise ModelLoadError(f"model {spec!r} is neither a known alias ({known}) nor an existing path")
        name = path.name
    transformer = load_transformer(path, torch_dtype, ctx_size, weight_bits=WEIGHT_BITS.get(dtype_name))
    kernel = transformer.kernel
    if compile:
        from selfspec.models.compiled import compile_transformer

        transformer = compile_transformer(transformer)
        kernel += "+" + transformer.compile_status.split(":")[0]  # compiled | compile-skipped
    tokenizer = _load_hf_tokenizer(path) if path.is_dir() else _load_gguf_tokenizer(path)
    return Model(name=name, path=path, config=transformer.config, transformer=transformer,
                 tokenizer=tokenizer, dtype=dtype_name, ctx_size=transformer.rope_max,
                 load_seconds=time.perf_counter() - t0, kernel=kernel)


def load_transformer(path: Path, dtype: torch.dtype = torch.float32, ctx_size: int | None = None,
                     weight_bits: int | None = None) -> Transformer:
    """Only the decoder of a GGUF file or HF folder (no tokenizer), with a context of `ctx_size`
    (default: min(model context, 4096)); `weight_bits` 8 or 4 quantises the linears' weights."""
    config, tensors = _read_hf_folder(path) if path.is_dir() else _read_gguf(path)
    limit = min(config.context_length, DEFAULT_CTX) if ctx_size is None else ctx_size
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
        raise SelfspecError(f"--ctx-size must be an integer >= 2, got {limit!r}")
    if limit > config.context_length:
        raise SelfspecError(f"--ctx-size {limit} exceeds the model's context of {config.context_length}")
    return _build(config, tensors, dtype, limit, weight_bits)


# ------------------------------------------------------------------------------------------ build
# Internal tensor names (per layer prefixed by "L{i}."): embed, lm_head, final_norm, attn_norm,
# wq, wk, wv (+ bq, bk, bv), wo, q_norm, k_norm, post_attn_norm, ffn_norm, w_gate, w_up, w_down,
# post_ffn_norm. Values are fp32 tensors in HF layout; Gemma norms already include the "+1".
TensorSource = dict[str, Callable[[], torch.Tensor]]


def _build(config: ModelConfig, src: TensorSource, dtype: torch.dtype, max_len: int,
           weight_bits: int | None = None) -> Transformer:
    linear = head_linear = make_linear
    if weight_bits is not None:
        from selfspec.models.quant import HEAD_BITS, quantized_linear

        linear = functools.partial(quantized_linear, bits=weight_bits)
        head_linear = functools.partial(quantized_linear, bits=HEAD_BITS)
    def get(name: str, required: bool = True) -> torch.Tensor | None:
        if name not in src:
            if required:
                raise ModelLoadError(f"the model file lacks tensor {name!r}")
            return None
        return src[name]()

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    c = config
    embed = get("embed")
    _check_shape("embed", embed, (c.vocab_size, c.hidden))
    layers = []
    for i in range(c.n_layers):
        p = f"L{i}."
        wq, wk, wv = get(p + "wq"), get(p + "wk"), get(p + "wv")
        _check_shape(p + "wq", wq, (c.n_heads * c.head_dim, c.hidden))
        _check_shape(p + "wk", wk, (c.n_kv_heads * c.head_dim, c.hidden))
        biases = [get(p + b, required=c.qkv_bias) for b in ("bq", "bk", "bv")]
        bqkv = torch.cat(biases) if c.qkv_bias else None
        gate, up = get(p + "w_gate"), get(p + "w_up")
        _check_shape(p + "w_gate", gate, (c.intermediate, c.hidden))
        b_gate, b_up = get(p + "b_gate", required=False), get(p + "b_up", required=False)
        if (b_gate is None) != (b_up is None):
            raise ModelLoadError(f"layer {i} has a bias on only one of the gate and up projections")
        b_gate_up = None if b_gate is None else torch.cat((b_gate, b_up))
        norms = {n: cast(get(p + n, required=False)) for n in ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")}
        layers.append(Layer(
            attn_norm=get(p + "attn_norm").float(),
            wqkv=linear(cast(torch.cat((wq, wk, wv))), cast(bqkv)),
            wo=linear(cast(get(p + "wo")), cast(get(p + "bo", required=False))),
            ffn_norm=get(p + "ffn_norm").float(),
            w_gate_up=linear(cast(torch.cat((gate, up))), cast(b_gate_up)),
            w_down=linear(cast(get(p + "w_down")), cast(get(p + "b_down", required=False))),
            q_norm=None if norms["q_norm"] is None else norms["q_norm"].float(),
            k_norm=None if norms["k_norm"] is None else norms["k_norm"].float(),
            post_attn_norm=None if norms["post_attn_norm"] is None else norms["post_attn_norm"].float(),
            post_ffn_norm=None if norms["post_ffn_norm"] is None else norms["post_ffn_norm"].float(),
        ))
    embed = cast(embed)
    head = get("lm_head", required=False)
    lm_head = head_linear(embed, keep_weight=True) if head is None else head_linear(cast(head))
    return Transformer(config, embed, layers, get("final_norm").float(), lm_head, max_len)


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ModelLoadError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape} from the model config")


# ------------------------------------------------------------------------------------------- GGUF
_GGUF_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
    "attn_q_norm": "q_norm", "attn_k_norm": "k_norm", "post_attention_norm": "post_attn_norm",
    "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down",
    "post_ffw_norm": "post_ffn_norm",
}


# Bias of each linear weight. Qwen2 biases q/k/v; Llama checkpoints with attention_bias or
# mlp_bias bias the output projection and the MLP too.
_BIAS_NAMES = {"wq": "bq", "wk": "bk", "wv": "bv", "wo": "bo", "w_gate": "b_gate", "w_up": "b_up",
               "w_down": "b_down"}


def _read_gguf(path: Path) -> tuple[ModelConfig, TensorSource]:
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "scores", "merges", "token_type")):
            if key.endswith("tokens"):
                meta[key] = range(len(f.data))  # only its length is needed here
            continue
        try:
            meta[key] = f.contents()
        except Exception:
            continue
    config = ModelConfig.from_gguf(meta)
    src: TensorSource = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and len(parts) == 4:
            internal = _GGUF_NAMES.get(parts[2])
            kind = parts[3]
            if internal is None:
                continue
            if kind == "bias":
                internal = _BIAS_NAMES.get(internal)
                if internal is None:
                    continue
            name = f"L{parts[1]}.{internal}"
        else:
            name = {"token_embd.weight": "embed", "output.weight": "lm_head",
                    "output_norm.weight": "final_norm"}.get(t.name)
            if name is None:
                continue
        src[name] = _gguf_loader(t, name, config)
    return config, src


def _gguf_loader(t, name: str, config: ModelConfig) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        import gguf

        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"cannot dequantise tensor {t.name} ({t.tensor_type.name}): {e}") from None
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).reshape(shape)  # own, writable memory
        if config.arch == "llama" and name.split(".")[-1] in ("wq", "wk", "bq", "bk"):
            # llama.cpp's converter permutes Q/K rows for interleaved RoPE; undo it to use the
            # rotate-half layout of HF checkpoints.
            heads = config.n_heads if name.endswith(("wq", "bq")) else config.n_kv_heads
            out = _unpermute(out, heads)
        return out

    return load


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def _load_gguf_tokenizer(path: Path):
    """transformers converts a GGUF vocabulary in seconds (25 s for Gemma's 262k); we convert once
    and keep the result in the cache folder."""
    from transformers import AutoTokenizer

    cached = cache_dir() / "tokenizers" / _file_key(path)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ModelLoadError(f"cannot read the tokenizer of {path}: {e}") from None
    tmp = cached.with_name(cached.name + ".tmp")
    tok.save_pretrained(str(tmp))
    if not cached.exists():
        tmp.rename(cached)
    return AutoTokenizer.from_pretrained(str(cached))


# ------------------------------------------------------------------------------------ HF folders
def _read_hf_folder(path: Path) -> tuple[ModelConfig, TensorSource]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} is a folder without config.json; expected a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    config = ModelConfig.from_hf_config(cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weights (pickled weights are never loaded)")
    from safetensors import safe_open

    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "wq", "self_attn.k_proj": "wk",
        "self_attn.v_proj": "wv", "self_attn.o_proj": "wo", "self_attn.q_norm": "q_norm",
        "self_attn.k_norm": "k_norm", "mlp.gate_proj": "w_gate", "mlp.up_proj": "w_up",
        "mlp.down_proj": "w_down",
    }
    if config.is_gemma:
        names |= {"post_attention_layernorm": "post_attn_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffn_norm"}
    else:
        names["post_attention_layernorm"] = "ffn_norm"
    src: TensorSource = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:
            raise ModelLoadError(f"{file} is not a readable safetensors file: {e}") from None
        for key in handle.keys():
            name = _hf_internal_name(key, names)
            if name is None:
                continue
            is_norm = name.endswith("norm")
            src[name] = (lambda h=handle, k=key, n=is_norm: _hf_tensor(h, k, n and config.is_gemma))
    return config, src


def _hf_internal_name(key: str, names: dict[str, str]) -> str | None:
    key = key.removeprefix("model.language_model.").removeprefix("model.")
    if key.startswith("layers."):
        _, idx, rest = key.split(".", 2)
        sub, _, kind = rest.rpartition(".")
        internal = names.get(sub)
        if internal is None:
            return None
        if kind == "bias":
            internal = _BIAS_NAMES.get(internal)
            if internal is None:
                return None
        return f"L{idx}.{internal}"
    return {"embed_tokens.weight": "embed", "lm_head.weight": "lm_head", "norm.weight": "final_norm"}.get(key)


def _hf_tensor(handle, key: str, gemma_norm: bool) -> torch.Tensor:
    t = handle.get_tensor(key).float()
    return t + 1.0 if gemma_norm else t  # Gemma's RMSNorm scales by (1 + w)


def _load_hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {e}") from None
