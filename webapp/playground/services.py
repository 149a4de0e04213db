"""Starting and stopping generations: validate the request, store the rows, send them to the workers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from splitcore.data.examples import has_chat_template as tokenizer_has_chat_template

from .. import base_models
from ..training.models import Job
from . import events
from .models import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_SEED, MAX_TEMPERATURE, Generation

STOPPED_BEFORE_START = "stopped by you before it started"


class GenerationStateError(Exception):
    """The generation cannot do that in its state (e.g. stop when it has already ended)."""


def has_chat_template(model_id: str) -> bool:
    """Whether the tokenizer of an installed base model has a chat template (False when not installed)."""
    try:
        return tokenizer_has_chat_template(base_models.tokenizer(model_id))
    except (base_models.BaseModelUnavailable, OSError):
        return False


@dataclass(frozen=True)
class PromptFormat:
    """How to send a prompt by default (through the chat template or not), and why, in a user's words."""

    chat: bool
    reason: str


def base_model_format(model_id: str) -> PromptFormat:
    if has_chat_template(model_id):
        return PromptFormat(True, f"the tokenizer of {model_id} has a chat template")
    return PromptFormat(False, f"the tokenizer of {model_id} has no chat template")


def job_format(job: Job) -> PromptFormat:
    """Ask a job's adapter the way its examples trained; for an older job, as its base model suggests."""
    if job.chat_format is True:
        return PromptFormat(True, "this job trained with the chat template")
    if job.chat_format is False:
        return PromptFormat(False, "this job trained on plain text (no chat template)")
    base = base_model_format(job.base_model)
    return PromptFormat(base.chat, f"this job's format was not recorded; {base.reason}")


BASE_MODEL_NOISE_NOTE = ("Prompts to the base model alone reach the trunk unblurred, as hidden states from which "
                         "the trunk's owner can read back much of the text.")


def noise_note(job: Job | None) -> str:
    """What the page says, before a prompt is sent, of the blur on the hidden states the trunk receives."""
    if job is None:
        return BASE_MODEL_NOISE_NOTE
    if job.hidden_noise <= 0:
        return ("This job trained without hidden-state noise, so prompts to its adapter reach the trunk unblurred, "
                "as hidden states from which the trunk's owner can read back much of the text.")
    return (f"Prompts to this adapter are blurred as this job's training was: the hidden states sent to the trunk "
            f"are clipped and carry Gaussian noise of {job.hidden_noise:g} × their median norm, drawn afresh for "
            "each prompt; the base model's answer beside it is blurred the same way. Blurred is not hidden: the "
            "job's privacy audit measured how much of its training text the trunk could still read at this noise.")


def start_comparison(owner, prompt: str, job: Job | None = None, *, base_model: str | None = None,
                     max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
                     chat: bool | None = None) -> list[Generation]:
    """Queue the answers to ``prompt``: the bare base model's, and the adapter's when ``job`` is given.

    With a job the base model is the job's and two generations are created (base first,
    then adapter) with the same settings, for a side-by-side comparison. ``chat`` None
    means: apply the chat template when the tokenizer has one. Raises ``ValidationError``
    with a message per field (the names of the playground form's fields).
    """
    errors: dict[str, str] = {}
    if not isinstance(prompt, str) or not prompt.strip():
        errors["prompt"] = "Type a prompt."
    elif len(prompt) > MAX_PROMPT_CHARS:
        errors["prompt"] = f"The prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed."
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        errors["max_new_tokens"] = f"Max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}."
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        errors["temperature"] = f"Temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g}."
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        errors["seed"] = f"The seed must be a whole number from 0 to {MAX_SEED}."

    if job is not None:
        if job.owner_id != owner.pk:
            errors["job"] = "No such job."
        elif not job.has_adapter:
            errors["job"] = f"Job {job.pk} has no adapter (only succeeded jobs have one)."
        elif base_model and base_model != job.base_model:
            errors["base_model"] = f"Job {job.pk} was trained on {job.base_model}, not {base_model}."
        base_model = job.base_model
    else:
        base_model = base_model or base_models.default_model_id()
    if not base_model or base_model not in base_models.installed_models():
        errors.setdefault("job" if job is not None else "base_model",
                          f"The base model {base_model!r} is not installed on this server." if base_model
                          else "No base model is installed on this server.")
    elif chat is None:
        chat = has_chat_template(base_model)
    elif chat and not has_chat_template(base_model):
        errors["chat"] = f"The tokenizer of {base_model} has no chat template; send the prompt as plain text."
    if errors:
        raise ValidationError(errors)

    common = dict(owner=owner, base_model=base_model, prompt=prompt, chat=bool(chat),
                  max_new_tokens=max_new_tokens, temperature=float(temperature), seed=seed)
    with transaction.atomic():
        generations = [Generation.objects.create(job=None, **common)]
        if job is not None:
            generations.append(Generation.objects.create(job=job, paired_with=generations[0], **common))
        for generation in generations:
            enqueue(generation)
    return generations


def enqueue(generation: Generation) -> None:
    from .tasks import generate

    transaction.on_commit(lambda: generate.delay(generation.pk))


def stop_generation(generation: Generation) -> Generation:
    """A queued generation stops at once; a running one after its current token, keeping its text.

    Raises ``GenerationStateError`` when it has already ended.
    """
    if Generation.objects.filter(pk=generation.pk, status=Generation.Status.QUEUED).update(
            status=Generation.Status.STOPPED, stop_requested=True, error_message=STOPPED_BEFORE_START,
            finished_at=timezone.now()):
        generation.refresh_from_db()
        events.publish(generation.pk, events.done_event(generation))
        return generation
    if Generation.objects.filter(pk=generation.pk, status=Generation.Status.RUNNING).update(stop_requested=True):
        generation.refresh_from_db()
        events.publish(generation.pk, events.status_event(generation))
        return generation
    generation.refresh_from_db()
    raise GenerationStateError(f"This answer has already {generation.status}: only a queued or running one can "
                               "be stopped.")
