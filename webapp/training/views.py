"""Job pages: list, new, detail, cancel, resume, adapter and merged-model downloads. Thin: logic is in services
and merged.py."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from ..byte_sizes import format_bytes
from ..ownership import get_owned_or_404, owned, possible_pks
from ..storage import directory_bytes, usage
from . import merged, presets, services
from .adapter_package import build_adapter_zip, zip_name
from .consumers import LOG_TAIL
from .estimates import estimate_context
from .forms import JobForm
from .models import Job, JobLog, MetricPoint
from .privacy import audit_summary, measured_context


@login_required
def job_list(request: HttpRequest) -> HttpResponse:
    jobs = owned(Job, request.user).select_related("trunk")
    return render(request, "training/job_list.html", {"jobs": jobs, "own_datasets": request.user.datasets.all(),
                                                       "storage": usage(request.user)})


@login_required
def job_compare(request: HttpRequest) -> HttpResponse:
    """Loss curves of several of the user's jobs on one chart, hyper-parameters side by side."""
    ids = possible_pks(int(part) for part in request.GET.getlist("ids") + request.GET.get("id", "").split(",")
                       if part.isdecimal())  # isdigit() also takes "²", which int() refuses
    chosen = list(owned(Job, request.user).filter(pk__in=ids).order_by("pk")) if ids else []
    curves = {job.pk: {"train": [], "val": []} for job in chosen}
    for point in MetricPoint.objects.filter(job__in=chosen).order_by("step"):
        if point.kind == MetricPoint.Kind.TRAIN:
            curves[point.job_id]["train"].append([point.step, point.loss])
        else:
            curves[point.job_id]["val"].append([point.step, point.val_loss])
    # A job without a single metric point (e.g. cancelled before its first step) has no curve to compare.
    jobs = [job for job in chosen if curves[job.pk]["train"] or curves[job.pk]["val"]]
    without_metrics = [job for job in chosen if job not in jobs]
    columns = [[("Dataset", job.dataset_name), *job.labelled_hyperparameters()] for job in jobs]
    # (label, one value per job, whether the values differ); every job has the same labels in the same order.
    rows = [(cells[0][0], [value for _, value in cells], len({value for _, value in cells}) > 1)
            for cells in zip(*columns)]
    series = [{"id": job.pk, "name": job.display_name, **curves[job.pk]} for job in jobs]
    candidates = owned(Job, request.user).filter(metrics__isnull=False).distinct()[:100]
    return render(request, "training/job_compare.html", {
        "jobs": jobs, "without_metrics": without_metrics, "rows": rows, "series": series, "candidates": candidates})


@login_required
def job_new(request: HttpRequest) -> HttpResponse:
    form = JobForm(request.POST or None, user=request.user, initial={"dataset": request.GET.get("dataset")})
    if request.method == "POST" and form.is_valid():
        job = services.create_job(form.save())
        return redirect("training:job-detail", pk=job.pk)  # its page says it is queued, and what follows
    advanced_open = form.is_bound and (any(field.errors for field in form.advanced_fields())
                                       or form.data.get("preset") == presets.CUSTOM)
    chains = form.chain_notes()
    return render(request, "training/job_new.html", {
        "form": form, "estimate_data": estimate_context(form), "advanced_open": advanced_open,
        "chain_notes": chains, "chain_note": chains["notes"].get(form.selected_model(), ""),
        **measured_context(form.recommended)})


@login_required
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_owned_or_404(Job.objects.select_related("trunk", "dataset"), request.user, pk=pk)
    points = list(MetricPoint.objects.filter(job=job).order_by("-step", "kind")[:30])
    logs = reversed(JobLog.objects.filter(job=job).order_by("-id")[:LOG_TAIL])
    return render(request, "training/job_detail.html", {
        "job": job, "points": points, "logs": logs, "status_line": job.status_line, "chain": job.chain(),
        "hyperparameters": job.labelled_hyperparameters(),
        "privacy": audit_summary(job), "privacy_setting": job.privacy_settings().describe(),
        "merged_size": format_bytes(job.merged_bytes) if job.merged_bytes is not None else "",
        "merged_retention": retention_words(settings.MERGED_RETENTION_HOURS)})


def retention_words(hours: float) -> str:
    """72 -> "3 days", 12 -> "12 hours", 0.5 -> "30 minutes"."""
    if hours >= 48 and hours % 24 == 0:
        return f"{hours / 24:g} days"
    if hours >= 1:
        return f"{hours:g} hour{'' if hours == 1 else 's'}"
    return f"{hours * 60:g} minutes"


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
@require_http_methods(["GET", "HEAD", "POST"])
def job_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """GET asks to confirm; POST deletes the job and every file it stored."""
    job = get_owned_or_404(Job, request.user, pk=pk)
    refused = ""
    if request.method == "POST":
        try:
            services.delete_job(job)
        except services.JobStateError as exc:
            refused = str(exc)
        else:
            messages.success(request, f"Deleted job {job.pk} ({job.display_name}) and everything it stored.")
            return redirect("training:job-list")
    return render(request, "training/job_confirm_delete.html",
                  {"job": job, "refused": refused, "stored": format_bytes(directory_bytes(job.directory))},
                  status=409 if refused else 200)


@login_required
def job_adapter(request: HttpRequest, pk: int) -> FileResponse:
    return adapter_response(get_owned_or_404(Job, request.user, pk=pk))


def adapter_response(job: Job) -> FileResponse:
    if not job.has_adapter:
        raise Http404("this job has no adapter (it has not succeeded)")
    return FileResponse(build_adapter_zip(job), as_attachment=True, filename=zip_name(job),
                        content_type="application/zip")


@login_required
@require_http_methods(["GET", "POST"])
def job_merged(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: the merged model's zip (404 until it is built); POST: have a worker build it."""
    job = get_owned_or_404(Job, request.user, pk=pk)
    if request.method == "GET":
        return merged_response(job)
    try:
        job, started = merged.request_merged(job)
    except services.JobStateError as exc:
        messages.error(request, str(exc))
        return redirect("training:job-detail", pk=job.pk)
    if started:
        messages.success(request, "Building the merged model: the download appears here when it is ready.")
    elif job.merged_status == Job.MergedStatus.READY:
        messages.info(request, "The merged model is built already: download it below.")
    else:
        messages.info(request, "The merged model is being built already: the download appears here when it is ready.")
    return redirect("training:job-detail", pk=job.pk)


def merged_response(job: Job) -> FileResponse:
    """The zip streamed from disk (never read into memory), with its Content-Length."""
    if not job.has_merged:
        raise Http404("this job's merged model is not built (build it on the job's page)")
    return FileResponse(job.merged_zip_path.open("rb"), as_attachment=True, filename=merged.zip_name(job),
                        content_type="application/zip")
