"""Plain greedy decoding with and without the greedy head (selfspec/models/greedy_head.py),
interleaved in one process, so both see the same machine load.

    python scripts/greedy_head_ab.py --model qwen2.5-coder-0.5b [--repeats 5] [--tokens 48]

Per round it decodes the same prompt with the native LM head's greedy path and with the full
logits (`Transformer.argmax_head` set to None), checks that the tokens are the same, and prints
the median decode tokens/s of each, their ratio, and how many vocabulary rows the bound left for
the exact pass (median and largest over the run's steps).
"""
from __future__ import annotations

import argparse
import statistics
import sys

PROMPT = ("Summarise in two sentences: The city council met on Tuesday to discuss the new library budget, "
          "the opening hours and the plan to add a reading room for children.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args()

    from selfspec.generation import generate
    from selfspec.models.loading import load_model

    model = load_model(args.model, dtype="native")
    tr = model.transformer
    head = tr.argmax_head
    if head is None:
        print(f"{args.model}: its LM head has no greedy path (see selfspec/models/greedy_head.py, `eligible`)")
        return 1
    counts: list[int] = []
    real = head.argmax

    def counted(x):
        out = real(x)
        counts.append(head.last_candidates)
        return out

    head.argmax = counted
    speed: dict[str, list[float]] = {"full logits": [], "greedy head": []}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name in speed:
            tr.argmax_head = head if name == "greedy head" else None
            r = generate(model, args.prompt, max_new_tokens=args.tokens)
            speed[name].append(r.stats.new_tokens / r.stats.decode_seconds)
            if tokens.setdefault(name, r.token_ids) != r.token_ids:
                print(f"{name}: the tokens changed between rounds")
                return 1
    if tokens["full logits"] != tokens["greedy head"]:
        print("the greedy head changed the tokens")
        return 1
    med = {k: statistics.median(v) for k, v in speed.items()}
    print(f"{args.model}: decode tok/s, median of {args.repeats}: full logits {med['full logits']:.1f}, "
          f"greedy head {med['greedy head']:.1f} ({med['greedy head'] / med['full logits']:.2f}x); "
          f"rows computed exactly per step: median {statistics.median(counts):.0f}, at most {max(counts)} "
          f"of {tr.config.vocab_size}; tokens identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
