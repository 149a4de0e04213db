"""Dataset pages: list with upload, detail with token statistics and preview, delete."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from webapp.ownership import get_owned_or_404, owned

from .. import base_models
from ..byte_sizes import format_bytes
from ..storage import usage
from . import services
from .demo import DEMO_NAME, add_demo_dataset, demo_dataset_of
from .forms import StatisticsForm, UploadForm
from .models import Dataset


def _dataset_for(request: HttpRequest, dataset_id: int) -> Dataset:
    return get_owned_or_404(Dataset, request.user, pk=dataset_id)


def _render_list(request: HttpRequest, form: UploadForm, status: int = 200) -> HttpResponse:
    datasets = owned(Dataset, request.user)
    context = {
        "datasets": datasets,
        "form": form,
        "max_upload": format_bytes(settings.DATASET_MAX_UPLOAD_BYTES),
        "max_upload_bytes": settings.DATASET_MAX_UPLOAD_BYTES,
        "storage": usage(request.user),
        "demo_name": DEMO_NAME,
        "has_demo": demo_dataset_of(request.user) is not None,
    }
    return render(request, "datasets/list.html", context, status=status)


@login_required
@require_http_methods(["GET", "HEAD"])
def dataset_list(request: HttpRequest) -> HttpResponse:
    return _render_list(request, UploadForm())


@login_required
@require_POST
def dataset_upload(request: HttpRequest) -> HttpResponse:
    form = UploadForm(request.POST, request.FILES)
    if form.is_valid():
        try:
            dataset = services.create_dataset(request.user, form.cleaned_data["file"], form.cleaned_data["name"])
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, f"Uploaded {dataset.name}: {dataset.num_examples} examples.")
            return redirect("datasets:detail", dataset_id=dataset.pk)
    return _render_list(request, form, status=400)


@login_required
@require_POST
def dataset_add_demo(request: HttpRequest) -> HttpResponse:
    try:
        dataset = add_demo_dataset(request.user)
    except ValidationError as exc:
        messages.error(request, f"Could not add the demo dataset: {' '.join(exc.messages)}")
        return redirect("datasets:list")
    messages.success(request, f"Added {dataset.name}: {dataset.num_examples} examples.")
    return redirect("datasets:detail", dataset_id=dataset.pk)


@login_required
@require_http_methods(["GET", "HEAD"])
def dataset_detail(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = _dataset_for(request, dataset_id)
    models = base_models.installed_models()
    form = StatisticsForm(request.GET, models=models, default_model=base_models.default_model_id())
    context = {"dataset": dataset, "form": form, "models": models, "stats": None, "stats_pending": False,
               "preview": [], "error": "", "chat_format": None}
    if models and form.is_valid():
        model_id, max_length = form.choice()
        try:
            context["stats"] = services.page_statistics(dataset, model_id, max_length)
            context["stats_pending"] = context["stats"] is None
            context["preview"] = services.dataset_preview(dataset, model_id, max_length)
            context["chat_format"] = services.trains_in_chat_template(dataset, model_id)
        except ValueError as exc:
            context["error"] = f"Cannot tokenize this dataset with {model_id}: {exc}"
    return render(request, "datasets/detail.html", context, status=400 if models and form.errors else 200)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def dataset_delete(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = _dataset_for(request, dataset_id)
    in_use = ""
    if request.method == "POST":
        try:
            services.delete_dataset(dataset)
        except services.DatasetInUse as exc:
            in_use = str(exc)
        else:
            messages.success(request, f"Deleted {dataset.name}.")
            return redirect("datasets:list")
    return render(request, "datasets/confirm_delete.html", {"dataset": dataset, "in_use": in_use},
                  status=409 if in_use else 200)
