"""Running one generation in a worker: claim it, generate through a trunk, stream and store the text.

A generation is claimed with a conditional UPDATE (queued -> running), so a redelivered
task message never runs it twice. Bottom and Top run here (with the job's adapter for the
adapter side), the trunk runs on a trunk server in an inference session (or on a chain of
trunk servers, one session per link, when no single one serves the cut); all keep a KV
cache. A prompt to the adapter of a job that trained with hidden-state noise is blurred with
that noise (a fresh draw per request), and so is the base model's answer beside it. The text so
far is stored before each live event, so a page that connects late gets it in its snapshot (see
events.py). Every failure ends the generation as ``failed`` with a message that says what
happened and what to do.

Storing the text of a token is conditional on the row still running with no stop requested;
when it is not (its owner pressed Stop, or the sweep ended it, or it was deleted), the worker
stops between two tokens: a stopped generation keeps the text it had and ends as ``stopped``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone

from splitcore.generation.local import encode_prompt
from splitcore.generation.split import SplitGenerator
from splitcore.privacy import ChannelNoise, ClientSecret
from splitcore.remote.client import RetryPolicy
from splitcore.remote.errors import Fault, TrunkError
from splitcore.remote.trunk import SessionNeeds

from .. import base_models
from ..training.models import Job
from ..trunks.selection import NoTrunkAvailable, Placement, place
from . import events
from .decoding import IncrementalDecoder, text_change
from .models import Generation

log = logging.getLogger(__name__)

# Someone is waiting at the page: give up on an unreachable trunk after seconds, not minutes.
TRUNK_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.5, max_backoff_s=2.0)


class GenerationFailed(Exception):
    """Ends a generation as failed with this message for the user."""


class GenerationStopped(Exception):
    """The row takes no more text: its owner asked to stop it, or it ended or went away meanwhile."""


@dataclass
class SentText:
    """What the token events of a generation have carried so far: the text and the tokens it covers."""

    text: str = ""
    token_count: int = 0


def claim(generation_id: int) -> bool:
    return bool(Generation.objects.filter(pk=generation_id, status=Generation.Status.QUEUED).update(
        status=Generation.Status.RUNNING, started_at=timezone.now()))


def run_generation(generation_id: int) -> str | None:
    """Run a queued generation to its end; returns the final status (None when it was not claimable)."""
    if not claim(generation_id):
        log.info("generation %s is not queued (taken by another worker or gone); skipping", generation_id)
        return None
    generation = Generation.objects.select_related("job").filter(pk=generation_id).first()
    if generation is None:  # deleted right after the claim
        return None
    events.publish(generation.pk, events.status_event(generation))
    decoder = None
    sent = SentText()
    try:
        tokenizer = base_models.tokenizer(generation.base_model)
        decoder = IncrementalDecoder(tokenizer)
        _generate(generation, tokenizer, decoder, sent)
    except GenerationStopped:
        return _finish(generation, decoder, sent, Generation.Status.STOPPED)
    except GenerationFailed as failure:
        return _finish(generation, decoder, sent, Generation.Status.FAILED, str(failure))
    except base_models.BaseModelUnavailable as exc:
        return _finish(generation, decoder, sent, Generation.Status.FAILED, str(exc))
    except Exception as exc:  # noqa: BLE001 - any crash must end the generation with a message
        log.exception("generation %s crashed", generation_id)
        return _finish(generation, decoder, sent, Generation.Status.FAILED,
                       f"unexpected error in the worker: {type(exc).__name__}: {exc}")
    return _finish(generation, decoder, sent, Generation.Status.SUCCEEDED)


def _generate(generation: Generation, tokenizer, decoder: IncrementalDecoder, sent: SentText) -> None:
    try:
        input_ids = encode_prompt(tokenizer, generation.prompt, generation.chat)  # (1, seq)
    except ValueError as exc:  # a chat prompt for a tokenizer without a chat template
        raise GenerationFailed(f"the tokenizer of {generation.base_model} has no chat template; "
                               "try again with the prompt as plain text") from exc
    adapter_dir = _adapter_dir(generation)
    # With a job's adapter, the prompt crosses the cut that job chose, blurred with the job's hidden-state noise.
    # The base model's answer beside a blurred one crosses at that job's cut with the same noise (a draw of its own).
    job, noisy_job = generation.job, privacy_job(generation)
    cut_of = job or noisy_job
    cut = (cut_of.bottom_layers, cut_of.top_layers) if cut_of is not None else (None, None)
    try:
        needs = SessionNeeds(lora_rank=job.trunk_lora_rank) if job is not None else None
        # One trunk when one serves the cut, else a chain of trunks that together serve it.
        chosen = place(generation.base_model, cut, needs=needs)
    except NoTrunkAvailable as exc:
        raise GenerationFailed(str(exc)) from exc
    if chosen.is_chain and None in cut:  # every link must agree on the cut: take the one the chain was planned at
        first, last = chosen.links[0], chosen.links[-1]
        cut = (first.layers.start, last.trunk.num_layers - last.layers.stop)
    clients = []
    try:
        deadline = time.monotonic() + settings.GENERATION_TIMEOUT_S
        for link in chosen.links:
            clients.append(link.trunk.client("fp32", timeout_s=settings.TRUNK_RPC_TIMEOUT_S, retry=TRUNK_RETRY))
        generator = SplitGenerator(base_models.client_model(generation.base_model), clients, adapter_dir, *cut,
                                   device=base_models.worker_device())
        noise = prompt_noise(noisy_job) if noisy_job is not None else None
        for token_id in generator.generate(input_ids, tokenizer, generation.generation_settings(), noise):
            _stream(generation, decoder, sent, token_id)
            if time.monotonic() > deadline:
                raise GenerationFailed(f"stopped after {settings.GENERATION_TIMEOUT_S:.0f} s, the time limit "
                                       "of a generation; the text so far is kept — ask for fewer new tokens")
    except TrunkError as error:
        raise GenerationFailed(_trunk_failure(chosen, error)) from error
    except (ValueError, OSError) as exc:  # the trunk serves another model or split; an unreadable adapter
        raise GenerationFailed(str(exc)) from exc
    finally:
        for client in clients:
            client.close()


def privacy_job(generation: Generation) -> Job | None:
    """The job whose hidden-state noise blurs this generation's prompt: its own job's, or for the base model's
    answer of a comparison, the compared job's (the same prompt must not reach the trunk unblurred beside
    the blurred one); None when that job trained without hidden-state noise, or there is no job."""
    job = generation.job
    if job is None:
        paired = generation.paired.select_related("job").filter(job__isnull=False).first()
        job = paired.job if paired is not None else None
    return job if job is not None and job.hidden_noise > 0 else None


def prompt_noise(job: Job) -> ChannelNoise:
    """The noise of one prompt to ``job``'s adapter: its hidden-state scale, drawn from the job's key mixed
    with a fresh random nonce, so no two requests share a draw (nor any with the job's training)."""
    secret = job.client_secret().with_nonce(ClientSecret.fresh_nonce())
    return ChannelNoise(secret, seed=job.seed, hidden_scale=job.hidden_noise)


def _adapter_dir(generation: Generation):
    job = generation.job
    if job is None:
        return None
    if not job.has_adapter:
        raise GenerationFailed(f"the adapter of job {job.pk} is not on this server (looked in {job.adapter_dir}); "
                               "the worker needs the jobs directory the training worker wrote to")
    return job.adapter_dir


def _stream(generation: Generation, decoder: IncrementalDecoder, sent: SentText, token_id: int) -> None:
    """Store the text so far, then send what is new (in this order: see events.py).

    Raises ``GenerationStopped`` when the row takes no more text (checked at every token).
    """
    decoder.push(token_id)
    taking_text = Generation.objects.filter(pk=generation.pk, status=Generation.Status.RUNNING,
                                            stop_requested=False)
    if decoder.text == sent.text:  # nothing to show yet (an incomplete character, a special token)
        if not taking_text.exists():
            raise GenerationStopped
        return
    if not taking_text.update(output=decoder.text, token_count=len(decoder.token_ids)):
        raise GenerationStopped
    _send_text(generation, sent, decoder.text, len(decoder.token_ids))


def _send_text(generation: Generation, sent: SentText, text: str, token_count: int) -> None:
    change = text_change(sent.text, text)
    if change is None:
        return
    offset, delta = change
    events.publish(generation.pk, events.token_event(delta, offset, token_count, sent.token_count))
    sent.text, sent.token_count = text, token_count


def stopped_message(token_count: int) -> str:
    return f"stopped by you after {token_count} token{'' if token_count == 1 else 's'}; the text so far is kept"


def _finish(generation: Generation, decoder: IncrementalDecoder | None, sent: SentText, status: str,
            message: str = "") -> str:
    token_count = len(decoder.token_ids) if decoder is not None else 0
    if status == Generation.Status.STOPPED:
        message = stopped_message(token_count)
    fields = dict(status=status, error_message=message, finished_at=timezone.now())
    if decoder is not None:
        fields.update(output=decoder.final_text(), token_count=token_count)
    running = Generation.objects.filter(pk=generation.pk, status=Generation.Status.RUNNING)
    if status == Generation.Status.STOPPED:
        running = running.filter(stop_requested=True)  # else it was swept or deleted, not stopped
    if not running.update(**fields):
        log.info("generation %s was deleted or ended by the sweep while it ran", generation.pk)
        return status
    generation.refresh_from_db()
    if message:
        log.info("generation %s %s: %s", generation.pk, status, message)
    # The last text the token events carry is the stored output: the page needs no other source.
    _send_text(generation, sent, generation.output, generation.token_count)
    events.publish(generation.pk, events.done_event(generation))
    return status


def _trunk_failure(chosen: Placement, error: TrunkError) -> str:
    index, trunk = next(((index, trunk) for index, trunk in enumerate(chosen.trunks) if trunk.name == error.trunk),
                        (0, chosen.trunks[0]))
    where = f"the trunk server {trunk.name} at {trunk.address}"
    if chosen.is_chain:
        where += f" (link {index + 1} of the chain of {len(chosen.links)})"
    advice = ("check that it is running, then try again" if error.fault in (Fault.LOST, Fault.RETRYABLE)
              else "try again in a moment" if error.fault in (Fault.FULL, Fault.SESSION_GONE) else "")
    message = error.explain(where, session="the generation's session")
    return f"{message}; {advice}" if advice else message
