"""A pool's learned model as a file (``provisioner model export`` / ``import``).

The forecast learns its chances, the boot time and the release rate in the pool's model hash
(lua/includes/policy.lua). Exported, that model can start another pool, or this one after its
data was lost, from what was learned instead of from the priors. The import goes through
lua/load_model.lua, which checks every field and writes all of them or none.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from provisioner import jsontext

FORMAT = "provisioner-model/1"


class ModelFileError(ValueError):
    """A model file that cannot be imported."""


def model_document(raw: Mapping[str, str], learned: Collection[str], pool: str,
                   now_ms: int) -> dict[str, Any]:
    """The export of a model hash `raw`: the fields of it the forecast learns (`learned`, from
    lua/model_view.lua, so the scripts alone name them) as numbers, and what it was learned
    over. The hash's other fields belong to the running pool (the decay's clock, the forecast's
    check of itself, the horizon and window of the last tick) and are left out. A learned field
    whose value is not a non-negative finite number (a hand repair gone wrong; load_model.lua
    would refuse it) is left out and named under `skipped`."""
    fields: dict[str, float] = {}
    skipped: list[str] = []
    for name in sorted(raw):
        if name not in learned:
            continue
        value = _learned(raw[name])
        if value is None:
            skipped.append(name)
        else:
            fields[name] = value
    over = {name: value for name in ("horizon_ms", "window_ms")
            if (value := _learned(raw.get(name))) is not None}
    document: dict[str, Any] = {"format": FORMAT, "pool": pool, "exported_ms": now_ms,
                                "learned_over": over, "fields": fields}
    if skipped:
        document["skipped"] = skipped
    return document


def read_model_file(path: Path) -> dict[str, float]:
    """`read_document` of a file; one that is not UTF-8 text is a ModelFileError too."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelFileError(f"{path} is not UTF-8 text") from None
    return read_document(text)


def read_document(text: str) -> dict[str, float]:
    """The fields of a model file, or ModelFileError saying what is wrong with it. Only the
    file's shape is checked here; which fields and values a pool accepts, load_model.lua
    decides."""
    try:
        document = jsontext.loads(text)
    except ValueError as exc:  # not JSON, nested too deep, or an integer too long to read
        raise ModelFileError(f"not JSON: {str(exc)[:120]}") from None
    if not isinstance(document, dict):
        raise ModelFileError("not a model file: the top level is not an object")
    if document.get("format") != FORMAT:
        raise ModelFileError(f"not a model file: format is {document.get('format')!r}, "
                             f"expected {FORMAT!r}")
    fields = document.get("fields")
    if not isinstance(fields, dict) or not fields:
        raise ModelFileError("the model file has no fields")
    # A number past a float's range (an integer of 400 digits, 1e999, which JSON reads as
    # infinity) or Infinity or NaN: said so, where an operator's drill was told the first was
    # "not a number" and the second "inf", which the file did not hold.
    numbers: dict[str, float] = {}
    bad: list[str] = []
    unbounded: list[str] = []
    for key, value in fields.items():
        name = str(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            bad.append(name)
            continue
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            numbers[name] = number
        else:
            unbounded.append(name)
    if bad:
        raise ModelFileError(f"fields whose values are not numbers: {_names(sorted(bad))}")
    if unbounded:
        raise ModelFileError("fields whose values are not finite numbers (past a float's range, "
                             f"±1.8e308, or Infinity or NaN): {_names(sorted(unbounded))}")
    return numbers


def _names(names: list[str]) -> str:
    return ", ".join(name[:40] for name in names[:10]) + (" ..." if len(names) > 10 else "")


def _learned(raw: str | None) -> float | None:
    """`raw` as a learned value (a non-negative finite number, as the forecast reads it), or
    None."""
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
