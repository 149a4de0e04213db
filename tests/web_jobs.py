"""Training jobs for the web tests: a dataset uploaded through the API, the settings of a tiny job, and a
succeeded job whose adapter was exported without training it."""

from __future__ import annotations

import io
import json

from django.conf import settings
from django.utils import timezone
from lora_helpers import trained_parts
from web_fixtures import TINY_MODEL_ID

from splitcore import LoraSettings, export_parts_adapter
from webapp.training.models import Job

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(24)]
JOB = {"base_model": TINY_MODEL_ID, "max_steps": 6, "batch_size": 2, "grad_accum_steps": 2, "max_seq_length": 32,
       "learning_rate": 0.02, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "val_fraction": 0.2}


def jsonl_file(name="sums.jsonl"):
    data = ("\n".join(json.dumps(r) for r in ROWS) + "\n").encode()
    return io.BytesIO(data), name


def upload(api) -> int:
    content, name = jsonl_file()
    content.name = name
    response = api.post("/api/datasets/", {"file": content, "name": "sums"}, format="multipart")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def exported_job(owner, base_model: str = TINY_MODEL_ID) -> Job:
    """A succeeded job without training it: an adapter exported from the tiny model's parts, nonzero."""
    job = Job.objects.create(owner=owner, dataset_name="sums", base_model=base_model, max_steps=2,
                             status=Job.Status.SUCCEEDED, current_step=2, total_steps=2, train_examples=8,
                             val_examples=0, last_loss=1.0, finished_at=timezone.now())
    model_dir = settings.MODELS_DIR / TINY_MODEL_ID
    lora = LoraSettings(r=4, alpha=8)
    family, parts = trained_parts(model_dir, lora)
    export_parts_adapter(parts, job.adapter_dir, family, lora, str(model_dir))
    return job
