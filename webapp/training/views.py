"""Job pages: list, new, detail, cancel, resume, adapter download. Thin: logic is in services."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from ..ownership import get_owned_or_404, owned
from . import services
from .adapter_package import build_adapter_zip, zip_name
from .forms import JobForm
from .models import Job, MetricPoint


@login_required
def job_list(request: HttpRequest) -> HttpResponse:
    jobs = owned(Job, request.user).select_related("trunk")
    return render(request, "training/job_list.html", {"jobs": jobs})


@login_required
def job_new(request: HttpRequest) -> HttpResponse:
    form = JobForm(request.POST or None, user=request.user, initial={"dataset": request.GET.get("dataset")})
    if request.method == "POST" and form.is_valid():
        job = services.create_job(form.save())
        messages.success(request, f"Job {job.pk} is queued.")
        return redirect("training:job-detail", pk=job.pk)
    return render(request, "training/job_new.html", {"form": form})


@login_required
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_owned_or_404(Job.objects.select_related("trunk", "dataset"), request.user, pk=pk)
    points = list(MetricPoint.objects.filter(job=job).order_by("-step", "kind")[:30])
    return render(request, "training/job_detail.html", {"job": job, "points": points,
                                                         "hyperparameters": job.hyperparameters()})


@login_required
@require_POST
def job_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_owned_or_404(Job, request.user, pk=pk)
    try:
        job = services.cancel_job(job)
        messages.success(request, "Cancelled." if job.status == Job.Status.CANCELLED
                         else "The job stops after its current step and keeps a checkpoint.")
    except services.JobStateError as exc:
        messages.error(request, str(exc))
    return redirect("training:job-detail", pk=job.pk)


@login_required
@require_POST
def job_resume(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_owned_or_404(Job, request.user, pk=pk)
    try:
        services.resume_job(job)
        messages.success(request, "Queued again; it continues from its last checkpoint.")
    except services.JobStateError as exc:
        messages.error(request, str(exc))
    return redirect("training:job-detail", pk=job.pk)


@login_required
def job_adapter(request: HttpRequest, pk: int) -> FileResponse:
    return adapter_response(get_owned_or_404(Job, request.user, pk=pk))


def adapter_response(job: Job) -> FileResponse:
    if not job.has_adapter:
        raise Http404("this job has no adapter (it has not succeeded)")
    return FileResponse(build_adapter_zip(job), as_attachment=True, filename=zip_name(job),
                        content_type="application/zip")
