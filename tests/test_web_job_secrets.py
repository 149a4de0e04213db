"""Each web job has a key of its own, kept on the site's side: two users' jobs with the same seed and settings
share no noise, no trunk seed and no private Bottom; the playground blurs prompts with the job's noise.

What the trunk receives is captured by a recording proxy registered as the site's trunk, in front of a real
trunk server; the jobs run in a real Celery worker process.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile

import pytest
import torch
from playground_helpers import wait_for_generations
from recording_proxy import start_proxy
from rest_framework.test import APIClient
from safetensors.torch import load as load_safetensors
from transformers import AutoTokenizer
from web_fixtures import TINY_MODEL_ID, wait_for_job

from splitcore.data.formats import parse_dataset
from splitcore.generation.local import encode_prompt
from splitcore.generation.split import SplitGenerator
from splitcore.privacy.noise import CLIP_MULTIPLE
from splitcore.remote.client import TrunkClient
from splitcore.remote.wire import decode_tensor
from splitcore.training import SplitEngine, SplitTrainer
from splitcore.training.batches import prepare_training_data
from webapp import base_models
from webapp.playground import services as playground
from webapp.training import services
from webapp.training.models import Job, JobSecret, site_client_secret
from webapp.trunks.health import check_trunk
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)

SEED = 7
ROWS = [{"text": f"entry {i}: the owner's private diary, page {i * 3}"} for i in range(12)]
# Two users' jobs with the same settings: hidden-state noise and a private Bottom on, one short step.
SETTINGS = {"base_model": TINY_MODEL_ID, "max_steps": 1, "batch_size": 2, "grad_accum_steps": 1,
            "max_seq_length": 16, "learning_rate": 0.001, "warmup_steps": 0, "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0, "val_fraction": 0.0, "seed": SEED, "hidden_noise": 1.0, "private_bottom": 0.5}
PROMPT = "Q: what did the diary say?\nA:"
# |correlation| of two independent Gaussian draws of ~2000 values stays far below this.
INDEPENDENT = 0.1


@pytest.fixture
def proxied_trunk(web_trunk, db):
    """The session's trunk behind a recording proxy, registered (checked and up) as the site's only trunk."""
    proxy = start_proxy(web_trunk.address)
    trunk = TrunkServer.objects.create(name="proxied", address=proxy.address, token=web_trunk.token)
    check_trunk(trunk)
    assert trunk.status == TrunkServer.Status.UP, trunk.last_error
    yield proxy.proxy
    proxy.stop()


def api_for(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def start_job(user, **overrides) -> Job:
    api = api_for(user)
    content = io.BytesIO(("\n".join(json.dumps(row) for row in ROWS) + "\n").encode())
    content.name = "diary.jsonl"
    dataset = api.post("/api/datasets/", {"file": content, "name": "diary"}, format="multipart")
    assert dataset.status_code == 201, dataset.content
    created = api.post("/api/jobs/", {**SETTINGS, **overrides, "dataset": dataset.json()["id"]}, format="json")
    assert created.status_code == 201, created.content
    return Job.objects.get(pk=created.json()["id"])


def run_job(user, proxy, worker) -> tuple[Job, object, torch.Tensor, torch.Tensor]:
    """Train a job through the proxy: (the job, its OpenSession request, the hidden states and the mask the trunk
    received at step 1)."""
    proxy.clear()
    job = wait_for_job(start_job(user).pk, worker=worker)
    assert job.status == "succeeded", job.error_message
    (opened,) = proxy.calls("OpenSession")
    assert opened.client_label == f"job {job.pk}"
    ((step, hidden),) = [(request, hidden) for request, hidden in proxy.hidden_states() if not request.evaluate]
    assert (step.step, step.micro_batch) == (1, 0)
    return job, opened, hidden, decode_tensor(step.attention_mask, "attention_mask")


def clean_bottom_output(job: Job, web_trunk) -> tuple[torch.Tensor, torch.Tensor]:
    """What the job's Bottom (with its private change, drawn from the job's key) computes for its step-1 batch,
    here, without noise: (hidden (batch, seq, hidden), mask (batch, seq))."""
    config = job.train_config()
    tokenizer = AutoTokenizer.from_pretrained(base_models.model_dir(job.base_model))
    with job.dataset.file.open("rb") as handle:
        examples = parse_dataset(handle.read(), job.dataset.original_filename).examples
    data = prepare_training_data(tokenizer, examples, config)
    with TrunkClient(web_trunk.address, web_trunk.token) as client:
        engine = SplitEngine(base_models.client_model(job.base_model), config, client, secret=job.client_secret())
        try:
            batch = SplitTrainer(engine, config, data, tokenizer.pad_token_id).micro_batches.batch(0)
            with torch.no_grad():
                return engine.bottom(batch.input_ids, batch.attention_mask), batch.attention_mask
        finally:
            engine.close()


def noise_part(received: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The noise of the positions the clipping left alone (received minus clean), and the noise's mean norm per
    position over the clean positions' median norm."""
    norms = clean.norm(dim=-1)  # (batch, seq)
    median = norms.median()
    unclipped = norms <= CLIP_MULTIPLE * median
    noise = (received - clean)[unclipped]  # (positions, hidden)
    return noise, float(noise.norm(dim=-1).mean() / median)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def bottom_lora_b(user, job: Job) -> torch.Tensor:
    response = api_for(user).get(f"/api/jobs/{job.pk}/adapter/")
    assert response.status_code == 200
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    weights = load_safetensors(bundle.read("adapter_model.safetensors"))
    return torch.cat([value.flatten() for key, value in sorted(weights.items())
                      if ".layers.0." in key and "lora_B" in key])


