"""`--dtype native` holds a model in about its file size: a 7B-class Q4 GGUF fits a 24 GB machine.

The check writes a synthetic GGUF with Mistral-7B's shapes (32 layers, hidden 4096, 32 query and
8 KV heads, MLP 14336, vocabulary 32000; every linear and the embedding in Q4_0: 4.1 GB), loads it
natively in a fresh process, runs a forward pass and reads the process's peak RSS: it must stay
within the file size + the KV cache + 0.5 GB (the interpreter and torch included). The weights are
random blocks (one per shape, repeated across layers): memory does not depend on their values.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

Q4_0_BLOCK, Q4_0_BYTES = 32, 18  # weights per block, bytes per block (f16 scale + 16 bytes of nibbles)
SHAPES_7B = dict(n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, intermediate=14336, vocab=32000)
CTX = 512
GIB = 1 << 30


def q4_0_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_0 blocks for a rows x cols matrix, as the file's bytes (rows, cols/32*18), with
    a finite scale in every block."""
    blocks = rng.integers(0, 256, size=(rows, cols // Q4_0_BLOCK, Q4_0_BYTES), dtype=np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def write_llama_gguf(path: Path, *, n_layers: int, hidden: int, n_heads: int, n_kv_heads: int,
                     intermediate: int, vocab: int, seed: int = 0) -> int:
    """A Llama-architecture GGUF with random Q4_0 linears and embedding, written tensor by tensor
    (never the whole model in memory); returns the file size."""
    import gguf

    rng = np.random.default_rng(seed)
    head_dim = hidden // n_heads
    kv = n_kv_heads * head_dim
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (intermediate, hidden),
              "ffn_up": (intermediate, hidden), "ffn_down": (hidden, intermediate)}
    blocks = {s: q4_0_blocks(*s, rng) for s in set(shapes.values())}  # one random matrix per shape
    tensors = [("token_embd.weight", q4_0_blocks(vocab, hidden, rng))]
    for i in range(n_layers):
        tensors.append((f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32)))
        tensors += [(f"blk.{i}.{name}.weight", blocks[shape]) for name, shape in shapes.items()]
        tensors.append((f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32)))
    tensors += [("output_norm.weight", np.ones(hidden, dtype=np.float32)),
                ("output.weight", q4_0_blocks(vocab, hidden, rng))]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    for name, data in tensors:
        if data.dtype == np.uint8:
            w.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor_info(name, data.shape, data.dtype, data.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, data in tensors:
        w.write_tensor_data(data)
    w.close()
    return path.stat().st_size


PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from selfspec.models.loading import load_transformer

    info = {}
    tr = load_transformer(sys.argv[1], native=True, ctx_size=int(sys.argv[2]), info=info)
    cache = tr.new_cache(int(sys.argv[2]))
    logits = tr.forward(torch.tensor([1, 2, 3, 4]), 0, cache)
    kv = sum(t.numel() * t.element_size() for t in (cache.k, cache.v))
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kv": kv,
                      "fallback": info.get("native_fallback"), "shape": list(logits.shape)}))
""")


def peak_rss_of_native_load(path: Path, ctx: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path), str(ctx)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _needs_kernel():
    from selfspec.models import native

    if native._lib() is None:
        pytest.skip("the native block kernel is not built (no C compiler?): --dtype native would dequantise "
                    "to fp32, which this check is not about")


def test_small_synthetic_file_loads_natively(tmp_path):
    """The writer and the probe on a small model (fast): every linear runs on the file's blocks."""
    _needs_kernel()
    path = tmp_path / "small.gguf"
    size = write_llama_gguf(path, n_layers=2, hidden=256, n_heads=4, n_kv_heads=2, intermediate=512, vocab=1000)
    r = peak_rss_of_native_load(path, 64)
    assert r["fallback"] == [] and r["shape"] == [4, 1000]
    assert size < 2 << 20


@pytest.mark.slow
def test_7b_class_q4_file_fits_in_its_file_size(tmp_path):
    _needs_kernel()
    path = tmp_path / "synthetic-7b-q4_0.gguf"
    size = write_llama_gguf(path, **SHAPES_7B)
    r = peak_rss_of_native_load(path, CTX)
    bound = size + r["kv"] + GIB // 2
    print(f"synthetic 7B Q4_0: file {size / GIB:.2f} GiB, KV cache {r['kv'] / GIB:.2f} GiB, "
          f"peak RSS {r['peak'] / GIB:.2f} GiB (bound {bound / GIB:.2f} GiB)")
    assert 3.5 * GIB < size < 4.6 * GIB
    assert r["fallback"] == [] and r["shape"] == [4, SHAPES_7B["vocab"]]
    assert r["peak"] <= bound, f"peak RSS {r['peak'] / GIB:.2f} GiB exceeds file + KV + 0.5 GiB = {bound / GIB:.2f} GiB"
