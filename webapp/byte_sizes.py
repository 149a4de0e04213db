"""Byte counts for people, in binary units: "80 GiB", "1.2 GiB", "512 MiB"."""

from __future__ import annotations

UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(size: int) -> str:
    """The largest unit that keeps the number at 1 or more, with one decimal when it has one."""
    if size < 1024:
        return f"{size:,} B"
    value = float(size)
    for unit in UNITS:
        value /= 1024
        if value < 1023.95 or unit == UNITS[-1]:  # from 1023.95 on, one decimal prints 1,024
            break
    return f"{value:,.1f}".removesuffix(".0") + f" {unit}"
