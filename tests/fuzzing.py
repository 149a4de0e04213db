"""What the fuzz tests share: Hypothesis profiles and a byte-level mutator.

The default profile, ``ci``, is deterministic: the same examples on every run
(``derandomize``), no example database on disk and no per-example deadline, so a
loaded CI machine cannot turn slowness into a flaky failure. For a local bug hunt,
``HYPOTHESIS_PROFILE=explore`` draws fresh random examples, ``EXPLORE_FACTOR`` times
as many, and prints a blob to reproduce any failure with ``@reproduce_failure``.
"""

from __future__ import annotations

import os

from hypothesis import settings
from hypothesis import strategies as st

EXPLORE_FACTOR = 20

settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=False)
settings.register_profile("explore", derandomize=False, deadline=None, database=None, print_blob=True)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(ci_count: int) -> int:
    """``max_examples`` for a test: ``ci_count`` in CI, many more when exploring."""
    return ci_count * EXPLORE_FACTOR if PROFILE == "explore" else ci_count


@st.composite
def mutated(draw, base: bytes, interesting: st.SearchStrategy[bytes], max_huge: int = 40_000) -> bytes:
    """``base`` after a few random edits: insertions (random or ``interesting`` bytes),
    deletions, byte flips, duplicated slices, truncation, a long run of one byte pattern."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "interesting", "delete", "flip", "duplicate", "truncate", "huge"]))
        if edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "interesting":
            data[at:at] = draw(interesting)
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif edit == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "duplicate":
            end = draw(st.integers(at, min(len(data), at + 64)))
            data[at:at] = data[at:end]
        elif edit == "truncate":
            del data[at:]
        elif edit == "huge":
            data[at:at] = draw(interesting) * draw(st.integers(1, max_huge))
    return bytes(data)
