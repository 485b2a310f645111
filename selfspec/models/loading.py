"""Load a model: weights from a GGUF file (dequantised with the `gguf` package) or a Hugging Face
safetensors folder, plus its tokenizer and chat template. Never pickle, never remote code."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from selfspec.kv_cache import KVCache
from selfspec.hardware import CPU, check_cpu_only, device_dtype, resolve_device, set_threads
from selfspec.errors import ModelLoadError, SelfspecError
from selfspec.hardware import NATIVE_DTYPES, WEIGHT_BITS, resolve_dtype
from selfspec.models.config import ModelConfig
from selfspec.paths import cache_dir
from selfspec.models.registry import REGISTRY
from selfspec.models.transformer import Layer, Transformer, make_linear

DEFAULT_CTX = 4096


@dataclass
class Model:
    """A loaded model: the decoder, its tokenizer, and where it came from."""

    name: str  # registry alias or file/folder name
    path: Path
    config: ModelConfig
    transformer: Transformer
    tokenizer: object  # a transformers tokenizer, or the light one (selfspec/models/light_tokenizer.py)
    dtype: str  # "fp32" | "bf16" | "int8" | "int4" | "native" | "native-q8"
    ctx_size: int
    load_seconds: float
    kernel: str = "F.linear"
    isa: str = ""  # instruction-set family of the kernels (selfspec.hardware.isa)
    dtype_reason: str = ""  # why this dtype (`--dtype auto`'s reason, or "asked for")
    # Where the load's time went: weights_seconds, tokenizer_seconds, which tokenizer (tokenizer:
    # "light" or "transformers") and what the weight cache did (weight_cache: "hit", "written",
    # "not written" or "off").
    load_info: dict = field(default_factory=dict)
    _cache: KVCache | None = None

    def fresh_cache(self) -> KVCache:
        """The model's KV cache, allocated once, reset (emptied) for a new sequence."""
        cache = self.kv_cache()
        cache.reset()
        return cache

    def kv_cache(self) -> KVCache:
        """The same cache as its last user left it (for `selfspec.prefix.PrefixCache`, which
        knows whether that was itself)."""
        if self._cache is None:
            self._cache = self.transformer.new_cache(self.ctx_size)
        return self._cache

    @property
    def device(self) -> torch.device:
        return self.transformer.device

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
               threads: int | None = None, compile: bool = False, device: str = "auto") -> Model:
    """Load `model`: a registry alias (`selfspec models`), a `.gguf` file or an HF folder.
    `dtype` int8/int4 quantises the linear layers' weights (selfspec/models/quant.py); `compile`
    wraps the decoder in torch.compile (selfspec/models/compiled.py). The weights come from the
    weight cache when it has them (selfspec/models/weightcache.py). `device`: cpu, cuda or auto
    (selfspec/hardware.py; on CUDA, dtype auto is bf16)."""
    t0 = time.perf_counter()
    set_threads(threads)  # process-wide; kept for library callers that pass `threads`
    dev = resolve_device(device)
    path, name = model_path(model)
    asked = device_dtype(dtype, dev)
    auto_reason = None
    if asked == "auto":  # the CPU
        asked, auto_reason = auto_cpu_dtype(path)
    torch_dtype, dtype_name = resolve_dtype(asked)
    info: dict = {}
    transformer = load_transformer(path, torch_dtype, ctx_size, weight_bits=WEIGHT_BITS.get(dtype_name), info=info,
                                   device=dev, native=dtype_name in NATIVE_DTYPES,
                                   q8=dtype_name == "native-q8")
    isa = dtype_reason = ""
    if dev.type == "cpu":
        from selfspec import kernels
        from selfspec.hardware import isa as machine_isa

        attention = "fixed-order-attention" if kernels.kernel_status() == "fixed-order-c" else "torch-rowwise-attention"
        kernel = f"{transformer.kernel}+{attention}" + ("+fused-layers" if transformer.fused is not None else "")
        isa = machine_isa()
        dtype_reason = auto_reason or f"--dtype {dtype} as asked"
    else:
        kernel = transformer.kernel
        dtype_reason = f"{dtype_name} on {dev.type}" + (" (--dtype auto)" if dtype == "auto" else "")
    if compile:
        from selfspec.models.compiled import compile_transformer

        transformer = compile_transformer(transformer)  # on CUDA: inductor's Triton kernels
        kernel += "+" + transformer.compile_status.split(":")[0]  # compiled | compile-skipped
    # One after the other: on a second thread the tokenizer (then mostly `import transformers`) and the
    # weights (safetensors reads hold the GIL; prepacking takes both cores) slowed each other down
    # more than they overlapped (docs/benchmarks.md, "Start-up and multi-turn").
    t = time.perf_counter()
    tokenizer = tokenizer_at(path)
    info["tokenizer_seconds"] = time.perf_counter() - t
    info["tokenizer"] = getattr(tokenizer, "kind", "transformers")
    return Model(name=name, path=path, config=transformer.config, transformer=transformer,
                 tokenizer=tokenizer, dtype=dtype_name, ctx_size=transformer.rope_max,
                 load_seconds=time.perf_counter() - t0, kernel=kernel, isa=isa, dtype_reason=dtype_reason,
                 load_info=info)


