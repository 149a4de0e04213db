"""The bytes of dataset files as users upload them."""

from __future__ import annotations

import json


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()
