"""model.numbers: the one reading of a decimal number typed by a person (API form fields, command-line options)."""

from __future__ import annotations

import pytest

from model.numbers import parse_decimal


@pytest.mark.parametrize(("text", "value"), [("0.05", 0.05), ("-1e-2", -0.01), (" 1E-3 ", 0.001), (".5", 0.5),
                                             ("+2", 2.0), ("3.", 3.0), ("0001", 1.0)])
def test_plain_decimals_are_read(text, value):
    assert parse_decimal(text) == value


@pytest.mark.parametrize("text", ["0_1", "1_0", "0.0_5", "nan", "inf", "-Infinity", "1e999", "\u0661", "0x1", "",
                                  "1,5", "1e", "e3", ".", "--1", "1 0"])
def test_what_float_would_also_read_or_overflow_is_not_a_number_here(text):
    """``float()`` reads the first six (1_0 is 10; U+0661 is Arabic-Indic 1): none is what a person typing a
    threshold means."""
    assert parse_decimal(text) is None
