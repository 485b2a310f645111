"""Training a drafter: features once, then AdamW over random windows of them.

The backbone is frozen, so its forward over each distilled sequence is computed once
(`precompute`); every later step costs only the drafter module and the frozen LM head. Steps draw
windows from a seeded generator; a checkpoint in OUT/checkpoint/ (module, optimizer moments and the
generator's state as safetensors, the rest as JSON: never pickle) lets `resume` continue exactly
where the run stopped: resumed training gives the same weights bit for bit as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from selfspec.errors import InvalidParameterError, SelfspecError
from selfspec.progress import Bar
from selfspec.drafters.trained.store import save_drafter, save_tensors, write_json

CHECKPOINT = "checkpoint"
LOSS_WINDOW = 20  # steps averaged into the reported loss


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 300
    batch: int = 8
    window: int = 64
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "window", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InvalidParameterError(f"--lr must be > 0, got {self.lr}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth: a function of the step only (resumable)."""
        warm = min(1.0, (step + 1) / self.warmup)
        return self.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / self.steps)))


def precompute(kind, model, sequences: list[list[int]], progress: bool = False) -> list[dict]:
    """The frozen backbone's features of every sequence (its only cost in training)."""
    feats = []
    with Bar("features", len(sequences), enabled=progress) as bar:
        for seq in sequences:
            feats.append(kind.features(model, torch.tensor(seq, dtype=torch.long)))
            bar.advance()
    return feats


def _batch(feats: list[dict], window: int, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    rows = []
    for _ in range(batch):
        f = feats[int(torch.randint(len(feats), (1,), generator=gen))]
        T = next(iter(f.values())).shape[0]
        s = int(torch.randint(T - window + 1, (1,), generator=gen))
        rows.append({k: v[s: s + window] for k, v in f.items()})
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _save_checkpoint(folder: Path, module, opt, gen, step: int, losses: list[float], seconds: float, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = opt.state_dict()
    tensors = {f"state.{i}.{name}": t for i, st in state["state"].items() for name, t in st.items()}
    tensors["generator"] = gen.get_state()
    save_tensors(folder / "module.safetensors", module.state_dict())
    save_tensors(folder / "optimizer.safetensors", tensors)
    write_json(folder / "checkpoint.json", {**meta, "step": step, "losses": losses, "train_seconds": seconds,
                                            "param_groups": state["param_groups"]})


def _load_checkpoint(folder: Path, module, opt, gen, meta: dict) -> tuple[int, list[float], float]:
    try:
        info = json.loads((folder / "checkpoint.json").read_text())
    except (OSError, ValueError):
        raise SelfspecError(f"--resume: no readable checkpoint in {folder}") from None
    for key in ("kind", "options", "settings", "data"):
        saved, now = info.get(key), meta[key]
        if key == "kind":  # a checkpoint written under an old kind name
            from selfspec.drafters.trained.kinds import canonical_kind

            saved = canonical_kind(saved)
        if key == "settings":  # more (or fewer) steps may be asked for; nothing else may change
            saved, now = {**(saved or {}), "steps": 0}, {**now, "steps": 0}
        if saved != now:
            raise SelfspecError(f"--resume: the checkpoint in {folder} was made with another {key} "
                                f"({saved} vs {now}); start afresh without --resume or use the same settings")
    module.load_state_dict(load_file(str(folder / "module.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    gen.set_state(tensors.pop("generator"))
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return info["step"], info["losses"], info["train_seconds"]


def train(kind, model, feats: list[dict], settings: TrainSettings, out: Path, *, data_key: str = "",
          resume: bool = False, progress: bool = False) -> tuple[torch.nn.Module, dict]:
    """Train `kind`'s module on `feats`; checkpoints in out/checkpoint, the drafter in out.
    Returns the module and a summary (steps, final loss, seconds, tokens/s)."""
    shortest = min(next(iter(f.values())).shape[0] for f in feats)
    window = min(settings.window, shortest)
    if window < 2:
        raise InvalidParameterError("the training sequences are too short (fewer than 2 tokens)")
    torch.manual_seed(settings.seed)
    module = kind.build(model).float().train()
    opt = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    meta = {"kind": kind.name, "options": kind.options, "settings": asdict(settings), "data": data_key}
    step, losses, seconds = 0, [], 0.0
    folder = Path(out) / CHECKPOINT
    if resume:
        step, losses, seconds = _load_checkpoint(folder, module, opt, gen, meta)
    tokens_per_step = settings.batch * window
    t0, start = time.perf_counter(), step  # this session's steps: the bar's tokens/s
    fields = "loss {loss:.3f}  {tps:.0f} tok/s"
    with Bar("training", settings.steps, enabled=progress, fields=fields, completed=step, loss=float("nan"), tps=0.0) as bar:
        while step < settings.steps:
            for group in opt.param_groups:
                group["lr"] = settings.lr_at(step)
            batch = _batch(feats, window, settings.batch, gen)
            loss = kind.loss(module, model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            elapsed = time.perf_counter() - t0
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                _save_checkpoint(folder, module, opt, gen, step, losses, seconds + elapsed, meta)
            bar.advance(loss=sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]),
                        tps=(step - start) * tokens_per_step / elapsed)
    seconds += time.perf_counter() - t0
    module.eval()
    decided = kind.finish(module, model, feats)  # may set options (LITE's exit) before they are saved
    tail = losses[-LOSS_WINDOW:]
    summary = {**decided, "steps": step, "first_loss": losses[0] if losses else None,
               "final_loss": sum(tail) / len(tail) if tail else None, "train_seconds": round(seconds, 2),
               "tokens_per_s": round(step * tokens_per_step / seconds, 1) if seconds else 0.0,
               "window": window, "settings": asdict(settings)}
    save_drafter(Path(out), kind, module, model, **summary)
    return module, summary
