"""Greedy agreement of `--dtype native` and `--dtype native-q8` with fp32 on a suite's prompts.

    python scripts/native_agreement.py [--model smollm2-135m] [--suite quick] [-n 32]
    python scripts/native_agreement.py --model qwen2.5-coder-1.5b --dtypes native,native-q8,llama-cpp

Each prompt (the first turn of multi-turn ones, with the chat template) is decoded greedily for
`-n` tokens in every dtype. Prints per dtype: the prompts whose `-n` tokens equal fp32's, the
tokens equal position by position, and the mean length of the prefix shared with fp32 (after the
first difference the continuations drift apart, so the prefix is the stricter number).
`llama-cpp` in `--dtypes` decodes the same token ids with llama.cpp (`make extras`) on the same
GGUF, greedy, for the same count: its own int8-activation arithmetic next to ours.
"""
from __future__ import annotations

import argparse

import torch

from selfspec.bench.run import load_suite
from selfspec.models.loading import load_model


def greedy(model, ids: list[int], n: int) -> list[int]:
    tr, cache = model.transformer, model.fresh_cache()
    logits = tr.forward(torch.tensor(ids), 0, cache, last_only=True)
    out = [int(logits.reshape(-1, logits.shape[-1])[-1].argmax())]
    for i in range(n - 1):
        logits = tr.forward(torch.tensor(out[-1:]), len(ids) + i, cache)
        out.append(int(logits[-1].argmax()))
    return out


class LlamaCpp:
    """llama.cpp's greedy continuation of token ids, on the model's GGUF file."""

    def __init__(self, name: str, threads: int) -> None:
        import llama_cpp

        from selfspec.bench.run import _model_path

        self.llm = llama_cpp.Llama(model_path=str(_model_path(name)), n_ctx=4096, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.kernel = f"llama-cpp-python {llama_cpp.__version__}"

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = []
        for tok in self.llm.generate(ids, reset=True, temp=0.0, top_k=1, repeat_penalty=1.0):
            out.append(int(tok))
            if len(out) == n:
                return out
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--suite", default="quick")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--dtypes", default="native,native-q8")
    args = ap.parse_args()
    prompts = load_suite(args.suite)
    ref = load_model(args.model, dtype="fp32")
    texts = [p.turns[0] for p in prompts]
    ids = [ref.encode(t) for t in texts]  # with the chat template where the model has one
    want = [greedy(ref, i, args.n) for i in ids]
    print(f"model {args.model}, suite {args.suite} ({len(ids)} prompts), {args.n} greedy tokens each, against fp32\n")
    print("| dtype | prompts equal in all tokens | tokens equal by position | mean shared prefix |")
    print("|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        if dtype == "llama-cpp":
            model = LlamaCpp(args.model, torch.get_num_threads())
            got = [model.greedy(i, args.n) for i in ids]
        else:
            model = load_model(args.model, dtype=dtype)
            got = [greedy(model, i, args.n) for i in ids]
        same = sum(g == w for g, w in zip(got, want))
        pos = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
        prefix = [next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), args.n) for g, w in zip(got, want)]
        print(f"| {dtype} ({model.kernel}) | {same}/{len(ids)} | {100 * pos / (len(ids) * args.n):.1f}% | "
              f"{sum(prefix) / len(prefix):.1f} of {args.n} |")


if __name__ == "__main__":
    main()
