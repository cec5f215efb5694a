"""float8 bytes (E4M3FN, E5M2) widened to float32 exactly, for reading (numpy has no float8): the
family check samples them."""

from __future__ import annotations

from typing import Any

import numpy as np


def _float8_table(exponent_bits: int, mantissa_bits: int, *, ieee_specials: bool) -> np.ndarray:
    """float32 values of every float8 byte (E4M3FN: no inf, S.1111.111 is NaN; E5M2: IEEE-style)."""
    bias = (1 << (exponent_bits - 1)) - 1
    top = (1 << exponent_bits) - 1
    values = np.empty(256, dtype=np.float32)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exponent = (byte >> mantissa_bits) & top
        fraction = (byte & ((1 << mantissa_bits) - 1)) / (1 << mantissa_bits)
        if exponent == top and ieee_specials:
            values[byte] = sign * np.inf if fraction == 0 else np.nan
        elif exponent == top and fraction == 1 - 1 / (1 << mantissa_bits):
            values[byte] = np.nan
        elif exponent == 0:
            values[byte] = sign * fraction * 2.0 ** (1 - bias)
        else:
            values[byte] = sign * (1 + fraction) * 2.0 ** (exponent - bias)
    return values


FLOAT8_TABLES = {"F8_E4M3": (4, 3, False), "F8_E5M2": (5, 2, True)}


def float8_to_f32(raw: Any, code: str) -> np.ndarray:
    """float8 bytes widened to float32 exactly (numpy has no float8): for reading, e.g. the family check."""
    return _float8_table(*FLOAT8_TABLES[code][:2], ieee_specials=FLOAT8_TABLES[code][2])[np.frombuffer(raw, np.uint8)]