def auto_cpu_dtype(path: Path) -> tuple[str, str]:
    """What `--dtype auto` loads on the CPU, and why: `native` (the file's own blocks) for a GGUF
    file whose every weight matrix has a block kernel and whose blocks compute faster than fp32
    weights on this machine (`native.measured_choice`, measured once and cached), else fp32 (an
    HF folder; no C compiler; a format such as Q5_K that native would dequantise at every load,
    with no weight cache; or fp32 measured faster)."""
    from selfspec import kernels
    from selfspec.hardware import AUTO_NATIVE_REASON, auto_fp32_reason

    if path.is_dir():
        return "fp32", auto_fp32_reason("an HF folder has no GGUF blocks to compute on")
    if kernels.library() is None:
        return "fp32", auto_fp32_reason(f"the native kernels are not built ({kernels.kernel_status()})")
    from selfspec.models.native import measured_choice, read_index, unsupported_types

    tensors = read_index(path)[2]
    missing = unsupported_types(tensors)
    if missing:
        return "fp32", auto_fp32_reason(f"the file's {', '.join(missing)} weights have no native kernel")
    choice = measured_choice(path, tensors)
    measured = (f"measured here on {choice['tensor']}, a step plus a 9-token verify: native "
                f"{choice['native_ms']} ms, fp32 {choice['fp32_ms']} ms") if choice.get("native_ms") else ""
    if choice["dtype"] != "native":
        return "fp32", auto_fp32_reason(measured or "the native kernel could not be measured")
    return "native", f"{AUTO_NATIVE_REASON} ({measured})" if measured else AUTO_NATIVE_REASON


def model_path(model: str | Path) -> tuple[Path, str]:
    """(file or folder, name) of a registry alias or a path."""
    from selfspec.models.registry import check_spec

    spec = str(model)
    check_spec(spec)
    if spec in REGISTRY:
        return REGISTRY[spec].path(), spec
    path = Path(spec).expanduser()
    return path, path.name


def load_tokenizer(model: str | Path):
    """(tokenizer, name) of a model without loading its weights."""
    path, name = model_path(model)
    return tokenizer_at(path), name


def tokenizer_at(path: Path):
    """The tokenizer of the HF folder or GGUF file `path` (a GGUF's converted once, then cached)."""
    return load_hf_tokenizer(path) if path.is_dir() else load_gguf_tokenizer(path)


