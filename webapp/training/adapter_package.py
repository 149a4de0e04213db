"""The download of a finished job: the PEFT adapter, a model card, the arguments, the metrics."""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zipfile

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
        "privacy_audit": job.privacy_audit,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


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
    return f"""---
base_model: {job.base_model}
library_name: peft
tags:
- lora
- split-learning
---

# {job.display_name}: a LoRA adapter for {job.base_model} (job {job.pk})

Fine-tuned with split learning: the data owner's worker ran the embeddings, the first and
the last decoder blocks and the LM head; a trunk server ran the middle blocks and saw only
hidden states and their gradients, which can still reveal much of the text (see Privacy).
This is one ordinary PEFT LoRA adapter for the whole model.

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

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{job.base_model}")  # or the local directory of that model
model = PeftModel.from_pretrained(base, "path/to/this/unzipped/directory")
tokenizer = AutoTokenizer.from_pretrained("{job.base_model}")
```

{_prompt_format(job)}

`metrics.csv` holds the loss curve; `training_args.json` every setting of the run.
"""


def _prompt_format(job: Job) -> str:
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
