"""One place that decides what a user may see: their own objects; everything else is 404."""

from __future__ import annotations

from django.db.models import Model, QuerySet
from django.http import Http404


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