def load_transformer(path: Path | str, dtype: torch.dtype = torch.float32, ctx_size: int | None = None,
                     weight_bits: int | None = None, weight_cache: bool | None = None,
                     info: dict | None = None, device: torch.device | str = "cpu",
                     native: bool = False, q8: bool = False) -> Transformer:
    """Only the decoder of a GGUF file or HF folder (no tokenizer), with a context of `ctx_size`
    (default: min(model context, 4096)); `weight_bits` 8 or 4 quantises the linears' weights.
    The weights are built (and cached) on the CPU and moved to `device` one by one.
    `weight_cache` (default: on unless SELFSPEC_WEIGHT_CACHE=0) reads the tensors from the weight
    cache, or computes them and writes the entry there. `info` gets weights_seconds and what the
    weight cache did (weight_cache: "hit", "written", "not written", "off"; on a hit,
    weight_cache_copies: how many cached tensors were copied to be 64-byte aligned). `native`: the
    GGUF file's own blocks (`--dtype native`; with `q8`, `--dtype native-q8`)."""
    from selfspec.models import weightcache

    t0 = time.perf_counter()
    path, device = Path(path), torch.device(device)
    if weight_bits is not None:
        check_cpu_only(f"--dtype int{weight_bits}", device)
    info = {} if info is None else info
    if native:
        return _load_native(path, ctx_size, info, device, t0, q8)
    info["weight_cache"] = "off"
    use_cache = weightcache.enabled() if weight_cache is None else weight_cache
    key = hit = None
    if use_cache:
        try:
            key = weightcache.key_for(path, _dtype_name(dtype, weight_bits), _layout(weight_bits))
        except OSError:
            key = None  # e.g. a folder without config.json: the reader below says what is wrong
        if key is not None:
            # fp32 weights are copied into oneDNN's layout: read them into memory that is freed
            # after packing (mapped, their file pages would stay in the resident set too).
            hit = weightcache.load(key, mmap=device.type != "cpu" or not _prepacked(dtype, weight_bits))
    if hit is not None:
        config, state = hit
        limit = _ctx_limit(config, ctx_size)
        info["weight_cache"] = "hit"
    else:
        config, src = _read_hf_folder(path) if path.is_dir() else _read_gguf(path)
        limit = _ctx_limit(config, ctx_size)
        state = _build_state(config, src, dtype, weight_bits)
        if key is not None:
            info["weight_cache"] = "written" if weightcache.store(key, config, state, path) else "not written"
    transformer = _from_state(config, state, limit, device)
    if hit is not None:
        info["weight_cache_copies"] = state.copies  # tensors copied for alignment (0 unless an odd writer)
    info["weights_seconds"] = time.perf_counter() - t0
    if device.type == "cpu":  # every decoder that verifies is row-invariant (selfspec/models/rows.py)
        from selfspec.models.rows import make_row_invariant

        t = time.perf_counter()
        info["row_policies"] = make_row_invariant(transformer)
        info["row_probe_seconds"] = time.perf_counter() - t
    return transformer


def _load_native(path: Path, ctx_size: int | None, info: dict, device: torch.device, t0: float,
                 q8: bool = False) -> Transformer:
    """`--dtype native` (selfspec/models/native.py): the file's blocks, memory-mapped; no weight
    cache (there is nothing to compute at load), no row probe for the native linears. `q8`:
    `--dtype native-q8`, activations quantised per row to int8 blocks for the block formats."""
    from selfspec.models.native import build_native, read_index
    from selfspec.models.rows import make_row_invariant

    flag = "--dtype native-q8" if q8 else "--dtype native"
    check_cpu_only(flag, device)
    if path.is_dir():
        raise SelfspecError(f"{flag} computes on a GGUF file's blocks; {path} is a folder "
                            f"(use --dtype fp32, or a .gguf file)")
    info["weight_cache"] = "off"
    config, src, raw = read_index(path)
    transformer, native_info = build_native(config, raw, src, _ctx_limit(config, ctx_size), q8=q8)
    transformer.source = path
    info.update(native_info)
    info["weights_seconds"] = time.perf_counter() - t0
    t = time.perf_counter()
    info["row_policies"] = make_row_invariant(transformer)  # only fallback (dequantised) linears are probed
    info["row_probe_seconds"] = time.perf_counter() - t
    return transformer


def _ctx_limit(config: ModelConfig, ctx_size: int | None) -> int:
    limit = min(config.context_length, DEFAULT_CTX) if ctx_size is None else ctx_size
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
        raise SelfspecError(f"--ctx-size must be an integer >= 2, got {limit!r}")
    if limit > config.context_length:
        raise SelfspecError(f"--ctx-size {limit} exceeds the model's context of {config.context_length}")
    return limit


def _dtype_name(dtype: torch.dtype, weight_bits: int | None) -> str:
    if weight_bits is not None:
        return f"int{weight_bits}"
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))


def _layout(weight_bits: int | None) -> str:
    """How the stored tensors are laid out (part of the weight cache's key). PyTorch packs int4
    weights in a layout of ATen's CPU capability (AVX2 and AVX-512 differ): an entry packed under
    one must never be read under the other (a cache folder shared between machines, or a run with
    ATEN_CPU_CAPABILITY=avx2 beside a normal one: the output was garbage)."""
    from selfspec.models.quant import DEFAULT_INT4_GROUP, HEAD_BITS

    if weight_bits == 4:
        return f"int4pack-g{DEFAULT_INT4_GROUP}-head{HEAD_BITS}-{torch.backends.cpu.get_cpu_capability().lower()}"
    return {None: "dense", 8: f"int8-rowwise-head{HEAD_BITS}"}[weight_bits]