def test_two_users_jobs_with_the_same_seed_share_no_noise_trunk_seed_or_private_bottom(
        owner, other, proxied_trunk, web_trunk, celery_worker):
    first, first_opened, first_sent, first_mask = run_job(owner, proxied_trunk, celery_worker)
    second, second_opened, second_sent, second_mask = run_job(other, proxied_trunk, celery_worker)
    wire = proxied_trunk.records()

    # Each job drew its own key at creation; the trunk got seeds derived from it, never the key or the seed.
    first_key, second_key = first.client_secret(), second.client_secret()
    assert first_key.fingerprint() != second_key.fingerprint() != site_client_secret().fingerprint()
    assert first_opened.lora.seed == first_opened.dropout_seed == first_key.trunk_seed(SEED)
    assert second_opened.lora.seed == second_key.trunk_seed(SEED)
    assert first_opened.lora.seed != second_opened.lora.seed and SEED not in (first_opened.lora.seed,
                                                                              second_opened.lora.seed)

    # The same seed, so the same batch; the noise on it is really on the wire, at the configured size,
    # and the two jobs' noise is independent: comparing them subtracts nothing out.
    assert torch.equal(first_mask, second_mask)
    first_clean, mask = clean_bottom_output(first, web_trunk)
    second_clean, _ = clean_bottom_output(second, web_trunk)
    assert torch.equal(mask, first_mask), "the clean output is computed for the batch the job sent"
    first_noise, first_size = noise_part(first_sent, first_clean)
    second_noise, second_size = noise_part(second_sent, second_clean)
    assert 0.7 < first_size < 1.3 and 0.7 < second_size < 1.3, (first_size, second_size)
    assert first_noise.shape == second_noise.shape and first_noise.numel() > 1000
    assert abs(correlation(first_noise, second_noise)) < INDEPENDENT
    assert abs(correlation(first_noise, first_clean[first_clean.norm(dim=-1) <= CLIP_MULTIPLE *
                                                    first_clean.norm(dim=-1).median()])) < INDEPENDENT

    # Private Bottoms drawn from the two keys: their Bottoms compute different functions.
    assert not torch.allclose(first_clean, second_clean, atol=1e-3)
    first_b, second_b = bottom_lora_b(owner, first), bottom_lora_b(other, second)
    assert first_b.abs().sum() > 0 and not torch.allclose(first_b, second_b, atol=1e-4)

    # The keys never crossed the wire.
    for key in (first.secret.key, second.secret.key):
        assert all(bytes(key) not in record.payload and bytes(key).hex().encode() not in record.payload
                   for record in wire)


def test_the_playground_blurs_a_prompt_and_the_base_answer_beside_it_with_the_jobs_noise(
        owner, proxied_trunk, web_trunk, celery_worker):
    job = wait_for_job(start_job(owner).pk, worker=celery_worker)
    assert job.status == "succeeded", job.error_message
    proxied_trunk.clear()
    generations = playground.start_comparison(owner, PROMPT, job, max_new_tokens=2, chat=False)
    generations = wait_for_generations([generation.pk for generation in generations], celery_worker, timeout=120)
    assert [generation.status for generation in generations] == ["succeeded", "succeeded"], \
        [generation.error_message for generation in generations]

    tokenizer = AutoTokenizer.from_pretrained(base_models.model_dir(TINY_MODEL_ID))
    input_ids = encode_prompt(tokenizer, PROMPT, chat=False)  # (1, prompt)
    clean = []
    for adapter in (None, job.adapter_dir):  # the base model's Bottom and the job's (with its private change)
        with TrunkClient(web_trunk.address, web_trunk.token) as client:
            generator = SplitGenerator(base_models.client_model(TINY_MODEL_ID), client, adapter)
            with torch.no_grad():
                clean.append(generator.bottom(input_ids, torch.ones_like(input_ids)))  # (1, prompt, hidden)
    prompts = [hidden for _, hidden in proxied_trunk.hidden_states() if hidden.shape[1] == input_ids.shape[1]]
    assert len(prompts) == 2, "each answer sends the prompt once, then one position per token"
    for sent in prompts:
        sizes = [noise_part(sent, candidate)[1] for candidate in clean]
        assert not any(torch.allclose(sent, candidate, atol=1e-3) for candidate in clean)
        assert 0.5 < min(sizes) < 1.5, sizes  # about the job's noise (1.0) around one of the two Bottoms


