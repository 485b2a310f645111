"""Tiny random Hugging Face models for exact-parity tests (helpers only, no tests here).

`build_tiny(arch, tmp_path)` builds a small random `transformers` model of one of the five
architectures our decoder implements, perturbs *every* parameter (HF initialises biases to 0 and
Gemma's norm weights to 0, i.e. the identity, which would hide a missing bias, a missing norm or a
wrong "+1"), and saves it as a safetensors folder that `load_transformer` reads. The HF model is
returned in fp32, eval mode, with eager attention (the only HF attention that honours Gemma-2's
attention-logit soft-capping), so it is the reference our logits are compared to.

`tiny_model(arch, tmp_path)` wraps the loaded decoder in a `selfspec.models.loading.Model` with a
fake tokenizer, so the generation loop runs on it. Tiny models have no eos ids: generations run
to max_new_tokens on both sides. `tiny_transformer` loads a bare decoder in any of `DTYPES`.
(`load_transformer` makes every CPU decoder row-invariant: each linear's row policy comes from
the probe of selfspec/models/rows.py.)
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma2", "gemma3")

# Shapes shared by every arch: GQA (4 query heads over 2 KV heads), head_dim 16.
COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
WINDOW = 8  # sliding window of Mistral and the local layers of Gemma-2/3: ~20-token prompts cross it
SEED = {"llama": 11, "mistral": 12, "qwen2": 13, "gemma2": 14, "gemma3": 15}


def hf_config(arch: str, **overrides):
    """The transformers config of a tiny `arch` model (transformers 5.x parameter names)."""
    import transformers as tf

    kw = dict(COMMON)
    if arch == "llama":
        cls = tf.LlamaConfig
        kw.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  tie_word_embeddings=False)
    elif arch == "mistral":
        cls = tf.MistralConfig
        kw.update(rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                  sliding_window=WINDOW, tie_word_embeddings=False)
    elif arch == "qwen2":
        cls = tf.Qwen2Config
        # Tied embeddings here (the default of small Qwen2 checkpoints), untied for Llama/Mistral:
        # both lm_head layouts are exercised.
        kw.update(rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                  use_sliding_window=False, tie_word_embeddings=True)
    elif arch == "gemma2":
        cls = tf.Gemma2Config
        kw.update(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=WINDOW,
            # Small caps so tanh is far from linear on what our random weights produce (attention
            # scores reach ~3, logits ~35), yet the final cap does not saturate tanh to exactly 1.0
            # in fp32 (that would make argmax ties and greedy comparisons meaningless).
            attn_logit_softcapping=2.0,
            final_logit_softcapping=10.0,
            query_pre_attn_scalar=24,  # != head_dim: a 1/sqrt(head_dim) scale would be caught
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    elif arch == "gemma3":
        cls = tf.Gemma3TextConfig
        kw.update(
            # Distinct bases per layer type, far apart, so swapping them changes the logits.
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
            sliding_window=WINDOW,
            # 4 layers: local, global, local, global (Gemma-3 uses 5:1; 1:1 keeps both kinds in 4).
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=32,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {ARCHS}")
    kw.update(overrides)
    return cls(**kw)


def _model_class(arch: str):
    import transformers as tf

    return {
        "llama": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "gemma2": tf.Gemma2ForCausalLM,
        "gemma3": tf.Gemma3ForCausalLM,
    }[arch]


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a nonzero random value: norms get noise around their HF default
    (1 for Llama-style norms, 0 for Gemma's (1 + w) norms), biases become nonzero."""
    gen = torch.Generator().manual_seed(seed + 1000)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.add_(0.3 * noise)
        elif name.endswith("bias"):
            p.copy_(0.2 * noise)
        elif "embed_tokens" in name or "lm_head" in name:
            p.copy_(0.5 * noise)
        else:
            # ~N(0, 1/fan_in) so activations stay O(1) through the 4 layers.
            p.copy_(noise / p.shape[-1] ** 0.5)


def build_tiny(arch: str, tmp_path: Path, **overrides):
    """`(hf_model, folder)`: a tiny random fp32 `arch` model (eval mode, eager attention) and the
    folder it was saved to with `save_pretrained` (config.json + model.safetensors)."""
    config = hf_config(arch, **overrides)
    torch.manual_seed(SEED[arch])
    model = _model_class(arch)._from_config(config, attn_implementation="eager", dtype=torch.float32)
    _perturb(model, SEED[arch])
    model.eval()
    # No eos anywhere: HF generate must not stop early either.
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = None
    folder = Path(tmp_path) / f"tiny-{arch}"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


class FakeTokenizer:
    """Enough of a tokenizer for the generation loop: token i is the word "t{i}"."""

    chat_template = None
    eos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(self.vocab_size)}


DTYPES = ("fp32", "bf16", "int8", "int4")


def tiny_transformer(folder: Path, dtype: str = "fp32", ctx_size: int = 64):
    """The decoder of a tiny checkpoint in `dtype` (one of `DTYPES`), as `load_model` builds it
    (without the weight cache: tiny folders live in tmp_path)."""
    from selfspec.models.loading import load_transformer

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    bits = {"int8": 8, "int4": 4}.get(dtype)
    return load_transformer(Path(folder), torch_dtype, ctx_size, weight_bits=bits, weight_cache=False)


def tiny_pair(arch: str, tmp_path: Path, ctx_size: int = 64, dtype: torch.dtype = torch.float32):
    """`(model, hf_model)`: our `Model` over a tiny `arch` checkpoint, and its HF reference."""
    from selfspec.models.loading import Model, load_transformer

    hf, folder = build_tiny(arch, tmp_path)
    tr = load_transformer(folder, dtype, ctx_size)
    model = Model(name=arch, path=folder, config=tr.config, transformer=tr,
                  tokenizer=FakeTokenizer(tr.config.vocab_size),
                  dtype="fp32" if dtype == torch.float32 else "bf16",
                  ctx_size=tr.rope_max, load_seconds=0.0)
    return model, hf


def tiny_model(arch: str, tmp_path: Path, ctx_size: int = 64, dtype: torch.dtype = torch.float32):
    """Our `Model` over a tiny `arch` checkpoint (fake tokenizer, no eos ids)."""
    return tiny_pair(arch, tmp_path, ctx_size, dtype)[0]


def threads(n: int):
    """Generator for a fixture: PyTorch (and our kernels, which use its thread count) on `n`
    threads, the previous setting restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread():
    """Generator for an autouse fixture: tiny matmuls run fastest on one thread (several threads
    only fight over the shared cores)."""
    yield from threads(1)


# What users run on our 2-core machines: the exactness tests of real models use it even where the
# suite's workers run one thread each (tests/conftest.py), so the multi-threaded kernel paths
# (work split over threads) are what they check.
USER_THREADS = 2


def build_tiny_chat(tmp_path: Path) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary, saved with SmolLM2's real tokenizer (chat
    template included): a model folder that `load_model` and the CLI load in well under a second."""
    import shutil

    from selfspec.models.loading import gguf_tokenizer_folder
    from selfspec.models.registry import REGISTRY

    _, folder = build_tiny("llama", tmp_path, vocab_size=49152, max_position_embeddings=512)
    converted = gguf_tokenizer_folder(REGISTRY["smollm2-135m"].path())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # what save_pretrained wrote
        shutil.copy(converted / name, folder / name)
    return folder