def _prepacked(dtype: torch.dtype, weight_bits: int | None) -> bool:
    """Whether `make_linear` repacks this dtype's weights on this machine (oneDNN for fp32)."""
    return weight_bits is None and make_linear(torch.zeros(1, 1, dtype=dtype)).kernel != "F.linear"


# ------------------------------------------------------------------------------------------ build
# Internal tensor names (per layer prefixed by "L{i}."): embed, lm_head, final_norm, attn_norm,
# wq, wk, wv (+ bq, bk, bv), wo, q_norm, k_norm, post_attn_norm, ffn_norm, w_gate, w_up, w_down,
# post_ffn_norm. Values are fp32 tensors in HF layout; Gemma norms already include the "+1".
TensorSource = dict[str, Callable[[], torch.Tensor]]
# The built decoder as flat tensors (what the weight cache stores): embed, final_norm, and per
# layer "L{i}." + attn_norm, ffn_norm, the optional q_norm, k_norm, post_attn_norm, post_ffn_norm;
# each linear (wqkv, wo, w_gate_up, w_down, lm_head unless tied) as "NAME.weight" (+ ".bias"), or
# its quantised state ("NAME.q", "NAME.scale" / "NAME.packed", "NAME.scales_zeros", see quant.py).
State = dict[str, torch.Tensor]
_LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")
_LINEAR_PARTS = ("weight", "bias", "q", "scale", "packed", "scales_zeros")
_OPTIONAL_NORMS = ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


def _build_state(config: ModelConfig, src: TensorSource, dtype: torch.dtype,
                 weight_bits: int | None = None) -> State:
    """Dequantised source tensors -> the decoder's tensors: q/k/v and gate/up fused, cast to
    `dtype`, linears quantised when `weight_bits` is set. Checks every shape against the config."""
    from selfspec.models.quant import HEAD_BITS, quantized_linear
    from selfspec.progress import Bar

    state: State = {}

    def get(name: str, required: bool = True) -> torch.Tensor | None:
        if name not in src:
            if required:
                raise ModelLoadError(f"the model file lacks tensor {name!r}")
            return None
        return src[name]()

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    def linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None, bits: int | None) -> None:
        weight, bias = cast(weight), cast(bias)
        parts = {"weight": weight, "bias": bias} if bits is None else quantized_linear(weight, bias, bits=bits).state()
        state.update({f"{name}.{k}": v for k, v in parts.items() if v is not None})

    c = config
    embed = get("embed")
    _check_shape("embed", embed, (c.vocab_size, c.hidden))
    state["embed"] = cast(embed)
    label = "dequantising the weights" + (f" and quantising them to int{weight_bits}" if weight_bits else "") + " (layers)"
    with Bar(label, c.n_layers, delay=1.0) as bar:
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
            state[p + "attn_norm"] = get(p + "attn_norm").float().contiguous()
            linear(p + "wqkv", torch.cat((wq, wk, wv)), bqkv, weight_bits)
            linear(p + "wo", get(p + "wo"), get(p + "bo", required=False), weight_bits)
            state[p + "ffn_norm"] = get(p + "ffn_norm").float().contiguous()
            linear(p + "w_gate_up", torch.cat((gate, up)), b_gate_up, weight_bits)
            linear(p + "w_down", get(p + "w_down"), get(p + "b_down", required=False), weight_bits)
            for n in _OPTIONAL_NORMS:
                t = get(p + n, required=False)
                if t is not None:
                    state[p + n] = cast(t).float().contiguous()
            bar.advance()
    state["final_norm"] = get("final_norm").float().contiguous()
    head_bits = None if weight_bits is None else HEAD_BITS
    head = get("lm_head", required=False)
    if head is not None:
        linear("lm_head", head, None, head_bits)
    elif head_bits is not None:  # a quantised head is its own copy of the tied embedding
        linear("lm_head", state["embed"], None, head_bits)
    return state


