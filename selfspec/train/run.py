"""`selfspec train-drafter`: data (self-distilled or a user file) -> features -> training -> OUT."""
from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path

from selfspec.errors import InvalidParameterError

DEFAULT_SEQUENCES = 48
DISTILL_PROMPTS = resources.files("selfspec").joinpath("data", "distill.jsonl")
DEFAULT_DISTILL_TOKENS = 128


def parse_layers(text: str) -> list[int]:
    """`3,5,8,12` -> [3, 5, 8, 12] (--exit-layers)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidParameterError(f"--exit-layers must be comma-separated layer numbers, e.g. 3,5,8,12; got {text!r}") from None


def train_drafter(*, model: str, kind: str, out: Path, exit_layer: int | None = None,
                  exit_layers: list[int] | None = None, heads: int | None = None,
                  data: Path | None = None, self_distill: int | None = None,
                  distill_tokens: int = DEFAULT_DISTILL_TOKENS, settings, resume: bool = False,
                  dtype: str = "fp32", threads: int | None = None, ctx_size: int | None = None,
                  chat: bool | None = None, progress: bool = True) -> dict:
    from selfspec.search.calibration import calibration_prompts
    from selfspec.models.loading import load_model
    from selfspec.train.data import distill, read_data_file
    from selfspec.drafters.trained.kinds import make_kind
    from selfspec.train.loop import precompute, train

    from selfspec.drafters.trained.kinds import canonical_kind

    kind = canonical_kind(kind)
    if exit_layer is not None and kind not in ("early-exit", "lite"):
        raise InvalidParameterError(f"--exit-layer is for --kind early-exit or lite, not {kind!r}")
    if exit_layers is not None and kind != "lite":
        raise InvalidParameterError(f"--exit-layers is for --kind lite, not {kind!r}")
    if heads is not None and kind not in ("medusa", "hydra"):
        raise InvalidParameterError(f"--heads is for --kind medusa or hydra, not {kind!r}")
    if distill_tokens < 1:
        raise InvalidParameterError(f"--distill-tokens must be >= 1, got {distill_tokens}")
    if data is not None:
        prompts, texts = read_data_file(data)
    else:  # the skip search's calibration prompts and a set shipped for distillation; never the bench suites
        prompts, texts = calibration_prompts()[0] + calibration_prompts(DISTILL_PROMPTS)[0], []
    m = load_model(model, dtype=dtype, ctx_size=ctx_size, threads=threads)
    k = make_kind(kind, m, exit_layer=exit_layer, exit_layers=exit_layers, heads=heads)  # options checked before any work
    sequences, info = [], {"cached": None, "seconds": 0.0, "new_tokens": 0}
    if prompts:
        n = self_distill if self_distill is not None else max(DEFAULT_SEQUENCES, len(prompts))
        prompt_ids = [m.encode(p, chat=chat) for p in prompts]
        sequences, info = distill(m, prompt_ids, n, distill_tokens, seed=settings.seed, progress=progress)
    sequences += [list(m.tokenizer(t).input_ids)[: m.ctx_size] for t in texts]
    data_key = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:24]
    t0 = time.perf_counter()
    feats = precompute(k, m, sequences, progress=progress)
    feature_seconds = time.perf_counter() - t0
    _, summary = train(k, m, feats, settings, out, data_key=data_key, resume=resume, progress=progress)
    return {"out": str(out), "kind": k.name, "draft": k.drafter_name, "model": m.name, "options": k.options,
            "sequences": len(sequences), "tokens": sum(map(len, sequences)),
            "distill": {**info, "seconds": round(info["seconds"], 2)},
            "feature_seconds": round(feature_seconds, 2), **summary,
            "use": f"selfspec generate --model {model} --draft {k.drafter_name} --drafter-weights {out}"}
