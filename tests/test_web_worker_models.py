"""What a worker process holds of a base model: the Bottom and Top its requests run, in WORKER_DTYPE,
one copy shared by every request, within WORKER_MODEL_CACHE_GB."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import PROJECT_ROOT
from web_fixtures import TINY_MODEL_ID

from splitcore.model.split_spec import SplitSpec
from webapp import base_models


@pytest.fixture
def fresh_worker_store(settings, web_dirs):
    """This process as a worker just started: nothing loaded yet, the settings' dtype and budget."""
    def reset():
        base_models.weight_store.cache_clear()
        base_models._checkpoint_model.cache_clear()

    reset()
    yield settings
    reset()


def test_a_worker_loads_bottom_and_top_in_its_dtype_and_shares_them_between_requests(fresh_worker_store, caplog):
    fresh_worker_store.WORKER_DTYPE = "bf16"
    caplog.set_level("INFO", logger="splitcore.model.part_loading")
    model = base_models.client_model(TINY_MODEL_ID)
    assert base_models.client_model(TINY_MODEL_ID) is model, "one model per process, not one per request"
    spec = SplitSpec(model.num_layers, 2, 2)

    job_bottom, job_top = model.client_parts(spec)
    playground_bottom, _ = model.client_parts(spec)

    assert {p.dtype for part in (job_bottom, job_top) for p in part.parameters()} == {torch.bfloat16}
    assert [p.data_ptr() for p in job_bottom.parameters()] == [p.data_ptr() for p in playground_bottom.parameters()]
    assert job_bottom is not playground_bottom, "each request has its own module tree for its adapter"
    read = set(model.checkpoint.keys_read)
    assert read and not any(f".layers.{i}." in key for key in read for i in spec.trunk_layers)
    assert max(model.checkpoint.keys_read.values()) == 1
    logged = [r.getMessage() for r in caplog.records if "blocks 0-1, 4-5" in r.getMessage()]
    assert logged and "bfloat16" in logged[0] and "resident memory" in logged[0], logged


def test_the_cache_budget_comes_from_the_settings(fresh_worker_store):
    fresh_worker_store.WORKER_MODEL_CACHE_GB = 0.5
    assert base_models.weight_store().budget_bytes == 512 * 1024 * 1024


def test_a_worker_dtype_it_cannot_use_is_refused_at_start(tmp_path):
    env = {**os.environ, "SPLITLEARN_DATA_DIR": str(tmp_path), "WORKER_DTYPE": "fp16"}
    command = [sys.executable, "-c", "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
               "'webapp.settings'); django.setup()"]
    result = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "WORKER_DTYPE must be fp32 or bf16, got 'fp16'" in result.stderr