@pytest.mark.django_db  # no worker takes these jobs: they are never sent (nothing commits)
def test_a_job_key_is_drawn_at_creation_and_shown_nowhere(client, owner, django_user_model, web_dirs):
    first, second = (services.create_job(Job(owner=owner, base_model=TINY_MODEL_ID, dataset_name="diary"))
                     for _ in range(2))
    keys = [bytes(job.secret.key) for job in (first, second)]
    assert len(keys[0]) == 32 and keys[0] != keys[1], "every job draws a new key, also with the same settings"
    assert first.client_secret().fingerprint() != second.client_secret().fingerprint()
    assert keys[0].hex() not in str(first.secret) and keys[0].hex() not in repr(first.client_secret())
    # A job from before jobs had keys keeps the site's key, so its checkpoints still resume.
    older = Job.objects.create(owner=owner, base_model=TINY_MODEL_ID, dataset_name="diary")
    assert older.client_secret().fingerprint() == site_client_secret().fingerprint()

    Job.objects.filter(pk=first.pk).update(status=Job.Status.SUCCEEDED)
    first.refresh_from_db()
    first.adapter_dir.mkdir(parents=True, exist_ok=True)
    (first.adapter_dir / "adapter_config.json").write_text("{}")
    (first.adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    admin = django_user_model.objects.create_superuser("site-admin", password="admin-pass-123")
    client.force_login(owner)
    api = api_for(owner)
    outputs = [api.get("/api/jobs/").content, api.get(f"/api/jobs/{first.pk}/").content,
               client.get("/jobs/").content, client.get(f"/jobs/{first.pk}/").content,
               client.get(f"/playground/?job={first.pk}").content]
    download = client.get(f"/jobs/{first.pk}/adapter/")
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content)))
    assert {"README.md", "training_args.json"} <= set(bundle.namelist())
    outputs += [bundle.read(name) for name in bundle.namelist()]
    assert "secret" not in json.loads(bundle.read("training_args.json"))
    client.force_login(admin)
    outputs.append(client.get(f"/admin/training/job/{first.pk}/change/").content)
    assert client.get("/admin/training/jobsecret/").status_code == 404, "no admin page lists the keys"
    for key in keys:
        for text in outputs:
            for form in (key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)):
                assert form not in text
    assert JobSecret.objects.count() == 2


@pytest.mark.django_db
def test_the_playground_says_before_sending_whether_a_prompt_is_blurred(client, owner, web_dirs):
    noisy = Job.objects.create(owner=owner, name="noisy", base_model=TINY_MODEL_ID, dataset_name="diary",
                               status=Job.Status.SUCCEEDED, hidden_noise=1.5)
    plain = Job.objects.create(owner=owner, name="plain", base_model=TINY_MODEL_ID, dataset_name="diary",
                               status=Job.Status.SUCCEEDED)
    for job in (noisy, plain):
        job.adapter_dir.mkdir(parents=True, exist_ok=True)
        (job.adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    client.force_login(owner)

    def hint(path: str) -> str:
        page = client.get(path).content.decode()
        return page.split('id="noise-hint">', 1)[1].split("</div>", 1)[0]

    assert "Prompts to this adapter are blurred" in hint(f"/playground/?job={noisy.pk}")
    assert "noise of 1.5 × their median norm" in hint(f"/playground/?job={noisy.pk}")
    assert "base model&#x27;s answer beside it is blurred the same way" in hint(f"/playground/?job={noisy.pk}")
    assert "without hidden-state noise" in hint(f"/playground/?job={plain.pk}")
    assert "unblurred" in hint(f"/playground/?job={plain.pk}") and "unblurred" in hint("/playground/")
    # The page's script shows the note of whichever job is chosen: every choice's note is on the page.
    page = client.get("/playground/").content.decode()
    notes = json.loads(page.split('<script id="noise-notes" type="application/json">', 1)[1].split("</script>")[0])
    assert notes.keys() == {"", str(noisy.pk), str(plain.pk)}
    assert "1.5" in notes[str(noisy.pk)] and "unblurred" in notes[str(plain.pk)] and "unblurred" in notes[""]
    assert "js/playground_noise.js" in page
