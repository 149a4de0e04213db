"""The playground form: which model (a job's adapter or the bare base model), the prompt, how to decode."""

from __future__ import annotations

from django import forms
from django.conf import settings

from ..ownership import owned
from ..training.models import Job
from ..trunks.selection import draining_notice, served_models
from .models import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_SEED, MAX_TEMPERATURE
from .services import BASE_MODEL_NOISE_NOTE, PromptFormat, base_model_format, job_format, noise_note


class FormatSelect(forms.Select):
    """A select whose options say how to send a prompt for them (``data-chat``, ``data-chat-hint``), so
    that the page's script sets the chat checkbox when the choice changes."""

    def __init__(self, *args, prompt_format=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_format = prompt_format  # option value (a Job for a job) -> PromptFormat

    def create_option(self, name, value, label, selected, index, subindex=None, attrs=None):
        option = super().create_option(name, value, label, selected, index, subindex, attrs)
        choice = getattr(value, "instance", value)  # a ModelChoiceIteratorValue holds the job
        if self.prompt_format is not None and choice not in (None, ""):
            prompt_format = self.prompt_format(choice)
            option["attrs"].update({"data-chat": "true" if prompt_format.chat else "false",
                                    "data-chat-hint": prompt_format.reason})
        return option


NO_TRUNK_UP = "No trunk server is up, so nothing can be generated now: an administrator must add or start one."


class JobChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, job: Job) -> str:
        return job.display_name


class PlaygroundForm(forms.Form):
    job = JobChoiceField(queryset=Job.objects.none(), required=False, empty_label="Base model only",
                         label="Adapter", help_text="A succeeded job of yours; its answer is shown next to the base "
                                                    "model's.",
                         widget=FormatSelect(prompt_format=job_format))
    base_model = forms.ChoiceField(required=False, widget=FormatSelect(prompt_format=base_model_format),
                                   help_text="The models a healthy trunk serves. With an adapter it is the model "
                                             "its job trained on.")
    prompt = forms.CharField(strip=False, widget=forms.Textarea(attrs={"rows": 6, "maxlength": MAX_PROMPT_CHARS}),
                             help_text=f"At most {MAX_PROMPT_CHARS} characters.")
    chat = forms.BooleanField(required=False, label="Apply the chat template",
                              help_text="Sends the prompt as a user message of a chat (for chat models).")
    max_new_tokens = forms.IntegerField(min_value=1, max_value=MAX_NEW_TOKENS, initial=64)
    temperature = forms.FloatField(min_value=0.0, max_value=MAX_TEMPERATURE, initial=0.0,
                                   help_text="0 is greedy: always the most likely token.")
    seed = forms.IntegerField(min_value=0, max_value=MAX_SEED, initial=0,
                              help_text="Of the sampling (with a temperature above 0).")

    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        self.fields["job"].queryset = owned(Job, user).filter(status=Job.Status.SUCCEEDED)
        self.served = served_models()
        self.fields["base_model"].choices = [(model_id, model_id) for model_id in self.served]
        if "base_model" not in self.initial and self.served:
            self.initial["base_model"] = (settings.DEFAULT_BASE_MODEL if settings.DEFAULT_BASE_MODEL in self.served
                                          else self.served[0])
        jobs = list(self.fields["job"].queryset)
        # The base model of each job choice: the page's script locks the base model field to it.
        self.job_models = {str(job.pk): job.base_model for job in jobs}
        self.prompt_format = self._initial_format()
        # Whether prompts are blurred, per choice of the job field ("" for the base model only); the page's
        # script shows the chosen one's.
        self.noise_notes = {"": BASE_MODEL_NOISE_NOTE,
                            **{str(job.pk): noise_note(job) for job in jobs}}
        chosen = self.data.get("job") if self.is_bound else self.initial.get("job")
        self.noise_note = self.noise_notes.get(str(chosen or ""), BASE_MODEL_NOISE_NOTE)
        if "chat" not in self.initial and self.prompt_format is not None:
            self.initial["chat"] = self.prompt_format.chat

    @property
    def trunk_notice(self) -> str:
        """Why nothing can be generated now: no trunk is up, or the only ones up are draining ("" when a trunk
        can take a playground session)."""
        if self.served:
            return ""
        return draining_notice(None, "playground sessions") or NO_TRUNK_UP

    def _initial_format(self) -> PromptFormat | None:
        """How the initially chosen job trained, or what the initial base model's tokenizer suggests."""
        job_id = self.initial.get("job")
        job = self.fields["job"].queryset.filter(pk=job_id).first() if job_id is not None else None
        if job is not None:
            return job_format(job)
        if self.initial.get("base_model"):
            return base_model_format(self.initial["base_model"])
        return None

    def clean_prompt(self) -> str:
        # Browsers send a textarea's line breaks as CRLF; the model should see what the user typed.
        prompt = self.cleaned_data["prompt"].replace("\r\n", "\n").replace("\r", "\n")
        if not prompt.strip():
            raise forms.ValidationError("Type a prompt.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise forms.ValidationError(f"The prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} "
                                        "are allowed.")
        return prompt

    def clean_base_model(self) -> str:
        # An adapter only fits the model its job trained on (the job field is cleaned before this one).
        base_model = self.cleaned_data["base_model"]
        job = self.cleaned_data.get("job")
        if job is not None and base_model and base_model != job.base_model:
            raise forms.ValidationError(
                f"The adapter of {job.display_name} (job {job.pk}) was trained on {job.base_model}, so it runs only "
                f"on that base model, not on {base_model}: choose {job.base_model}, or 'Base model only' under "
                f"Adapter to ask {base_model} alone.")
        return base_model

    def clean(self):
        data = super().clean()
        job = data.get("job")
        if job is not None:
            if job.base_model not in self.served:
                self.add_error("job", draining_notice(job.base_model, "playground sessions") or
                               f"No healthy trunk serves {job.base_model}, the base model of job {job.pk}: "
                               "start a trunk server for it (or ask an administrator), then try again.")
        elif not self.served:
            raise forms.ValidationError(self.trunk_notice)
        elif "base_model" in data and not data["base_model"]:
            self.add_error("base_model", "Choose a base model.")
        return data

    def comparison_arguments(self) -> dict:
        """The keyword arguments of ``services.start_comparison`` (after ``is_valid()``)."""
        data = self.cleaned_data
        job = data["job"]
        return dict(prompt=data["prompt"], job=job, base_model=None if job is not None else data["base_model"],
                    max_new_tokens=data["max_new_tokens"], temperature=data["temperature"], seed=data["seed"],
                    chat=data["chat"])
