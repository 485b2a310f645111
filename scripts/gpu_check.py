"""The GPU check (docs/gpu.md): is the decoder right on DEVICE, and what does speculation buy there.

    python scripts/gpu_check.py --device cuda --out gpu-check/          # what scripts/gpu_check.sh runs
    GPU_CHECK_SHORT=1 python scripts/gpu_check.py --device cpu --out /tmp/gc   # a short run on a CPU

Three steps, each written to OUT as JSON (and a summary in OUT/summary.md):
1. parity: logits of the same prompts, the CPU in fp32 as the reference vs DEVICE in fp32 and in
   the device's default dtype (bf16 on CUDA). fp32 must agree within FP32_TOL; bf16 within
   BF16_TOL (max |delta logit| over the positions, relative to the logit range) and on >= 95% of
   top-1 tokens.
2. lossless: greedy output of every drafter equals plain greedy decoding on DEVICE in fp32, token
   for token with no exception (DESIGN.md, "Losslessness, precisely"); a divergence fails, and its
   first index and the plain model's top-2 logit gap there are reported. The same holds in the
   device's default dtype (bf16 on CUDA).
   The draft model is the model's first quarter of layers + its head (tests/lossless.py,
   `truncated_copy`), unless the registry names a real partner.
3. bench: `selfspec bench --suite quick` with plain vs layer-skip vs ngram (vs the registry's
   draft model when it has one) on DEVICE, into OUT/bench.
Exit status 1 when a check fails. GPU_CHECK_SHORT=1 shortens everything (fewer prompts and tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lossless import truncated_copy  # noqa: E402
from selfspec.drafters.draft_model import DraftModelDrafter  # noqa: E402
from selfspec.hardware import device_info, resolve_device, synchronize  # noqa: E402
from selfspec.generation import generate  # noqa: E402
from selfspec.drafters.factory import build_drafter, default_draft_model  # noqa: E402
from selfspec.models.loading import load_model  # noqa: E402

FP32_TOL = 1e-2  # max |delta logit| / logit range: different kernels, same precision
BF16_TOL = 0.05  # bf16 keeps 8 bits of mantissa; SmolLM2 bf16 vs fp32 on an AVX2 CPU: 0.013, top-1 98%
BF16_TOP1 = 0.95
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarise in one sentence: The council agreed to plant forty trees and to build the playground first.",
    "List three uses of a paper clip.",
    "Translate to French: The weather is nice today and we are going to the park.",
]


def logits_of(model, ids: list[int]) -> torch.Tensor:
    """Prefill logits of every position `[T, vocab]`, fp32 on the CPU."""
    tr = model.transformer
    cache = tr.new_cache(len(ids))
    return tr.forward(torch.tensor(ids, device=tr.device), 0, cache).float().cpu()


def parity(ref, other, prompts: list[list[int]], tol: float, top1_min: float) -> dict:
    worst, agree, total = 0.0, 0, 0
    for ids in prompts:
        a, b = logits_of(ref, ids), logits_of(other, ids)
        scale = float(a.max() - a.min())
        worst = max(worst, float((a - b).abs().max()) / scale)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return {"dtype": other.dtype, "device": str(other.device), "max_rel_delta": worst, "tolerance": tol,
            "top1_agreement": agree / total, "top1_min": top1_min, "positions": total,
            "ok": worst <= tol and agree / total >= top1_min}


def first_divergence(model, prompt: list[int], plain: list[int], spec: list[int]) -> dict | None:
    """None when equal; else where, and how close the plain model's two best logits were there (a
    diagnostic only: any divergence is a failure)."""
    if spec == plain:
        return None
    j = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))
    if j == min(len(plain), len(spec)):
        return {"token": j, "gap": None}
    top2 = logits_of(model, prompt + plain[:j])[-1].topk(2).values
    gap = float(top2[0] - top2[1])
    return {"token": j, "gap": gap}


def drafters(model, device) -> dict:
    """name -> drafter factory, or the reason it does not run on this device."""
    partner = default_draft_model(model.name)

    def small():
        if partner:
            return build_drafter("model", model, draft_model=partner)
        return DraftModelDrafter(truncated_copy(model, max(1, model.config.n_layers // 4)), target=model)

    out = {"none": lambda: None, "layer-skip": lambda: build_drafter("layer-skip", model),
           "ngram": lambda: build_drafter("ngram", model), "auto": lambda: build_drafter("auto", model),
           "model": small}
    out["quantized"] = ((lambda: build_drafter("quantized", model)) if device.type == "cpu"
                        else "int8/int4 kernels are CPU-only (docs/gpu.md)")
    return out


def lossless(model, device, prompts: list[list[int]], n: int) -> dict:
    """Greedy output of each drafter vs plain decoding of the same model."""
    plain = [generate(model, p, max_new_tokens=n, ignore_eos=True) for p in prompts]
    rows = {}
    for name, make in drafters(model, device).items():
        if isinstance(make, str):
            rows[name] = {"status": "not supported", "reason": make}
            continue
        try:
            drafter = make()
        except Exception as e:  # e.g. no shipped skip config for this model: reported, not hidden
            rows[name] = {"status": "unavailable", "reason": f"{type(e).__name__}: {e}"}
            continue
        diffs, tau, seconds, new = [], [], 0.0, 0
        for p, ref in zip(prompts, plain):
            synchronize(device)
            r = generate(model, p, drafter=drafter, max_new_tokens=n, ignore_eos=True)
            d = first_divergence(model, p, ref.token_ids, r.token_ids)
            if d is not None:
                diffs.append(d)
            tau.append(r.stats.mean_accepted_tokens)
            seconds += r.stats.decode_seconds
            new += r.stats.new_tokens
        rows[name] = {"status": "FAILED" if diffs else "ok", "identical": len(prompts) - len(diffs),
                      "prompts": len(prompts), "divergences": diffs, "mean_tau": sum(tau) / len(tau),
                      "tokens_per_s": new / seconds if seconds else None}
    return rows


def bench(model_name: str, device: str, out: Path, n: int, short: bool) -> dict:
    methods = "ar,layer-skip,ngram" + (",model" if default_draft_model(model_name) else "")
    suite = "quick"
    if short:  # two prompts of the quick suite
        lines = (ROOT / "selfspec" / "data" / "suites" / "quick.jsonl").read_text().splitlines()[:2]
        suite = str(out / "short-suite.jsonl")
        Path(suite).write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "selfspec.cli.main", "bench", "--model", model_name, "--suite", suite,
           "--methods", methods, "-n", str(n), "--device", device, "--out", str(out / "bench"), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    (out / "bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"ok": False, "command": " ".join(cmd), "error": proc.stderr.strip().splitlines()[-1:]}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": True, "command": " ".join(cmd), "summary": summary["summary"], "methods": summary["methods"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", help="of the second model on DEVICE (auto: bf16 on CUDA)")
    args = ap.parse_args()
    short = os.environ.get("GPU_CHECK_SHORT", "") not in ("", "0")
    n = 8 if short else 48
    prompts_text = PROMPTS[:2] if short else PROMPTS
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    report = {"torch": torch.__version__, "model": args.model, "short": short, **device_info(device)}
    print(f"gpu_check: {args.model} on {device} ({report.get('gpu', 'cpu')}), short={short}", file=sys.stderr)

    ref = load_model(args.model, dtype="fp32", device="cpu")
    prompts = [ref.encode(p) for p in prompts_text]
    fp32 = load_model(args.model, dtype="fp32", device=str(device))
    default = load_model(args.model, dtype=args.dtype, device=str(device))
    report["parity"] = [parity(ref, fp32, prompts, FP32_TOL, 0.99)]
    if default.dtype != "fp32":
        report["parity"].append(parity(ref, default, prompts, BF16_TOL, BF16_TOP1))
    print(f"parity: {json.dumps(report['parity'])}", file=sys.stderr)
    del ref

    report["lossless_fp32"] = lossless(fp32, device, prompts, n)
    print(f"lossless fp32: { {k: v['status'] for k, v in report['lossless_fp32'].items()} }", file=sys.stderr)
    if default.dtype != "fp32":
        report[f"lossless_{default.dtype}"] = lossless(default, device, prompts, n)
    del fp32, default

    report["bench"] = bench(args.model, str(device), args.out, n, short)
    report["seconds"] = time.perf_counter() - t0
    failed = [f"parity {p['dtype']}" for p in report["parity"] if not p["ok"]]
    failed += [f"{key.removeprefix('lossless_')} lossless {k}" for key in report if key.startswith("lossless_")
               for k, v in report[key].items() if v["status"] == "FAILED"]
    failed += [] if report["bench"]["ok"] else ["bench"]
    report["failed"] = failed
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "summary.md").write_text(summary_md(report))
    print(summary_md(report), file=sys.stderr)
    return 1 if failed else 0


def summary_md(r: dict) -> str:
    lines = [f"# GPU check: {r['model']} on {r['device']} {r.get('gpu', '')}".rstrip(), "",
             f"torch {r['torch']}, CUDA {r.get('cuda', '-')}, short={r['short']}, {r.get('seconds', 0):.0f} s", "",
             "| parity | max rel delta | tolerance | top-1 agreement |", "|---|---|---|---|"]
    for p in r["parity"]:
        lines.append(f"| {p['dtype']} | {p['max_rel_delta']:.2e} | {p['tolerance']:g} | {100 * p['top1_agreement']:.1f}% |")
    for key in [k for k in r if k.startswith("lossless_")]:
        lines += ["", f"| {key} | status | identical | mean tau | tok/s |", "|---|---|---|---|---|"]
        for name, v in r[key].items():
            if "identical" not in v:
                lines.append(f"| {name} | {v['status']}: {v['reason']} | | | |")
                continue
            tps = "-" if v["tokens_per_s"] is None else f"{v['tokens_per_s']:.1f}"
            lines.append(f"| {name} | {v['status']} | {v['identical']}/{v['prompts']} | {v['mean_tau']:.2f} | {tps} |")
    b = r["bench"]
    lines += ["", "bench: " + ("see bench/report.md" if b["ok"] else f"FAILED {b.get('error')}")]
    if b["ok"]:
        for m, row in b["summary"].items():
            if row:
                lines.append(f"- {m}: {row['tokens_per_s']:.1f} tok/s, {row['speedup']:.2f}x, same as plain: {row['same']}")
    lines += ["", "failed: " + (", ".join(r["failed"]) or "nothing")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
