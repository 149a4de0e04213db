"""The job form: one validation for the page and the API, with a message per field."""

from __future__ import annotations

from types import SimpleNamespace

from django import forms
from django.conf import settings

from splitcore import LoraSettings, family_for
from splitcore.model.lora import ADAPTER_METHODS, check_method
from splitcore.privacy.measured import measured_meta, measured_points, recommendation
from splitcore.privacy.settings import MAX_NOISE, MAX_NOPEEK, MAX_PRIVATE_BOTTOM, PrivacySettings
from splitcore.remote.trunk import SessionNeeds

from ..datasets.models import Dataset
from .. import storage
from ..ownership import owned
from ..trunks.models import TrunkServer
from ..trunks.selection import NoTrunkAvailable, draining_notice, healthy_trunks, place, served_models
from . import presets
from .compute import cut_words, form_compute_data
from .estimates import planned_steps
from .models import HYPERPARAMETER_LABELS, NAME_MAX_LENGTH, Job

# A trunk budget a job exceeds: the form field that changes it, and what to do.
_BUDGET_ADVICE = {
    "micro_batches": ("grad_accum_steps", "accumulate fewer micro-batches or choose another trunk"),
    "tokens": ("batch_size", "lower the batch size or the max sequence length, or choose another trunk"),
    "positions": ("max_seq_length", "lower the max sequence length"),
    "lora_rank": ("lora_r", "lower the rank, choose another trunk, or turn off 'Train LoRA on the trunk too'"),
}
PRIVACY_FIELDS = ["bottom_layers", "top_layers", "private_bottom", "gradients_to_trunk", "hidden_noise",
                  "grad_noise", "nopeek"]
# What a new user chooses; the Advanced group holds the rest (the form's "preset" sets the run length).
BASIC_FIELDS = ["dataset", "name", "base_model", "preset"]
ADVANCED_FIELDS = ["trunk", "epochs", "max_steps", "learning_rate", "batch_size", "grad_accum_steps",
                   "max_seq_length", "warmup_steps", "lr_schedule", "adapter_method", "use_dora", "use_rslora",
                   "lora_r", "lora_alpha", "lora_dropout", "train_trunk_lora", "val_fraction", "seed", "wire_encoding"]
FIELDS = ["dataset", "name", "base_model", *ADVANCED_FIELDS, *PRIVACY_FIELDS]
MAX_EPOCHS = 100
_BALANCED = presets.BY_KEY[presets.DEFAULT_PRESET]


def placement_note(model_id: str, cut: tuple[int | None, int | None]) -> str:
    """What the automatic trunk choice will do for a job of ``model_id`` at ``cut``, when that is a chain of
    trunks or nothing at all ("" when a single healthy trunk serves the cut)."""
    try:
        chosen = place(model_id, cut)
    except NoTrunkAvailable:
        return ""  # the form says why when it is sent
    if not chosen.is_chain:
        return ""
    first, last = chosen.links[0], chosen.links[-1]
    blocks = f"blocks {first.layers.start}-{last.layers.stop - 1}"
    return (f"No single trunk serves {blocks} of {model_id}; the job will run on a chain of {len(chosen.links)} "
            f"trunks: {chosen.describe()}. Each link trains its own LoRA on its blocks; the first link receives "
            "the hidden states the blocks before the trunk send.")


class _YesNoSelect(forms.NullBooleanSelect):
    """Yes or no, and nothing posted reads as None (then the default)."""

    def __init__(self, attrs=None) -> None:
        super().__init__(attrs)
        self.choices = [("true", "yes"), ("false", "no: only the blocks after the trunk train")]


class _AdapterMethodField(forms.ChoiceField):
    """A method a job can use; one that cannot be split is refused with the reason."""

    def validate(self, value) -> None:
        if value:
            try:
                check_method(value)
            except ValueError as exc:
                raise forms.ValidationError(str(exc), code="invalid_choice") from exc
        super().validate(value)


