"""Numbers as people write them into a form field or an option: digits 0-9, a point, an exponent.

``float()`` (and pydantic, for form fields) also reads Python's underscores, so a threshold typed ``0_1`` was 1.0 and
``1_0`` was 10: another operating point without a word. Ids and counts have the same rule for whole numbers
(``app.api.schemas.Whole``).
"""

from __future__ import annotations

import math
import re

DECIMAL = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)(e[-+]?[0-9]+)?")
DECIMAL_HELP = "a finite number written with the digits 0-9, a point and an exponent (e.g. 0.05, -1e-2)"


def parse_decimal(text: str) -> float | None:
    """``text`` (any case, spaces around allowed) as a finite float, or None when it is not a plain decimal number
    (``1_0``, ``nan``, ``inf``, ``1e999``, other scripts' digits)."""
    text = text.strip().lower()
    if not DECIMAL.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None
