"""Secrets never appear in logs, pages, downloads or API output: trunk tokens, API tokens and job keys."""

from __future__ import annotations

import io
import json
import urllib.request
import zipfile

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from web_fixtures import TINY_MODEL_ID, wait_for_job

from webapp.training.models import Job

pytestmark = pytest.mark.django_db(transaction=True)


def test_tokens_stay_out_of_logs_pages_and_api_output(client, owner, registered_trunk, web_trunk, celery_worker,
                                                      web_server, web_dirs):
    api_token = Token.objects.create(user=owner).key
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {api_token}")
    content = io.BytesIO("\n".join(json.dumps({"text": f"line {i}"}) for i in range(12)).encode())
    content.name = "lines.jsonl"
    dataset = api.post("/api/datasets/", {"file": content}, format="multipart").json()["id"]
    job = api.post("/api/jobs/", {"dataset": dataset, "base_model": TINY_MODEL_ID, "max_steps": 3,
                                  "batch_size": 2, "max_seq_length": 16}, format="json").json()["id"]
    assert wait_for_job(job, worker=celery_worker).status == "succeeded"

    outputs = [api.get(path).content for path in ("/api/jobs/", f"/api/jobs/{job}/", f"/api/jobs/{job}/metrics/",
                                                    "/api/trunks/", "/api/models/", "/api/datasets/")]
    request = urllib.request.Request(f"{web_server.url}/api/jobs/{job}/",
                                     headers={"Authorization": f"Token {api_token}"})
    outputs.append(urllib.request.urlopen(request, timeout=30).read())  # through daphne, into its access log
    client.force_login(owner)
    outputs += [client.get(path).content for path in ("/jobs/", f"/jobs/{job}/", "/datasets/", "/playground/")]
    download = client.get(f"/jobs/{job}/adapter/")
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content)))
    outputs += [bundle.read(name) for name in bundle.namelist()]
    logs = [path.read_bytes() for path in web_dirs["logs"].rglob("*.log")] + [web_trunk.log_path.read_bytes()]
    assert len(logs) >= 2, "the worker's and the trunk's logs are read"
    key = bytes(Job.objects.get(pk=job).secret.key)  # the job's own key, drawn when it was created
    for secret in (web_trunk.token.encode(), api_token.encode(), key, key.hex().encode()):
        for text in outputs + logs:
            assert secret not in text