class JobForm(forms.ModelForm):
    name = forms.CharField(max_length=NAME_MAX_LENGTH, required=False, strip=True,
                           help_text="how the job is listed in the jobs, the playground and comparisons (empty: the "
                                     "dataset's name and the time)")
    base_model = forms.ChoiceField(help_text="models served by a healthy trunk server")
    preset = forms.ChoiceField(
        choices=presets.choices(), required=False, initial=presets.DEFAULT_PRESET, widget=forms.RadioSelect,
        label="Run length", help_text="how long and how hard to train; Custom uses the values under Advanced")
    trunk = forms.ModelChoiceField(queryset=TrunkServer.objects.none(), required=False, empty_label="auto",
                                   help_text="auto: the healthy trunk with the most free sessions, or a chain of "
                                             "trunks (each serving some of the blocks) when no single one serves "
                                             "the cut")
    adapter_method = _AdapterMethodField(
        choices=list(ADAPTER_METHODS.items()), required=False, initial="lora",
        help_text="peft's method on every projection of all three parts: LoRA (low-rank matrices), LoHa "
                  "(Hadamard product of two low-rank pairs), LoKr (Kronecker product), IA3 (one learned scale per "
                  "module: far fewer weights, no rank, alpha or dropout)")
    use_dora = forms.BooleanField(required=False, initial=False,
                                  help_text="LoRA only: learn each weight's magnitude apart from its direction")
    use_rslora = forms.BooleanField(required=False, initial=False,
                                    help_text="LoRA only: scale the update by alpha / √r instead of alpha / r "
                                              "(steadier at high ranks)")
    lora_r = forms.IntegerField(min_value=1, max_value=256, initial=8,
                                help_text="size of the trained low-rank matrices (LoRA, LoHa, LoKr): higher learns "
                                          "more, costs more")
    lora_alpha = forms.FloatField(min_value=0.01, max_value=4096, initial=16.0,
                                  help_text="scale of the update (alpha / r multiplies it); often 2 × r")
    lora_dropout = forms.FloatField(min_value=0.0, max_value=0.9, initial=0.05,
                                    help_text="share of the LoRA inputs (LoHa and LoKr: of the rank) dropped while "
                                              "training, against overfitting")
    train_trunk_lora = forms.BooleanField(required=False, initial=True,
                                          help_text="also adapt the trunk's blocks (one adapter over the whole model)")
    learning_rate = forms.FloatField(min_value=1e-7, max_value=1.0, initial=_BALANCED.learning_rate,
                                     help_text="peak step size of AdamW (from 1e-7 to 1); LoRA usually takes 1e-4 to "
                                               "1e-3")
    epochs = forms.FloatField(min_value=0.01, max_value=MAX_EPOCHS, required=False, initial=_BALANCED.epochs,
                              help_text=f"passes over the training examples, at most {MAX_EPOCHS} (ignored when max "
                                        "steps is set)")
    max_steps = forms.IntegerField(min_value=1, max_value=settings.MAX_JOB_STEPS, required=False,
                                   help_text=f"a fixed number of optimizer steps instead of epochs (at most "
                                             f"{settings.MAX_JOB_STEPS:,})")
    batch_size = forms.IntegerField(min_value=1, max_value=512, initial=4,
                                    help_text="examples per micro-batch (the trunk's budget may allow fewer)")
    grad_accum_steps = forms.IntegerField(min_value=1, max_value=512, initial=1,
                                          help_text="micro-batches per optimizer step: a step uses batch size × "
                                                    "this many examples")
    max_seq_length = forms.IntegerField(min_value=16, max_value=32768, initial=512,
                                        help_text="examples are cut to this many tokens (the dataset's page shows "
                                                  "how many would be cut)")
    warmup_steps = forms.IntegerField(min_value=0, max_value=100_000, initial=0,
                                      help_text="steps over which the learning rate rises from 0 to its peak")
    seed = forms.IntegerField(min_value=0, max_value=2**31 - 1, initial=0,
                              help_text="of the LoRA initialisation and the order of the examples: same seed, same run")
    val_fraction = forms.FloatField(min_value=0.0, max_value=0.5, initial=0.1,
                                    help_text="share of the examples held out to measure the validation loss (0 to "
                                              "0.5)")
    bottom_layers = forms.IntegerField(
        min_value=1, max_value=256, required=False,
        help_text="the cut depth: decoder blocks that run on this site's workers before the trunk (empty: the "
                  "trunk's default); the trunk sees the hidden states after them")
    top_layers = forms.IntegerField(
        min_value=1, max_value=256, required=False,
        help_text="decoder blocks after the trunk (empty: the trunk's default); the trunk sees the gradients "
                  "coming back through them")
    hidden_noise = forms.FloatField(
        min_value=0.0, max_value=MAX_NOISE, initial=0.0, required=False,
        help_text="clipped Gaussian noise on what the trunk receives, as a share of a typical hidden state's "
                  "norm (0: off)")
    grad_noise = forms.FloatField(
        min_value=0.0, max_value=MAX_NOISE, initial=0.0, required=False,
        help_text="clipped Gaussian noise on the gradients sent back to the trunk (0: off)")
    private_bottom = forms.FloatField(
        min_value=0.0, max_value=MAX_PRIVATE_BOTTOM, initial=0.0, required=False,
        help_text="the blocks before the trunk start as a secret random variant of the public ones, of this size "
                  "relative to their weights, so the trunk's copy of the base model no longer matches (0: off)")
    # A select rather than a checkbox: a form posted without it keeps the default (yes).
    gradients_to_trunk = forms.NullBooleanField(
        required=False, initial=True, widget=_YesNoSelect(),
        help_text="yes: the trunk receives the gradients of the blocks after it and every part trains; no: the "
                  "trunk never receives a gradient (labels cannot be read from them), so untick 'Train LoRA on "
                  "the trunk too'")
    nopeek = forms.FloatField(
        min_value=0.0, max_value=MAX_NOPEEK, initial=0.0, required=False,
        help_text="trains the blocks before the trunk to decorrelate what they send from your tokens (0: off)")

    class Meta:
        model = Job
        fields = FIELDS

    def __init__(self, *args, user, base_model: str | None = None, **kwargs) -> None:
        """``base_model``: the model the privacy fields' starting values are for (default: the form's
        initial model); the measured best compromise applies to the model it was measured on."""
        super().__init__(*args, **kwargs)
        self.user = user
        for name, label in HYPERPARAMETER_LABELS.items():  # one label per setting: this form, the job and compare pages
            if name in self.fields:
                self.fields[name].label = label
        self.fields["dataset"].queryset = owned(Dataset, user)
        self.fields["dataset"].empty_label = None if self.fields["dataset"].queryset.exists() else "no datasets yet"
        self.fields["dataset"].help_text = "the examples to train on (upload more on the Datasets page)"
        self.fields["lr_schedule"].help_text = "how the learning rate falls from its peak to 0 by the last step"
        self.fields["wire_encoding"].help_text = ("how hidden states and gradients travel to the trunk: fp32 is "
                                                  "exact, the others send fewer bytes and round")
        # A model that only draining trunks serve stays on the list, marked, and its job is refused with the reason.
        models = served_models(draining=True)
        self.draining = {m: note for m in models if (note := draining_notice(m, "jobs"))}
        self.fields["base_model"].choices = [(m, f"{m} (trunk draining: no new jobs now)" if m in self.draining else m)
                                             for m in models]
        if self.draining:
            self.fields["base_model"].help_text = " ".join(self.draining.values())
        if settings.DEFAULT_BASE_MODEL in models:
            self.fields["base_model"].initial = settings.DEFAULT_BASE_MODEL
        elif models:
            self.fields["base_model"].initial = models[0]
        self.fields["trunk"].queryset = healthy_trunks()
        self._start_at_recommended_privacy(base_model or self.fields["base_model"].initial)
        for name in ("lr_schedule", "wire_encoding"):
            self.fields[name].required = False

    def _start_at_recommended_privacy(self, base_model: str | None) -> None:
        """Privacy fields start at the best compromise measured on ``base_model`` (splitcore.privacy.measured)
        within the site's ceiling on the workers' share of a step (PRIVACY_MAX_CLIENT_SHARE); for another model,
        or when no measured setting is within both limits, they start at its trunk's default cut without
        defenses."""
        point = recommendation(measured_points(), max_client_share=settings.PRIVACY_MAX_CLIENT_SHARE).chosen
        self.recommended = None
        if point is None or base_model != measured_meta().get("model"):
            return
        values = point.privacy.to_dict()
        defaults = PrivacySettings().to_dict()
        if any(name not in self.fields and value != defaults[name] for name, value in values.items()):
            return  # a setting the form cannot express (e.g. a distilled private Bottom) is not offered here
        self.recommended = point
        for name, value in values.items():
            if name in self.fields:
                self.fields[name].initial = value
        if not point.privacy.gradients_to_trunk:
            self.fields["train_trunk_lora"].initial = False  # nothing behind the cut can learn without gradients

    def chain_notes(self) -> dict:
        """For each offered base model, what the automatic choice does with the form's cut when no single trunk
        serves it ("" when one does), and that cut: the page shows the selected model's note while the cut
        fields hold it (job_form.js)."""
        cut = (self._cut_value("bottom_layers"), self._cut_value("top_layers"))
        return {"cut": list(cut),
                "notes": {model_id: placement_note(model_id, cut) for model_id, _ in self.fields["base_model"].choices}}

    def selected_model(self) -> str | None:
        return self.data.get("base_model") if self.is_bound else self.fields["base_model"].initial

    def compute_data(self) -> dict:
        """For the page script (compute_share.js): each offered model's work per block and LM head and the default
        cut its trunks share, and each offered trunk's default cut."""
        return form_compute_data([model_id for model_id, _ in self.fields["base_model"].choices],
                                 list(self.fields["trunk"].queryset))

    def compute_words(self) -> str:
        """What share of each step the form's cut leaves on the user's workers ("" for a model not installed)."""
        model_id = self.selected_model()
        if not model_id:
            return ""
        trunk_pk = self.data.get("trunk") if self.is_bound else None
        trunk = self.fields["trunk"].queryset.filter(pk=trunk_pk).first() if str(trunk_pk or "").isdecimal() else None
        return cut_words(model_id, (self._cut_value("bottom_layers"), self._cut_value("top_layers")), trunk)

    def _cut_value(self, name: str) -> int | None:
        raw = self.data.get(name) if self.is_bound else self.fields[name].initial
        try:
            return int(raw) if raw not in (None, "") else None
        except (TypeError, ValueError):
            return None

    def basic_fields(self):
        return [self[name] for name in BASIC_FIELDS]

    def advanced_fields(self):
        return [self[name] for name in ADVANCED_FIELDS]

    def privacy_fields(self):
        return [self[name] for name in PRIVACY_FIELDS]

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        limit = settings.MAX_ACTIVE_JOBS_PER_USER
        active = Job.objects.filter(owner=self.user, status__in=[Job.Status.QUEUED, Job.Status.RUNNING]).count()
        if limit and active >= limit:
            raise forms.ValidationError(f"you have {active} jobs queued or running, the limit per user is {limit}; "
                                        "wait for one to finish or cancel one")
        storage.check_not_full(self.user)
        if not self.fields["base_model"].choices:
            raise forms.ValidationError("no trunk server is up: an administrator must add or start one")
        if data.get("base_model") in self.draining:
            self.add_error("base_model", self.draining[data["base_model"]])
            return data
        trunk = data.get("trunk")
        if trunk is not None and trunk.model_id != data.get("base_model"):
            self.add_error("trunk", f"{trunk.name} serves {trunk.model_id}, not {data.get('base_model')}")
        self._check_cut(data, trunk)
        self._check_budgets(data, trunk)
        self._check_adapter_method(data, trunk)
        if self.errors:
            return data  # a field with an error has left ``data``; the checks below need every field
        data["lr_schedule"] = data.get("lr_schedule") or Job.Schedule.LINEAR
        data["adapter_method"] = data.get("adapter_method") or "lora"
        data["wire_encoding"] = data.get("wire_encoding") or Job.Wire.FP32
        for name in ("hidden_noise", "grad_noise", "nopeek", "private_bottom"):
            data[name] = data.get(name) or 0.0
        if data.get("gradients_to_trunk") is None:
            data["gradients_to_trunk"] = True
        self._apply_preset(data)
        if data.get("max_steps"):
            data["epochs"] = None
        elif not data.get("epochs"):
            data["epochs"] = _BALANCED.epochs
        self._check_length(data)
        if self.errors:
            return data
        probe = Job(**{name: data.get(name) for name in FIELDS if name not in ("dataset", "trunk")})
        try:
            probe.train_config()  # the library's own checks, as a last line
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from exc
        return data

    @staticmethod
    def _apply_preset(data: dict) -> None:
        """A preset (not custom, not absent: an API call without one keeps its own values) sets the run length."""
        preset = presets.BY_KEY.get(data.get("preset") or presets.CUSTOM)
        if preset is not None:
            data.update(epochs=preset.epochs, learning_rate=preset.learning_rate, max_steps=None)

    def _check_length(self, data: dict) -> None:
        """At most MAX_JOB_STEPS optimizer steps, however they are asked for."""
        dataset = data.get("dataset")
        if dataset is None or data.get("max_steps"):
            return  # max steps has its own limit on the field
        steps = planned_steps(dataset.num_examples, val_fraction=data["val_fraction"], epochs=data["epochs"],
                              max_steps=None, batch_size=data["batch_size"],
                              grad_accum_steps=data["grad_accum_steps"])
        limit = settings.MAX_JOB_STEPS
        if steps > limit:
            self.add_error("epochs", f"{data['epochs']:g} epochs of {dataset.name} would be {steps:,} steps; at most "
                                     f"{limit:,} are allowed: train fewer epochs or more examples per step")

    def _check_cut(self, data: dict, trunk: TrunkServer | None) -> None:
        """The chosen cut must be one the job's trunk (or, for auto, some healthy trunk) allows."""
        cut = (data.get("bottom_layers"), data.get("top_layers"))
        if trunk is not None:
            problem = trunk.cut_problem(*cut) if trunk.model_id == data.get("base_model") else ""
            if problem:
                self.add_error("bottom_layers", f"{trunk.name} does not allow this cut: {problem}")
            return
        try:
            place(data.get("base_model"), cut)
        except NoTrunkAvailable as exc:
            self.add_error("bottom_layers", str(exc))

    def _check_budgets(self, data: dict, trunk: TrunkServer | None) -> None:
        """The job's sessions must fit the budgets of its trunk (for auto: of some trunk that allows the cut),
        as the trunks' last checks recorded them; each problem goes to the field that changes it."""
        sizes = [data.get(name) for name in ("batch_size", "max_seq_length", "grad_accum_steps", "lora_r")]
        if None in sizes or self.has_error("trunk") or self.has_error("bottom_layers"):
            return
        batch_size, seq_len, micro_batches, rank = sizes
        needs = SessionNeeds(batch_size=batch_size, seq_len=seq_len, micro_batches=micro_batches,
                             lora_rank=rank if data.get("train_trunk_lora") else None)
        if trunk is not None:
            for what, problem in trunk.budget_problems(needs).items():
                advice = _BUDGET_ADVICE[what][1]
                self.add_error(_BUDGET_ADVICE[what][0], f"{trunk.name} would refuse {problem}; {advice}")
            return
        try:
            place(data.get("base_model"), (data.get("bottom_layers"), data.get("top_layers")), needs=needs)
        except NoTrunkAvailable as exc:
            self.add_error(None, str(exc))

    def _check_adapter_method(self, data: dict, trunk: TrunkServer | None) -> None:
        """DoRA and rsLoRA are LoRA's flags, a private Bottom needs LoRA, and the method must suit the model's
        family (as the trunks serving it report it)."""
        method = data.get("adapter_method") or "lora"
        if method != "lora":
            label = ADAPTER_METHODS[method]
            for flag in ("use_dora", "use_rslora"):
                if data.get(flag):
                    self.add_error(flag, f"{self.fields[flag].label} is a LoRA option; {label} has no such flag")
            if data.get("private_bottom"):
                self.add_error("private_bottom", f"a private Bottom draws the Bottom's LoRA matrices from a "
                                                 f"secret: it needs the LoRA method, not {label}")
        serving = [trunk] if trunk is not None else healthy_trunks().filter(model_id=data.get("base_model"))
        model_type = next((t.model_type for t in serving if t.model_type), "")
        if not model_type:
            return
        try:
            LoraSettings(method=method).check_family(family_for(SimpleNamespace(model_type=model_type)))
        except ValueError as exc:
            self.add_error("adapter_method", str(exc))

    def save(self, commit: bool = False) -> Job:
        job = super().save(commit=False)
        job.owner = self.user
        job.trunk_auto = job.trunk is None
        return job
