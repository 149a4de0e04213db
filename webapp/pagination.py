"""Pagination of the API lists: ``?limit=&offset=``, with the limit capped.

Without a cap a huge ``?limit=`` goes to the database as is, which refuses it (a 500).
"""

from __future__ import annotations

from rest_framework.pagination import LimitOffsetPagination


class CappedLimitOffsetPagination(LimitOffsetPagination):
    max_limit = 1000  # a larger ?limit= gets this many


class MetricsPagination(CappedLimitOffsetPagination):
    """A job's metric points: pages of 1000 by default (a long job has one point per step)."""

    default_limit = 1000
    max_limit = 5000