def _from_state(config: ModelConfig, state: State, max_len: int,
                device: torch.device = CPU) -> Transformer:
    """The decoder over `state` (see `State`; a dict or the weight cache's `Tensors`), which it
    consumes: each tensor is taken out as it is used (and moved to `device`: a no-op on the CPU),
    so a dense weight that gets prepacked or copied to a GPU is freed right after (a load never
    holds two copies). Float linears get this machine's kernel here (oneDNN prepacking for fp32
    on the CPU): it is what the weight cache cannot store."""
    from selfspec.models.quant import Int4Linear, Int8Linear

    def pop(name: str, default=None):
        t = state.pop(name, default)
        return None if t is None else t.to(device)

    def linear(name: str, keep_weight: bool = False):
        parts = {k: pop(f"{name}.{k}") for k in _LINEAR_PARTS if f"{name}.{k}" in state}
        if "weight" in parts:
            return make_linear(parts["weight"], parts.get("bias"), keep_weight)
        if "q" in parts:
            return Int8Linear.from_state(parts)
        if "packed" in parts:
            return Int4Linear.from_state(parts)
        raise ModelLoadError(f"no weights for linear {name!r}")

    layers = []
    for i in range(config.n_layers):
        p = f"L{i}."
        layers.append(Layer(attn_norm=pop(p + "attn_norm"), ffn_norm=pop(p + "ffn_norm"),
                            **{n: linear(p + n) for n in _LINEARS},
                            **{n: pop(p + n) for n in _OPTIONAL_NORMS}))
    embed = pop("embed")
    tied = not any(f"lm_head.{k}" in state for k in _LINEAR_PARTS)
    lm_head = make_linear(embed, keep_weight=True) if tied else linear("lm_head")
    return Transformer(config, embed, layers, pop("final_norm"), lm_head, max_len)


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
    config, src, _ = read_gguf_tensors(path)
    return config, src


def read_gguf_tensors(path: Path) -> tuple[ModelConfig, TensorSource, dict]:
    """(config, fp32 loaders, the reader's tensors) by internal name; the reader's tensors are
    views of the file's read-only memory map (what `--dtype native` computes on)."""
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
    raw: dict = {}
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
        src[name] = gguf_loader(t, name, config)
        raw[name] = t
    return config, src, raw


def gguf_loader(t, name: str, config: ModelConfig) -> Callable[[], torch.Tensor]:
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
            out = unpermute(out, heads)
        return out

    return load


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def file_key(path: Path) -> str:
    """A short key of one version of a file, for cache entries derived from it (the converted
    tokenizer, the native index, the cost model): its SHA-256 where this machine has hashed that
    version already (every verified registry GGUF), so a reinstalled package's copy of the same
    file shares the entries instead of converting again; else a hash of (path, size, mtime)."""
    from selfspec.models.registry import known_sha256

    sha = known_sha256(path)
    if sha:
        return sha[:20]
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def load_gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file: the light tokenizer (selfspec/models/light_tokenizer.py, no
    `import transformers`) where the check of its converted folder found it equal to transformers'
    (selfspec/models/tokenizer_check.py), transformers' otherwise. The check runs once per folder,
    where transformers is loaded anyway: at conversion, or for a folder without a current marker."""
    from selfspec.models import tokenizer_check

    folder = gguf_tokenizer_folder(path)
    marker, reference = tokenizer_check.current_marker(folder), None
    if marker is None:
        reference = _transformers_tokenizer(folder)
        marker = tokenizer_check.check_folder(folder, reference)
    if marker.get("match") is not True:
        return _transformers_tokenizer(folder) if reference is None else reference
    from selfspec.models.light_tokenizer import LightTokenizer

    return LightTokenizer.from_folder(folder, marker["backend"])


def gguf_tokenizer_folder(path: Path) -> Path:
    """The folder of the GGUF file's tokenizer as transformers saves it (tokenizer.json,
    tokenizer_config.json, chat_template.jinja), converted by transformers on first use: it
    takes seconds (25 s for Gemma's 262k vocabulary), so it is kept in the cache folder."""
    cached = cache_dir() / "tokenizers" / file_key(path)
    if (cached / "tokenizer_config.json").is_file():
        return cached
    from transformers import AutoTokenizer

    from selfspec.progress import Bar

    with Bar(f"converting the tokenizer of {path.name} (once; cached after)"):
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:
            raise ModelLoadError(f"cannot read the tokenizer of {path}: {e}") from None
        # written into a folder of this process's own, then published by one rename: two
        # processes converting the same file at once (a server and a CLI on first use) never
        # write into each other's files, and the first to finish wins
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{cached.name}.{os.getpid()}.", suffix=".tmp", dir=cached.parent))
        try:
            tok.save_pretrained(str(tmp))
            tmp.rename(cached)
        except OSError as e:
            if not (cached / "tokenizer_config.json").is_file():  # not another process's folder
                raise ModelLoadError(f"cannot write the converted tokenizer to {cached.parent}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cached


def _transformers_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


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


def load_hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {e}") from None
