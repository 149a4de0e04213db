"""What share of a step a job's cut leaves on this site's workers, for the form, the job page and the API.

The count (``splitcore.model.compute_share``) reads the base model's config.json from MODELS_DIR, where every
model the form offers is installed. A side of the cut left empty is the trunk's default: the job's own trunk's
when it has one, else the one default every healthy trunk of the model shares (None when they differ, or when
none reported its layers: the trunk chosen at the start decides).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

from splitcore.model.compute_share import ComputeShare, ModelCompute, model_compute

from .. import base_models
from ..trunks.models import TrunkServer
from ..trunks.selection import healthy_trunks, serving_trunks
from .models import Job

log = logging.getLogger(__name__)

Cut = tuple[int, int]


@lru_cache(maxsize=16)
def _compute_from_file(config_path: Path, modified_ns: int) -> ModelCompute | None:
    try:
        return model_compute(json.loads(config_path.read_text()))
    except (OSError, ValueError) as exc:  # unreadable JSON is a ValueError too
        log.warning("no compute share for %s: %s", config_path.parent.name, exc)
        return None


def model_compute_for(model_id: str) -> ModelCompute | None:
    """The matmul work of ``model_id``'s blocks and LM head, from its config.json in MODELS_DIR (None: not
    installed here, or a config the count cannot read)."""
    try:
        config_path = base_models.model_dir(model_id) / "config.json"
        modified_ns = config_path.stat().st_mtime_ns
    except (base_models.BaseModelUnavailable, OSError):
        return None
    return _compute_from_file(config_path, modified_ns)


def trunk_default_cut(trunk: TrunkServer) -> Cut | None:
    """The blocks a trunk leaves before and after it by default (None: its last check reported no layers)."""
    bounds = trunk.bounds
    if bounds is None:
        return None
    spec = bounds.split()
    return spec.n_bottom, spec.n_top


def model_default_cut(model_id: str) -> Cut | None:
    """The default cut every healthy trunk of ``model_id`` shares (draining ones when none is healthy; None: none
    reported one, or they differ)."""
    defaults = {trunk_default_cut(trunk) for trunk in healthy_trunks(model_id) or serving_trunks(model_id)}
    return defaults.pop() if len(defaults) == 1 else None


def job_cut(job: Job, total_blocks: int) -> Cut | None:
    """The blocks the job keeps before and after the trunk: where its links ran, else its own cut with the
    trunk's default for a side left empty (None: that default is not known yet)."""
    links = job.chain()
    if links and links[0].layers is not None and links[-1].layers is not None:
        return links[0].layers.start, total_blocks - links[-1].layers.stop
    n_bottom, n_top = job.bottom_layers, job.top_layers
    if n_bottom is None or n_top is None:
        default = trunk_default_cut(job.trunk) if job.trunk is not None else model_default_cut(job.base_model)
        if default is None:
            return None
        n_bottom = default[0] if n_bottom is None else n_bottom
        n_top = default[1] if n_top is None else n_top
    return n_bottom, n_top


def job_compute_share(job: Job) -> ComputeShare | None:
    """The split of a step's compute at the job's cut (None: its model's config or its cut is not known here)."""
    compute = model_compute_for(job.base_model)
    if compute is None:
        return None
    cut = job_cut(job, compute.total_blocks)
    if cut is None:
        return None
    try:
        return compute.share(*cut)
    except ValueError:  # a cut its trunk would refuse; the job's own error says so
        return None


def job_compute_words(job: Job) -> str:
    """The job page's sentence: the split, or why it is not known yet."""
    share = job_compute_share(job)
    if share is not None:
        text = share.describe()
        return text[:1].upper() + text[1:] + "."
    if model_compute_for(job.base_model) is None:
        return f"Not known: the configuration of {job.base_model} is not installed on this site."
    return "Known once a trunk is chosen: the blocks left to the trunk's default are its to say."


# ------------------------------------------------------------------ the job form (compute_share.js says the same)


def form_compute_data(model_ids: list[str], trunks: list[TrunkServer]) -> dict:
    """For the job form's script: each offered model's work per block and LM head with the default cut its
    healthy trunks share, and each offered trunk's model and default cut."""
    models = {}
    for model_id in model_ids:
        compute = model_compute_for(model_id)
        if compute is not None:
            default = model_default_cut(model_id)
            models[model_id] = {**compute.to_dict(), "default_cut": list(default) if default else None}
    offered = {str(trunk.pk): {"model": trunk.model_id, "default_cut": list(cut) if (cut := trunk_default_cut(trunk))
                               else None} for trunk in trunks}
    return {"models": models, "trunks": offered}


def cut_words(model_id: str, cut: tuple[int | None, int | None], trunk: TrunkServer | None = None) -> str:
    """The job form's line on the split of compute at ``cut`` (None: the trunk's default on that side) for
    ``model_id`` on ``trunk`` (None: auto); "" when the model's config is not installed here."""
    compute = model_compute_for(model_id)
    if compute is None:
        return ""
    n_bottom, n_top = cut
    lead = "At this cut"
    if n_bottom is None or n_top is None:
        use_trunk = trunk is not None and trunk.model_id == model_id
        default = trunk_default_cut(trunk) if use_trunk else model_default_cut(model_id)
        if default is None:
            return ("Empty cut fields take the default of the trunk the job gets, which is not known here: fill in "
                    "both to see how much of each step runs on your workers.")
        if n_bottom is None and n_top is None:
            lead = f"At the trunk's default cut, {default[0]} blocks before it and {default[1]} after it,"
        elif n_bottom is None:
            lead = f"With the trunk's default of {default[0]} blocks before it,"
        else:
            lead = f"With the trunk's default of {default[1]} blocks after it,"
        n_bottom = default[0] if n_bottom is None else n_bottom
        n_top = default[1] if n_top is None else n_top
    total = compute.total_blocks
    if n_bottom < 1 or n_top < 1 or n_bottom + n_top >= total:
        return (f"{model_id} has {total} blocks: keep at least 1 before the trunk and 1 after it, and at most "
                f"{total - 1} in all, so the trunk runs at least one.")
    return f"{lead} {compute.share(n_bottom, n_top).describe()}."
