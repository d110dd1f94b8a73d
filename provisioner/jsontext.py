"""JSON from outside the process: a file, an HTTP answer, a value another writer left in Redis."""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """`json.loads`, where JSON nested too deep is a ValueError like any other JSON that cannot
    be read (the decoder's recursion raises RecursionError, which its callers did not expect)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def loads_finite(text: str | bytes) -> Any:
    """`loads`, where what JSON has not and Python's reader takes (NaN, Infinity, 1e999) is a
    ValueError too: a value read to be written out again as JSON (`--json`, which jq reads)."""
    value = loads(text)
    json.dumps(value, allow_nan=False)
    return value
