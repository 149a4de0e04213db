"""A chain of trunks in the web app: placement, the job's links, the pages, and a job end to end.

Placement runs on trunk records as their checks would fill them in. The end-to-end tests start
real trunk processes that each serve some blocks of the tiny llama (``--layers``), register and
check them, and send a job through the API to the session's real Celery worker, then ask its adapter
in the playground; one of them kills a link mid-job and checks the job finishes on a replacement as
if nothing happened.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import signal

import pytest
import torch
from django.urls import reverse
from peft import PeftModel
from playground_helpers import PROMPT, local_answer, wait_for_generations
from rest_framework.test import APIClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from web_fixtures import TINY_MODEL_ID, wait_for_job

from splitcore.privacy.client_secret import KEY_BYTES
from splitcore.remote.process import start_trunk
from splitcore.remote.trunk import SessionNeeds
from webapp.playground.models import Generation
from webapp.training import events, placement
from webapp.training.adapter_package import model_card, training_args
from webapp.training.forms import placement_note
from webapp.training.models import Job, JobLink, JobLog, JobSecret, MetricPoint
from webapp.trunks import actions, fleet
from webapp.trunks.health import check_trunk
from webapp.trunks.models import TrunkServer
from webapp.trunks.selection import NoTrunkAvailable, Placement, pick_trunk, place

MODEL = "llama"
UP, DOWN = TrunkServer.Status.UP, TrunkServer.Status.DOWN


def serving(name: str, first: int, last: int, *, default: tuple[int, int] | None = None, model_id: str = MODEL,
            num_layers: int = 6, active: int = 0, latency: float = 10.0, **fields) -> TrunkServer:
    """A trunk record whose last check found it up, letting sessions run blocks ``first``-``last`` (its default
    range: ``default``, else all of them)."""
    start, end = default or (first, last)
    return TrunkServer.objects.create(
        name=name, address=f"{name}.example:50051", token="t" * 24, status=fields.pop("status", UP),
        model_id=model_id, model_type="llama", num_layers=num_layers, trunk_start=start, trunk_end=end + 1,
        min_trunk_start=first, max_trunk_end=last + 1, max_sessions=4, active_sessions=active, latency_ms=latency,
        **fields)


def chain_of(placed: Placement) -> list[tuple[str, int, int]]:
    return [(link.trunk.name, link.layers.start, link.layers.stop - 1) for link in placed.links]


# ------------------------------------------------------------------ placement


@pytest.mark.django_db
def test_a_single_trunk_that_serves_the_cut_is_preferred_to_a_chain():
    serving("a", 1, 2, active=0)
    serving("b", 3, 4, active=0)
    serving("whole", 1, 4, active=3, latency=90.0)  # busier and slower, still one trunk
    placed = place(MODEL, (1, 1))
    assert not placed.is_chain and chain_of(placed) == [("whole", 1, 4)]
    assert pick_trunk(MODEL, (1, 1)).name == "whole"


@pytest.mark.django_db
def test_the_chain_with_the_fewest_links_is_chosen():
    serving("one", 1, 1)
    serving("two", 2, 2)
    serving("three-four", 3, 4)
    serving("one-two", 1, 2, active=3)  # busier, but one link less
    placed = place(MODEL, (1, 1))
    assert chain_of(placed) == [("one-two", 1, 2), ("three-four", 3, 4)]
    assert placed.describe() == "link 1 one-two blocks 1-2, link 2 three-four blocks 3-4"
    with pytest.raises(NoTrunkAvailable, match="no healthy trunk for 'llama' allows keeping 1 blocks before"):
        pick_trunk(MODEL, (1, 1))  # one trunk alone: unchanged


@pytest.mark.django_db
def test_among_equal_chains_the_least_loaded_goes_first():
    serving("a-busy", 1, 2, active=3, latency=1.0)
    serving("a-free", 1, 2, active=0, latency=50.0)
    serving("b-slow", 3, 4, latency=40.0)
    serving("b-fast", 3, 4, latency=5.0)
    assert chain_of(place(MODEL, (1, 1))) == [("a-free", 1, 2), ("b-fast", 3, 4)]
    serving("b-fast-too", 3, 4, latency=5.0)
    assert chain_of(place(MODEL, (1, 1)))[1][0] == "b-fast", "a full tie goes to the name"


@pytest.mark.django_db
def test_a_gap_says_which_blocks_no_healthy_trunk_serves():
    serving("a", 1, 2)
    serving("c", 4, 4)
    serving("other-model", 3, 3, model_id="gpt2")
    with pytest.raises(NoTrunkAvailable) as refused:
        place(MODEL, (1, 1))
    message = str(refused.value)
    assert message.startswith("no healthy trunk for 'llama' allows keeping 1 blocks before the trunk")
    assert "nor does a chain of them: no healthy trunk serves block 3 of 6 (they serve: a blocks 1-2, c block 4)" \
        in message
    assert placement_note(MODEL, (1, 1)) == "", "the form says nothing until it is sent (then it shows the error)"


@pytest.mark.django_db
def test_ranges_that_overlap_form_no_chain_and_the_message_says_so():
    serving("a", 1, 3)
    serving("b", 2, 4)
    with pytest.raises(NoTrunkAvailable, match="do not meet end to end"):
        place(MODEL, (1, 1))
    with pytest.raises(NoTrunkAvailable) as refused:
        place(MODEL, (3, 3))  # no block left for a trunk: the cut's own problem, no word of chains
    assert "nor does a chain" not in str(refused.value) and "leaves no layer" in str(refused.value)


@pytest.mark.django_db
def test_draining_down_disabled_and_excluded_trunks_are_never_links():
    serving("a", 1, 2)
    drained = serving("b-draining", 3, 4, active=0, draining=True)
    serving("b-down", 3, 4, status=DOWN)
    serving("b-disabled", 3, 4, enabled=False)
    with pytest.raises(NoTrunkAvailable, match="no healthy trunk serves blocks 3-4 of 6"):
        place(MODEL, (1, 1))
    b = serving("b", 3, 4, active=3)
    assert chain_of(place(MODEL, (1, 1))) == [("a", 1, 2), ("b", 3, 4)]
    b2 = serving("b2", 3, 4, active=3)
    assert chain_of(place(MODEL, (1, 1), exclude=(b.pk,)))[1][0] == "b2"
    with pytest.raises(NoTrunkAvailable):
        place(MODEL, (1, 1), exclude=(b.pk, b2.pk, drained.pk))


@pytest.mark.django_db
def test_every_link_must_take_the_jobs_settings():
    serving("a", 1, 2, max_lora_rank=64)
    serving("b-small", 3, 4, max_lora_rank=4)
    needs = SessionNeeds(lora_rank=8)
    with pytest.raises(NoTrunkAvailable) as refused:
        place(MODEL, (1, 1), needs=needs)
    assert "takes these settings on no link (b-small would refuse a trunk LoRA of rank 8; it allows rank 4)" in \
        str(refused.value)
    serving("b-large", 3, 4, max_lora_rank=16, active=3)
    assert chain_of(place(MODEL, (1, 1), needs=needs)) == [("a", 1, 2), ("b-large", 3, 4)]


@pytest.mark.django_db
def test_a_side_of_the_cut_left_to_the_trunks_default_needs_no_chain():
    serving("a", 1, 2)
    serving("b", 3, 4)
    # A trunk serves its own default on that side: one trunk takes the job, the data owner keeps the rest.
    assert chain_of(place(MODEL, (1, None))) == [("a", 1, 2)]
    assert chain_of(place(MODEL, (None, 1))) == [("b", 3, 4)]
    assert chain_of(place(MODEL, (1, 1))) == [("a", 1, 2), ("b", 3, 4)]


@pytest.mark.django_db
def test_the_job_form_explains_when_the_job_will_run_on_a_chain():
    serving("a", 1, 2)
    serving("b", 3, 4)
    assert placement_note(MODEL, (1, 1)) == (
        "No single trunk serves blocks 1-4 of llama; the job will run on a chain of 2 trunks: link 1 a blocks 1-2, "
        "link 2 b blocks 3-4. Each link trains its own LoRA on its blocks; the first link receives the hidden "
        "states the blocks before the trunk send.")
    serving("whole", 1, 4)
    assert placement_note(MODEL, (1, 1)) == ""


@pytest.mark.django_db
def test_the_new_job_page_says_when_the_cut_in_the_form_needs_a_chain(owner, client, web_dirs):
    serving("a", 1, 2, model_id=TINY_MODEL_ID)
    serving("b", 3, 4, model_id=TINY_MODEL_ID)
    client.force_login(owner)
    page = client.post(reverse("training:job-new"), {"base_model": TINY_MODEL_ID, "bottom_layers": 1,
                                                     "top_layers": 1}).content.decode()
    note = placement_note(TINY_MODEL_ID, (1, 1))
    assert note.startswith(f"No single trunk serves blocks 1-4 of {TINY_MODEL_ID}; the job will run on a chain of 2")
    assert f'<p id="chain-note" class="chain-note" aria-live="polite">{note}</p>' in page
    data = re.search(r'<script id="job-chain-notes" type="application/json">(.*?)</script>', page).group(1)
    assert json.loads(data) == {"cut": [1, 1], "notes": {TINY_MODEL_ID: note}}
    page = client.get(reverse("training:job-new")).content.decode()
    assert '<p id="chain-note" class="chain-note" aria-live="polite" hidden></p>' in page, \
        "at the trunks' default cut one trunk serves the job"


# ------------------------------------------------------------------ a job's links: kept, replaced, moved, shown


def chain_job(owner, links: list[tuple[TrunkServer, int, int]], **fields) -> Job:
    job = Job.objects.create(owner=owner, dataset_name="sums", base_model=MODEL, trunk=links[0][0],
                             status=fields.pop("status", Job.Status.RUNNING), bottom_layers=1, top_layers=1,
                             name="chained", **fields)
    for position, (trunk, first, last) in enumerate(links):
        JobLink.objects.create(job=job, position=position, trunk=trunk, trunk_name=trunk.name, first_block=first,
                               last_block=last)
    return job


@pytest.mark.django_db
def test_a_job_continues_on_its_links_and_replaces_only_the_one_it_lost(owner):
    a, b = serving("a", 1, 2), serving("b", 3, 4)
    job = chain_job(owner, [(a, 1, 2), (b, 3, 4)])
    serving("a-idle", 1, 2, latency=1.0)
    whole = serving("whole", 1, 4)  # one trunk could take the whole job, but only the lost link moves
    assert chain_of(placement.continue_on(job)) == [("a", 1, 2), ("b", 3, 4)], "its own links while healthy"
    assert placement.resolved_cut(job) == (1, 1)

    with pytest.raises(NoTrunkAvailable):  # a-idle serves the first link's blocks, not the second's
        placement.replace(job, placement.recorded(job), {b.pk}, exclude={b.pk, whole.pk})
    serving("b-spare", 3, 4, active=2)
    assert chain_of(placement.continue_on(job, avoid={b.pk})) == [("a", 1, 2), ("b-spare", 3, 4)]
    TrunkServer.objects.filter(pk=b.pk).update(status=DOWN)  # the next check found it down
    assert chain_of(placement.continue_on(job)) == [("a", 1, 2), ("b-spare", 3, 4)]


@pytest.mark.django_db
def test_a_job_whose_lost_link_has_no_replacement_waits_for_it(owner):
    a, b = serving("a", 1, 2), serving("b", 3, 4, status=DOWN)
    job = chain_job(owner, [(a, 1, 2), (b, 3, 4)])
    assert chain_of(placement.continue_on(job, avoid={b.pk})) == [("a", 1, 2), ("b", 3, 4)]


@pytest.mark.django_db
def test_move_jobs_off_one_link_replaces_that_link_or_places_the_whole_job_again(owner):
    a, b = serving("a", 1, 2), serving("b", 3, 4)
    job = chain_job(owner, [(a, 1, 2), (b, 3, 4)])
    outcome = actions.move_jobs(b)
    assert not outcome.ok and "job" in outcome.message and "stays" in outcome.message
    spare = serving("b-spare", 3, 4)
    outcome = actions.move_jobs(b)
    assert outcome.ok, outcome.message
    assert f"job {job.pk} (chained) to b-spare in place of link 2 of its chain" in outcome.message
    assert Job.objects.get(pk=job.pk).move_from_id == b.pk

    Job.objects.filter(pk=job.pk).update(move_from=None)
    TrunkServer.objects.filter(pk=spare.pk).update(enabled=False)
    serving("whole", 1, 4)
    outcome = actions.move_jobs(a)
    assert outcome.ok and f"job {job.pk} (chained) to whole" in outcome.message, outcome.message
    assert actions.drain(b).message.startswith("Trunk b is draining: no new sessions open there; its 1 running")


@pytest.mark.django_db
def test_the_fleet_shows_each_chain_and_each_trunk_serves_its_job_as_a_link(owner, client, django_user_model):
    a, b = serving("a", 1, 2), serving("b", 3, 4, draining=True)
    job = chain_job(owner, [(a, 1, 2), (b, 3, 4)])
    snapshot = fleet.snapshot()
    assert snapshot["chains"] == [{**fleet.job_entry(job), "links": [
        {"number": 1, "trunk": "a", "trunk_id": a.pk, "blocks": "blocks 1-2", "state": "up"},
        {"number": 2, "trunk": "b", "trunk_id": b.pk, "blocks": "blocks 3-4", "state": "draining"}]}]
    rows = {row["name"]: row for row in snapshot["rows"]}
    assert [entry["link"] for entry in rows["a"]["jobs"]] == ["link 1 of 2, blocks 1-2"]
    assert [entry["link"] for entry in rows["b"]["jobs"]] == ["link 2 of 2, blocks 3-4"]
    assert "move-jobs" in rows["b"]["actions"] and not rows["b"]["empty"]

    staff = django_user_model.objects.create_user("staff", password="staff-pass-1234", is_staff=True,
                                                  is_superuser=True)
    client.force_login(staff)
    page = client.get(reverse("trunks:fleet")).content.decode()
    chains = re.search(r'<section class="card chains" id="fleet-chains">.*?</section>', page, re.S).group(0)
    assert f"job {job.pk}: chained" in chains and "link 2: <strong>b</strong>" in chains
    assert "as link 2 of 2, blocks 3-4" in page


@pytest.mark.django_db
def test_the_job_page_and_its_status_events_show_every_link_and_its_state(owner, client):
    a, b = serving("a", 1, 2), serving("b", 3, 4, status=DOWN)
    job = chain_job(owner, [(a, 1, 2), (b, 3, 4)])
    event = events.status_event(job)
    assert event["links"] == [{"number": 1, "trunk": "a", "blocks": "blocks 1-2", "state": "up"},
                              {"number": 2, "trunk": "b", "blocks": "blocks 3-4", "state": "down"}]
    assert event["trunk"] == "a chain of 2 trunk servers: link 1 a blocks 1-2 (up), link 2 b blocks 3-4 (down)"
    client.force_login(owner)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    facts = re.search(r'<dd id="fact-trunk">.*?</dd>', page, re.S).group(0)
    assert "a chain of 2 trunk servers" in facts
    assert re.search(r'link 1: <strong>a</strong> <span class="muted">blocks 1-2</span> <span class="status '
                     r'status-up">up</span>', facts)
    assert re.search(r'link 2: <strong>b</strong> <span class="muted">blocks 3-4</span> <span class="status '
                     r'status-down">down</span>', facts)


# ------------------------------------------------------------------ end to end: real trunks, a real worker


ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(24)]
JOB = {"base_model": TINY_MODEL_ID, "max_steps": 10, "batch_size": 2, "grad_accum_steps": 2, "max_seq_length": 32,
       "learning_rate": 0.02, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "val_fraction": 0.2, "seed": 5,
       "bottom_layers": 1, "top_layers": 1, "train_trunk_lora": True}
# The jobs a fault hits mid-job: no validation, so a step is quick, and enough of them to be hit mid-job.
FAULT_STEPS = 10
FAULT_JOB = {"max_steps": FAULT_STEPS, "val_fraction": 0.0}


def link_process(web_dirs, tmp_path, layers: str):
    logs = tmp_path / layers
    logs.mkdir(exist_ok=True)
    return start_trunk(web_dirs["models"] / TINY_MODEL_ID, logs, layers=layers)


def register(name: str, process) -> TrunkServer:
    record = TrunkServer.objects.create(name=name, address=process.address, token=process.token)
    assert check_trunk(record).status == UP, record.last_error
    return record


@pytest.fixture
def chain(web_dirs, tmp_path):
    """Two trunk processes of the tiny llama (6 blocks): one serving blocks 1-2, one blocks 3-4."""
    first, second = link_process(web_dirs, tmp_path, "1-2"), link_process(web_dirs, tmp_path, "3-4")
    yield first, second
    first.stop()
    second.stop()


def upload(api: APIClient) -> int:
    data = io.BytesIO(("\n".join(json.dumps(row) for row in ROWS) + "\n").encode())
    data.name = "sums.jsonl"
    dataset = api.post("/api/datasets/", {"file": data, "name": "sums"}, format="multipart")
    assert dataset.status_code == 201, dataset.content
    return dataset.json()["id"]


def submit(owner, dataset_id: int | None = None, **changes) -> int:
    """A job through the API, on a new upload (or ``dataset_id``): the form places it."""
    api = APIClient()
    api.force_authenticate(owner)
    created = api.post("/api/jobs/", {**JOB, "dataset": dataset_id or upload(api), **changes}, format="json")
    assert created.status_code == 201, created.content
    return created.json()["id"]


def log_text(job: Job) -> str:
    return "\n".join(JobLog.objects.filter(job=job).values_list("message", flat=True))


def losses(job: Job) -> list[float]:
    return list(MetricPoint.objects.filter(job=job, kind="train").order_by("step").values_list("loss", flat=True))


def adapter_blocks(job: Job) -> set[int]:
    return {int(match.group(1)) for key in load_file(job.adapter_dir / "adapter_model.safetensors")
            if (match := re.search(r"\.layers\.(\d+)\.", key))}


@pytest.mark.django_db(transaction=True)
def test_a_job_runs_on_a_chain_of_two_trunks_end_to_end(owner, client, chain, celery_worker, tmp_path):
    a, b = register("chain-a", chain[0]), register("chain-b", chain[1])
    job = wait_for_job(submit(owner), worker=celery_worker)
    assert job.status == "succeeded", f"{job.error_message}\n{log_text(job)}"
    assert job.current_step == 10 and job.trunk == a
    assert [(link.trunk, link.first_block, link.last_block) for link in job.chain()] == [(a, 1, 2), (b, 3, 4)]
    text = log_text(job)
    assert "connected to a chain of 2 trunk servers: link 1 chain-a blocks 1-2, link 2 chain-b blocks 3-4" in text
    assert ("cut: 1 blocks here, a chain of 2 trunk servers runs layers 1-4 (link 1 chain-a blocks 1-2, link 2 "
            "chain-b blocks 3-4; the first link receives the Bottom's output), 1 blocks here after it") in text
    # One adapter over the whole model: LoRA of the client's blocks (0, 5) and of both links' blocks.
    assert adapter_blocks(job) == {0, 1, 2, 3, 4, 5}
    model_dir = web_dir_model()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = AutoTokenizer.from_pretrained(model_dir)("Q: what is 3 plus 3?\nA:", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, job.adapter_dir).eval()(ids).logits
    assert (adapted - before).abs().max().item() > 1e-3

    card = model_card(job)
    assert "a chain of 2 trunk servers (chain-a blocks 1-2, chain-b blocks 3-4) ran the middle blocks" in card
    assert "The attacks on hidden states play the first link, chain-a (blocks 1-2)" in card
    assert training_args(job)["trunk_links"] == [{"trunk": "chain-a", "first_block": 1, "last_block": 2},
                                                 {"trunk": "chain-b", "first_block": 3, "last_block": 4}]
    api = APIClient()
    api.force_authenticate(owner)
    assert api.get(f"/api/jobs/{job.pk}/").json()["links"] == [
        {"number": 1, "trunk": "chain-a", "blocks": "blocks 1-2", "state": "up"},
        {"number": 2, "trunk": "chain-b", "blocks": "blocks 3-4", "state": "up"}]
    client.force_login(owner)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "a chain of 2 trunk servers" in page
    assert "link 1: <strong>chain-a</strong>" in page and "link 2: <strong>chain-b</strong>" in page
    assert "blocks 1-2" in page and "blocks 3-4" in page
    assert '<p class="muted" data-role="chain-audit">This job runs on a chain of 2 trunk servers.' in page
    # Both trunks closed the job's sessions.
    assert check_trunk(a).active_sessions == 0 and check_trunk(b).active_sessions == 0

    # The playground asks the job's adapter at the job's cut, which only the chain serves (the bare base model
    # goes to one trunk at its default cut): both answer as the unsplit model does.
    response = client.post("/playground/", {"job": job.pk, "base_model": TINY_MODEL_ID, "prompt": PROMPT,
                                            "max_new_tokens": 8, "temperature": 0, "seed": 0})
    assert response.status_code == 302, response.content.decode()[-3000:]
    base, adapted = wait_for_generations(list(Generation.objects.order_by("id").values_list("pk", flat=True)),
                                         celery_worker)
    assert base.status == adapted.status == "succeeded", (base.error_message, adapted.error_message)
    assert (adapted.output, adapted.token_count) == local_answer(PROMPT, False, 8, job.adapter_dir)
    assert (base.output, base.token_count) == local_answer(PROMPT, False, 8)
    assert check_trunk(a).active_sessions == 0 and check_trunk(b).active_sessions == 0


def web_dir_model():
    from django.conf import settings

    return settings.MODELS_DIR / TINY_MODEL_ID


def one_key_for_every_job(monkeypatch) -> None:
    """Jobs created from here on share one key (each job draws its own otherwise), so a faulty run can be
    compared with an uninterrupted one: the key decides the trunk seed, dropout and noise."""
    key = secrets.token_bytes(KEY_BYTES)
    monkeypatch.setattr(JobSecret, "draw", classmethod(lambda cls, job: cls.objects.create(job=job, key=key)))


@pytest.mark.django_db(transaction=True)
def test_a_lost_link_is_replaced_and_the_job_goes_on_as_an_uninterrupted_run(owner, chain, celery_worker, web_dirs,
                                                                            tmp_path, monkeypatch):
    one_key_for_every_job(monkeypatch)
    first, second = chain
    spare_process = link_process(web_dirs, tmp_path, "3-4")
    try:
        a, b = register("chain-a", first), register("chain-b", second)
        reference = wait_for_job(submit(owner, **FAULT_JOB), worker=celery_worker)
        assert reference.status == "succeeded", f"{reference.error_message}\n{log_text(reference)}"

        job_id = submit(owner, reference.dataset_id, **FAULT_JOB)
        # Mid-job, past its first checkpoint: the second link is held while its replacement is registered,
        # then killed, so the step in flight is lost with it.
        job = wait_for_job(job_id, condition=lambda j: j.current_step >= 3 or j.is_finished, worker=celery_worker)
        second.process.send_signal(signal.SIGSTOP)
        job.refresh_from_db()
        assert job.status == "running" and job.current_step < FAULT_STEPS, \
            f"the fault must hit mid-job: {job.status} at step {job.current_step}"
        spare = register("chain-b-spare", spare_process)
        second.process.send_signal(signal.SIGKILL)
        second.process.wait()

        job = wait_for_job(job_id, worker=celery_worker)
        assert job.status == "succeeded", f"{job.error_message}\n{log_text(job)}"
        text = log_text(job)
        assert f"the trunk server chain-b at {b.address} (link 2 of the chain, blocks 3-4) stopped answering at step" \
            in text
        assert ("waiting for it to answer again or for another trunk server to serve blocks 3-4, then continuing "
                "from the checkpoint of step") in text
        assert ("connected to a chain of 2 trunk servers: link 1 chain-a blocks 1-2, link 2 chain-b-spare blocks 3-4"
                in text.split("stopped answering")[1])
        assert [(link.trunk, link.first_block, link.last_block) for link in job.chain()] == [(a, 1, 2),
                                                                                           (spare, 3, 4)]
        assert job.attempts == 1, "the same worker carried on"
        steps = list(MetricPoint.objects.filter(job=job, kind="train").values_list("step", flat=True))
        assert steps == list(range(1, FAULT_STEPS + 1)), "every step once"
        assert losses(job) == pytest.approx(losses(reference), abs=1e-4), "the same run as without the fault"
        assert adapter_blocks(job) == {0, 1, 2, 3, 4, 5}
        for name, tensor in load_file(job.adapter_dir / "adapter_model.safetensors").items():
            expected = load_file(reference.adapter_dir / "adapter_model.safetensors")[name]
            torch.testing.assert_close(tensor, expected, atol=1e-4, rtol=0, msg=name)
    finally:
        spare_process.stop()


@pytest.mark.django_db(transaction=True)
def test_moving_a_job_off_one_link_replaces_only_that_link(owner, chain, celery_worker, web_dirs, tmp_path):
    first, second = chain
    spare_process = link_process(web_dirs, tmp_path, "1-2")
    try:
        a, b = register("chain-a", first), register("chain-b", second)
        job_id = submit(owner, **FAULT_JOB)
        job = wait_for_job(job_id, condition=lambda j: j.current_step >= 3 or j.is_finished, worker=celery_worker)
        # The first link is held while staff press "Move jobs" on it: the step in flight is the last one there.
        first.process.send_signal(signal.SIGSTOP)
        spare = register("chain-a-spare", spare_process)
        try:
            outcome = actions.move_jobs(a)
        finally:
            first.process.send_signal(signal.SIGCONT)
        assert outcome.ok, outcome.message
        assert "to chain-a-spare in place of link 1 of its chain" in outcome.message

        job = wait_for_job(job_id, worker=celery_worker)
        assert job.status == "succeeded", f"{job.error_message}\n{log_text(job)}"
        text = log_text(job)
        assert ("moving off the trunk server chain-a (link 1 of the chain, blocks 1-2) as an administrator asked; "
                "continuing from the checkpoint of step") in text
        assert ("connected to a chain of 2 trunk servers: link 1 chain-a-spare blocks 1-2, link 2 chain-b blocks 3-4"
                in text.split("moving off")[1])
        assert [(link.trunk, link.first_block, link.last_block) for link in job.chain()] == [(spare, 1, 2),
                                                                                           (b, 3, 4)]
        assert job.move_from is None and job.trunk == spare
        steps = list(MetricPoint.objects.filter(job=job, kind="train").values_list("step", flat=True))
        assert steps == list(range(1, FAULT_STEPS + 1)), "every step once"
        assert adapter_blocks(job) == {0, 1, 2, 3, 4, 5}
        assert check_trunk(a).active_sessions == 0, "the link it left closed the job's session"
    finally:
        spare_process.stop()
