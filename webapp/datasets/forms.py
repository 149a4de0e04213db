"""Forms of the dataset pages; validation of the file itself is in services.create_dataset."""

from __future__ import annotations

from django import forms

from . import services


class UploadForm(forms.Form):
    # Empty files are accepted here so that the parser names the file and says what it needs.
    file = forms.FileField(
        allow_empty_file=True,
        help_text="JSONL, CSV or plain text (UTF-8).",
        widget=forms.ClearableFileInput(attrs={"accept": ".jsonl,.ndjson,.csv,.txt"}),
    )
    name = forms.CharField(
        required=False, max_length=services.NAME_MAX_LENGTH, help_text="Defaults to the file name."
    )


class StatisticsForm(forms.Form):
    """The base model whose tokenizer counts the tokens, and the length examples are cut at."""

    model = forms.ChoiceField(label="Base model")
    max_length = forms.IntegerField(
        label="Max length (tokens)",
        min_value=services.MIN_MAX_LENGTH,
        max_value=services.MAX_MAX_LENGTH,
    )

    def __init__(self, data=None, *, models: list[str], default_model: str | None) -> None:
        # Missing fields take their defaults, so a link with only ?max_length=1024 works.
        initial = {"model": default_model, "max_length": services.DEFAULT_MAX_LENGTH}
        if data is not None:
            data = {**initial, **{key: data[key] for key in ("model", "max_length") if data.get(key)}}
        super().__init__(data, initial=initial)
        self.fields["model"].choices = [(model, model) for model in models]

    def choice(self) -> tuple[str, int]:
        return self.cleaned_data["model"], self.cleaned_data["max_length"]
