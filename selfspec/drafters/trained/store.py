"""A trained drafter on disk: DIR/drafter.safetensors (the module's tensors) and DIR/drafter.json
({kind, model, model_sha256, options, steps, final_loss, train_seconds, ...}). Loading refuses
weights trained for another model. No pickle anywhere: tensors go to safetensors, the rest to JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selfspec.paths import atomic_output, atomic_write_json
from selfspec.errors import DrafterError

WEIGHTS, META = "drafter.safetensors", "drafter.json"


def model_sha256(model) -> str:
    """The model's identity (`registry.model_identity`; a registry model's pinned hash)."""
    from selfspec.drafters.skipspace import model_identity

    return model_identity(model)[1]


def write_json(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj, indent=2)  # never a half-written file


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_output(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))


def save_drafter(out: Path, kind, module: torch.nn.Module, model, **meta) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / WEIGHTS, module.state_dict())
    write_json(out / META, {"kind": kind.name, "draft": kind.drafter_name, "model": model.name,
                            "model_sha256": model_sha256(model), "options": kind.options, **meta})


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META
    try:
        return json.loads(path.read_text())
    except OSError:
        raise DrafterError(f"no trained drafter in {folder} (missing {META}); train one with "
                           f"`selfspec train-drafter --out {folder}`") from None
    except ValueError as e:
        raise DrafterError(f"{path} is not valid JSON: {e}") from None


def load_drafter(model, folder: str | Path, draft: str | None = None, **drafter_kwargs):
    """The drafter saved in `folder`, for `model`. `draft`: the --draft value asked for; weights
    of another kind are an error, as are weights trained for another model."""
    from selfspec.drafters.trained.kinds import KINDS, canonical_kind, make_kind

    meta = read_meta(folder)
    kind_name = canonical_kind(meta.get("kind"))  # drafters stored under an old kind name still load
    if kind_name not in KINDS:
        raise DrafterError(f"{folder}: unknown drafter kind {kind_name!r}; kinds: {', '.join(KINDS)}")
    if draft is not None and KINDS[kind_name].drafter_name != draft:
        raise DrafterError(f"{folder} holds a {kind_name} drafter (use --draft {KINDS[kind_name].drafter_name}), "
                           f"not one for --draft {draft}")
    from selfspec.models.registry import identity_matches

    if meta.get("model_sha256") != model_sha256(model) and not identity_matches(
            meta.get("model_sha256"), model.path, f"trained drafter {folder}"):
        raise DrafterError(f"the drafter in {folder} was trained for model {meta.get('model')!r} "
                           f"(sha256 {str(meta.get('model_sha256'))[:12]}...), not {model.name!r}; train one "
                           f"for it with `selfspec train-drafter --model {model.name}`")
    kind = make_kind(kind_name, model, **meta.get("options", {}))
    module = kind.build(model)
    try:
        module.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    except (OSError, RuntimeError) as e:
        raise DrafterError(f"cannot load {Path(folder) / WEIGHTS}: {str(e).splitlines()[0]}") from None
    return kind.drafter(module, model, **drafter_kwargs)
