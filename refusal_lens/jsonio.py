"""JSON-safe values: the one cleaning step every result's ``.save`` uses before ``json.dumps``.

Python's ``json`` writes ``NaN`` / ``Infinity``, which are not JSON (browsers and ``jq`` reject them); the
results of this package use ``nan`` for "not computed" (e.g. a candidate's unscored KL).
"""

from __future__ import annotations

import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` fit for strict JSON: non-finite floats become ``None``, dict keys become strings.

    Example:
        >>> json_safe({1.0: float("nan"), "x": [1, float("inf")]})
        {'1.0': None, 'x': [1, None]}
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
