"""Acceptance of early-exit drafts per exit layer: the untuned exit (LITE's exits as initialised,
i.e. the plain early exit), the LITE-tuned exit and, if given, a Kangaroo adapter. Counts only (no
timing), so a busy machine gives the same numbers. Prints a Markdown table for docs/trained-drafters.md.

Two measures per drafter, over the suite's prompts (the first turn of multi-turn ones), which no
trained drafter saw:
  agreement -- teacher-forced: how often the exit's top token equals the model's greedy next token
               along the model's own greedy continuation (every generated position counts once;
               independent of draft lengths and gamma);
  rule      -- the drafter as `--draft` runs it (draft-exit rule: gamma 0.6, adapted; at most 8
               drafts): acceptance rate (accepted / drafted), tau (tokens per verify round, bonus
               included), drafts per round; output checked token for token against plain decoding.

    python scripts/lite_acceptance.py --lite /tmp/lite-smollm2 --kangaroo /tmp/lite-ee5 --threads 1
"""
from __future__ import annotations

import argparse
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lite", required=True, help="folder of `train-drafter --kind lite`")
    ap.add_argument("--kangaroo", help="folder of `train-drafter --kind early-exit` (optional)")
    ap.add_argument("--suite", default="quick")
    ap.add_argument("-n", "--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from selfspec.bench.run import load_suite
    from selfspec.drafters.trained.kinds import make_kind
    from selfspec.drafters.trained.store import load_drafter, read_meta
    from selfspec.generation import generate
    from selfspec.models.loading import load_model

    model = load_model(args.model, dtype="fp32", threads=args.threads)
    tr = model.transformer
    lite = load_drafter(model, args.lite, "lite")
    layers = read_meta(args.lite)["options"]["exit_layers"]
    untuned = make_kind("lite", model, exit_layers=layers)
    torch.manual_seed(0)  # A is random, but B = 0 makes the untuned exit independent of it
    rows = []  # (label, exit layer, teacher-forced logits of layer-L states, drafter)
    for e, layer in enumerate(layers):
        for label, exits in (("untuned exit", untuned.build(model)), ("LITE", lite.exits)):
            rows.append((label, layer, lambda x, ex=exits, e=e: tr.logits(ex(x.float(), e).to(tr.dtype)),
                         untuned.drafter(exits, model, exit_layer=layer)))
    if args.kangaroo:
        kangaroo = load_drafter(model, args.kangaroo, "early-exit")
        rows.append(("Kangaroo adapter", kangaroo.exit_layer,
                     lambda x, a=kangaroo.adapter: tr.logits(tr.final_hidden(a(x.float().unsqueeze(0))[0].to(tr.dtype))),
                     kangaroo))

    prompts = [model.encode(p.turns[0]) for p in load_suite(args.suite)]
    agree = [[0, 0] for _ in rows]
    drafted, accepted, rounds, made = ([0] * len(rows) for _ in range(4))
    same = [True] * len(rows)
    for i, prompt in enumerate(prompts):
        plain = generate(model, prompt, max_new_tokens=args.new).token_ids
        ids = torch.tensor(prompt + plain)
        states = {}
        with torch.inference_mode():
            for j, (_, layer, logits_of, drafter) in enumerate(rows):
                if layer not in states:
                    states[layer] = tr.forward(ids, 0, tr.new_cache(len(ids)), exit_layer=layer)
                top = logits_of(states[layer]).argmax(-1)[len(prompt) - 1: -1]  # predicts each generated token
                agree[j][0] += int((top == ids[len(prompt):]).sum())
                agree[j][1] += len(plain)
        for j, (_, _, _, drafter) in enumerate(rows):
            r = generate(model, prompt, max_new_tokens=args.new, drafter=drafter)
            same[j] &= r.token_ids == plain
            drafted[j] += r.stats.drafted
            accepted[j] += r.stats.accepted
            rounds[j] += r.stats.rounds
            made[j] += r.stats.new_tokens
        print(f"prompt {i + 1}/{len(prompts)}", file=sys.stderr)

    print(f"{args.model}, suite {args.suite} ({len(prompts)} prompts, up to {args.new} new tokens each: "
          f"{agree[0][1]} positions), greedy\n")
    print("| exit layer | drafter | agreement (teacher-forced) | acceptance (draft-exit rule) | τ | drafts / round | output |")
    print("|---|---|---|---|---|---|---|")
    for j, (label, layer, _, _) in enumerate(rows):
        a = agree[j][0] / agree[j][1]
        rate = accepted[j] / drafted[j] if drafted[j] else 0.0
        tau = made[j] / rounds[j]
        print(f"| {layer} | {label} | {a:.1%} | {rate:.1%} | {tau:.2f} | {drafted[j] / rounds[j]:.2f} | "
              f"{'identical' if same[j] else 'DIFFERS'} |")


if __name__ == "__main__":
    main()
