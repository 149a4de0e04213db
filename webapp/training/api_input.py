"""A job as the API asks for it: which fields a POST to ``/api/jobs/`` takes, and how a preset combines.

The API validates with the page's JobForm, but a JSON request is not a posted form: it names only
the fields it sets. So here every field given is either honoured or refused (never dropped):

- fields outside the form are refused, read-only ones (``status``, ``current_step``...) as such;
- booleans must be true or false (the form alone would read any other value as one of them);
- a preset fills the run length the request leaves out (``epochs``, ``learning_rate``); a
  ``max_steps`` given beside it sets the length instead of the preset's epochs;
- ``epochs`` and ``max_steps`` together are refused: one sets the run length.
Fields left out take the form's defaults (the balanced preset's run length).
"""

from __future__ import annotations

from django import forms
from rest_framework.exceptions import ValidationError

from ..api_fields import refuse_other_fields
from . import presets
from .forms import FIELDS, JobForm
from .serializers import JobSerializer

ACCEPTED_FIELDS = (*FIELDS, "preset")
READ_ONLY_FIELDS = tuple(name for name in JobSerializer.Meta.fields if name not in ACCEPTED_FIELDS)
_TRUE_FALSE = {"true": True, "false": False}


def job_form(given: dict, user) -> JobForm:
    """A bound JobForm for the request's fields ``given``; ValidationError (400) for a field it cannot honour."""
    refuse_other_fields(given, ACCEPTED_FIELDS, READ_ONLY_FIELDS)
    defaults = JobForm(user=user, base_model=given.get("base_model")).fields
    _check_booleans(given, defaults)
    if _given(given, "epochs") and _given(given, "max_steps"):
        raise ValidationError({"max_steps": ["give epochs or max_steps, not both: each sets the run length on its "
                                             "own (max_steps counts optimizer steps, epochs passes over the data)"]})
    data = {name: field.initial for name, field in defaults.items()
            if field.initial is not None and name != "preset"}
    chosen = presets.BY_KEY.get(given.get("preset")) if isinstance(given.get("preset"), str) else None
    if chosen is not None:
        # The preset fills what the request leaves out; the form then keeps the request's values as given.
        data.update(epochs=chosen.epochs, learning_rate=chosen.learning_rate)
        given = {**given, "preset": presets.CUSTOM}
    return JobForm(data={**data, **given}, user=user)


def _given(given: dict, name: str) -> bool:
    return given.get(name) not in (None, "")


def _check_booleans(given: dict, fields: dict) -> None:
    errors = {}
    for name, value in given.items():
        field = fields.get(name)
        if not isinstance(field, forms.BooleanField) or isinstance(value, bool):
            continue
        if isinstance(value, str) and value.lower() in _TRUE_FALSE:
            continue
        if value is None and isinstance(field, forms.NullBooleanField):
            continue  # null: the default
        errors[name] = [f"{name} must be true or false, not {value!r}"]
    if errors:
        raise ValidationError(errors)
