"""One place that decides what a user may see: their own objects; everything else is 404."""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Model, QuerySet
from django.http import Http404

# Primary keys are 64-bit signed integers. A larger id matches no row; in ``pk__in`` it
# would not even reach the query (the database driver overflows), so it is dropped first.
MAX_PK = 2**63 - 1


def owned(queryset_or_model: type[Model] | QuerySet, user) -> QuerySet:
    """The objects of ``user`` (none for an anonymous user)."""
    queryset = queryset_or_model if isinstance(queryset_or_model, QuerySet) else queryset_or_model.objects.all()
    if not getattr(user, "is_authenticated", False):
        return queryset.none()
    return queryset.filter(owner=user)


def get_owned_or_404(queryset_or_model: type[Model] | QuerySet, user, **lookup) -> Model:
    queryset = owned(queryset_or_model, user)
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError) as exc:  # a bad id is not found either
        raise Http404("not found") from exc


def possible_pks(ids: Iterable[int]) -> list[int]:
    """``ids`` without those no row can have (outside the primary key's range), in their order."""
    return [pk for pk in ids if 0 < pk <= MAX_PK]
