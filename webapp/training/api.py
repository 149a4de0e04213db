"""The jobs API. Creation validates with the same JobForm as the page (api_input.py: which fields it takes)."""

from __future__ import annotations

from rest_framework import status
from rest_framework.decorators import api_view
from rest_framework.exceptions import ValidationError
from rest_framework.generics import ListCreateAPIView, RetrieveDestroyAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from ..api_fields import refuse_other_fields
from ..ownership import get_owned_or_404, owned
from ..pagination import MetricsPagination
from . import api_input, merged, services
from .models import Job, MetricPoint
from .serializers import JobSerializer, MetricPointSerializer
from .views import adapter_response, merged_response


class JobList(ListCreateAPIView):
    serializer_class = JobSerializer

    def get_queryset(self):
        return owned(Job, self.request.user).select_related("trunk").with_links()

    def create(self, request: Request, *args, **kwargs) -> Response:
        if not hasattr(request.data, "get"):
            raise ValidationError({"non_field_errors": ["send a JSON object"]})
        given = request.data.dict() if hasattr(request.data, "dict") else dict(request.data)
        form = api_input.job_form(given, request.user)
        if not form.is_valid():
            errors = {("non_field_errors" if k == "__all__" else k): v for k, v in form.errors.items()}
            return Response(errors, status=status.HTTP_400_BAD_REQUEST)
        job = services.create_job(form.save())
        return Response(JobSerializer(job).data, status=status.HTTP_201_CREATED)


class JobDetail(RetrieveDestroyAPIView):
    """GET the job; DELETE it and every file it stored (409 while it is queued or running)."""

    serializer_class = JobSerializer

    def get_queryset(self):
        return owned(Job, self.request.user).select_related("trunk").with_links()

    def destroy(self, request: Request, *args, **kwargs) -> Response:
        try:
            services.delete_job(self.get_object())
        except services.JobStateError as exc:
            return Response({"non_field_errors": [str(exc)]}, status=status.HTTP_409_CONFLICT)
        return Response(status=status.HTTP_204_NO_CONTENT)


def _state_action(action, request: Request, pk: int) -> Response:
    job = get_owned_or_404(Job, request.user, pk=pk)
    refuse_other_fields(request.data, accepted=())
    try:
        job = action(job)
    except services.JobStateError as exc:
        return Response({"non_field_errors": [str(exc)]}, status=status.HTTP_409_CONFLICT)
    return Response(JobSerializer(job).data)


@api_view(["POST"])
def job_cancel(request: Request, pk: int) -> Response:
    return _state_action(services.cancel_job, request, pk)


@api_view(["POST"])
def job_resume(request: Request, pk: int) -> Response:
    return _state_action(services.resume_job, request, pk)


@api_view(["GET"])
def job_metrics(request: Request, pk: int) -> Response:
    job = get_owned_or_404(Job, request.user, pk=pk)
    points = MetricPoint.objects.filter(job=job).order_by("step", "kind")
    after = request.query_params.get("after")
    if after is not None:
        try:
            points = points.filter(step__gt=int(after))
        except ValueError:
            return Response({"after": ["must be an integer step"]}, status=status.HTTP_400_BAD_REQUEST)
    paginator = MetricsPagination()
    page = paginator.paginate_queryset(points, request)
    return paginator.get_paginated_response(MetricPointSerializer(page, many=True).data)


@api_view(["GET"])
def job_adapter(request: Request, pk: int):
    return adapter_response(get_owned_or_404(Job, request.user, pk=pk))


@api_view(["GET", "POST"])
def job_merged(request: Request, pk: int):
    """The merged model (base + adapter in one model). POST asks a worker to build it: 202 with its state
    while it builds, 200 once built, 409 for a job that has not succeeded. GET: the zip once built, else
    409 with the state (``merged_status``: none, building or failed, and ``detail``: what to do)."""
    job = get_owned_or_404(Job, request.user, pk=pk)
    if request.method == "POST":
        refuse_other_fields(request.data, accepted=())
        try:
            job, _started = merged.request_merged(job)
        except services.JobStateError as exc:
            return Response({"non_field_errors": [str(exc)], **merged.state(job)}, status=status.HTTP_409_CONFLICT)
        ready = job.merged_status == Job.MergedStatus.READY
        return Response(merged.state(job), status=status.HTTP_200_OK if ready else status.HTTP_202_ACCEPTED)
    if job.has_merged:
        return merged_response(job)
    return Response(merged.state(job), status=status.HTTP_409_CONFLICT)
