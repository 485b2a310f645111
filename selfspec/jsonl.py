"""The one reader of JSONL prompt files (calibration prompts, bench suites, distillation data):
one JSON object a line, blank lines skipped, each row validated by a pydantic model; a bad row is
an `InvalidParameterError` that names the file, the line and the field."""
from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from selfspec.errors import InvalidParameterError

# Strings, never coerced from numbers: NonBlank has a non-space character, NonEmpty any character.
NonBlank = Annotated[str, StringConstraints(strict=True, pattern=r"\S")]
NonEmpty = Annotated[str, StringConstraints(strict=True, min_length=1)]


class Row(BaseModel):
    """Base of the row models: unknown keys are ignored, rows are immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True)


R = TypeVar("R", bound=Row)


def _message(e: ValidationError) -> str:
    err = e.errors(include_url=False)[0]
    kind, field = err["type"], next((str(p) for p in err["loc"] if isinstance(p, str)), "")
    if kind == "json_invalid":
        return "not JSON"
    if kind == "value_error":  # a row model's own check: its message as it is
        return err["msg"].removeprefix("Value error, ")
    if not field:
        return "expected a JSON object"
    if kind in ("list_type", "too_short") or len(err["loc"]) > 1:
        return f'"{field}" must be a non-empty list of non-empty strings'
    return f'"{field}" must be a non-empty string'


def read_rows(text: str, source: str, row: type[R]) -> list[R]:
    """The rows of the JSONL `text` (from `source`, named in errors) as `row` models; at least one."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(row.model_validate_json(line))
        except ValidationError as e:
            raise InvalidParameterError(f"{source} line {n}: {_message(e)}") from None
    if not rows:
        raise InvalidParameterError(f"{source} holds no rows")
    return rows
