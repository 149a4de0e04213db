"""The playground page (the form, one panel per generation of ``?ids=``, the user's recent
comparisons) and the Stop button's endpoint. Thin: logic is in services."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from ..ownership import get_owned_or_404, owned, possible_pks
from ..training.models import Job
from . import services
from .forms import PlaygroundForm
from .history import HISTORY_SIZE, recent_comparisons
from .models import Generation

MAX_PANELS = 10


@login_required
def playground(request: HttpRequest) -> HttpResponse:
    generations = _requested_generations(request)
    requested_job = None if generations else _requested_job(request)
    job_problem = "" if generations else _job_problem(request, requested_job)
    if request.method == "POST":
        form = PlaygroundForm(request.POST, user=request.user)
        if form.is_valid():
            try:
                created = services.start_comparison(request.user, **form.comparison_arguments())
            except ValidationError as exc:
                form.add_error(None, exc)  # a message per field, like the form's own
            else:
                ids = ",".join(str(generation.pk) for generation in created)
                return redirect(f"{reverse('playground:index')}?ids={ids}")
    else:
        form = PlaygroundForm(user=request.user, initial=_initial(generations, requested_job))
    return render(request, "playground/index.html", {
        "form": form, "generations": generations, "job_problem": job_problem,
        "history": recent_comparisons(request.user), "history_size": HISTORY_SIZE})


@login_required
@require_POST
def stop(request: HttpRequest, pk: int) -> HttpResponse:
    """Stop a generation (the page's Stop button). Answers JSON to a script, else goes back to the page."""
    generation = get_owned_or_404(Generation, request.user, pk=pk)
    problem = ""
    try:
        generation = services.stop_generation(generation)
    except services.GenerationStateError as exc:
        problem = str(exc)
    if "application/json" in request.headers.get("Accept", ""):
        return JsonResponse({"generation": generation.pk, "status": generation.status,
                             "stop_requested": generation.stop_requested, "error": problem},
                            status=409 if problem else 200)
    if problem:
        messages.error(request, problem)
    else:
        messages.success(request, "Stopped." if generation.is_finished
                         else "It stops after the current token and keeps its text.")
    back = request.POST.get("next", "")
    if not (back.startswith(reverse("playground:index")) and url_has_allowed_host_and_scheme(
            back, allowed_hosts={request.get_host()}, require_https=request.is_secure())):
        back = f"{reverse('playground:index')}?ids={generation.pk}"
    return redirect(back)


def _requested_generations(request: HttpRequest) -> list[Generation]:
    """The generations of ``?ids=1,2`` in that order; any id that is not the user's is a 404."""
    raw = request.GET.get("ids", "").strip()
    if not raw:
        return []
    try:
        ids = list(dict.fromkeys(int(part) for part in raw.split(",") if part.strip()))
    except ValueError as exc:
        raise Http404("not found") from exc
    if len(ids) > MAX_PANELS:
        raise Http404(f"at most {MAX_PANELS} generations on one page")
    generations = owned(Generation.objects.select_related("job"), request.user).filter(pk__in=possible_pks(ids))
    found = {generation.pk: generation for generation in generations}
    if len(found) != len(ids):
        raise Http404("not found")
    return [found[pk] for pk in ids]


def _initial(generations: list[Generation], job: Job | None) -> dict:
    """The shown generations' prompt and settings (to try again), or ``?job=N`` from a job's page."""
    if generations:
        first = generations[0]
        job_id = next((generation.job_id for generation in generations if generation.job_id is not None), None)
        return {"job": job_id, "base_model": first.base_model, "prompt": first.prompt, "chat": first.chat,
                "max_new_tokens": first.max_new_tokens, "temperature": first.temperature, "seed": first.seed}
    initial: dict = {}
    if job is not None and job.has_adapter:
        initial.update(job=job.pk, base_model=job.base_model)
    return initial


def _requested_job(request: HttpRequest) -> Job | None:
    """The user's job of ``?job=N`` (None when there is none: no such job, another user's, not a number)."""
    job_id = request.GET.get("job", "")
    if not job_id.isdecimal():  # isdigit() also takes "²", which int() refuses
        return None
    return owned(Job, request.user).filter(pk__in=possible_pks([int(job_id)])).first()


def _job_problem(request: HttpRequest, job: Job | None) -> str:
    """Why ``job``, the user's job of ``?job=``, cannot be tried ("" when it can, or when none was asked for)."""
    if not request.GET.get("job", "").strip():
        return ""
    if job is None:  # the same for another user's job as for a missing one
        return "There is no such job of yours: choose one of your succeeded jobs below."
    if job.has_adapter:
        return ""
    name = f"Job {job.pk} ({job.display_name})"
    if job.status == Job.Status.SUCCEEDED:
        return (f"{name} succeeded, but its adapter is not on this server, so it cannot be tried: ask an "
                "administrator about the jobs directory.")
    state = {Job.Status.CANCELLED: "was cancelled", Job.Status.FAILED: "failed", Job.Status.RUNNING: "is running",
             Job.Status.QUEUED: "is queued"}.get(job.status, f"is {job.status}")
    yet = " yet" if not job.is_finished else ""
    return f"{name} {state}, so it has no adapter{yet}: only succeeded jobs can be tried."
