"""The playground page: the form, and one panel per generation of ``?ids=``. Thin: logic is in services."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse

from ..ownership import owned, possible_pks
from ..training.models import Job
from . import services
from .forms import PlaygroundForm
from .models import Generation

MAX_PANELS = 10


@login_required
def playground(request: HttpRequest) -> HttpResponse:
    generations = _requested_generations(request)
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
        form = PlaygroundForm(user=request.user, initial=_initial(request, generations))
    return render(request, "playground/index.html", {"form": form, "generations": generations})


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


def _initial(request: HttpRequest, generations: list[Generation]) -> dict:
    """The shown generations' prompt and settings (to try again), or ``?job=N`` from a job's page."""
    if generations:
        first = generations[0]
        job_id = next((generation.job_id for generation in generations if generation.job_id is not None), None)
        return {"job": job_id, "base_model": first.base_model, "prompt": first.prompt, "chat": first.chat,
                "max_new_tokens": first.max_new_tokens, "temperature": first.temperature, "seed": first.seed}
    initial: dict = {}
    job_id = request.GET.get("job", "")
    if job_id.isdecimal():  # isdigit() also takes "²", which int() refuses
        job = owned(Job, request.user).filter(pk=int(job_id)).first()
        if job is not None:
            initial.update(job=job.pk, base_model=job.base_model)
    return initial
