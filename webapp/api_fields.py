"""What a write to the API may carry: every field is either taken or refused, never dropped.

Each writable endpoint names the fields it accepts; a request carrying any other field is
refused with a 400 that names it: a read-only one (the server sets it) or an unknown one
(with the fields that endpoint accepts).
"""

from __future__ import annotations

from collections.abc import Iterable

from rest_framework.exceptions import ValidationError


def refuse_other_fields(given: Iterable[str], accepted: Iterable[str], read_only: Iterable[str] = ()) -> None:
    """Raise a ValidationError (400) naming each field of ``given`` outside ``accepted``."""
    accepted, read_only = set(accepted), set(read_only)
    what_is_taken = ", ".join(sorted(accepted)) if accepted else "no fields: send an empty body"
    errors = {}
    for name in given:
        if name in accepted:
            continue
        if name in read_only:
            errors[name] = [f"{name} is read-only: the server sets it; leave it out of the request"]
        else:
            errors[name] = [f"unknown field {name!r}; this endpoint accepts {what_is_taken}"]
    if errors:
        raise ValidationError(errors)
