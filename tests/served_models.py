"""A second base model for the tests that need two to choose from: a copy of the tiny model under another
name in the session's models directory, and healthy-looking trunk rows serving both (nothing is generated)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from web_fixtures import TINY_MODEL_ID

from webapp.trunks.models import TrunkServer

OTHER_MODEL_ID = "tiny-llama-other"


def up_trunk(model_id: str = TINY_MODEL_ID) -> TrunkServer:
    """A trunk row that looks healthy, so that the playground offers ``model_id``."""
    return TrunkServer.objects.create(name=f"listed {model_id}", address="127.0.0.1:9", token="t" * 24,
                                      model_id=model_id, status=TrunkServer.Status.UP, max_sessions=4,
                                      active_sessions=0)


@contextmanager
def two_served_models(models_dir: Path) -> Iterator[tuple[str, str]]:
    """The tiny model and a copy of it named ``OTHER_MODEL_ID``, both installed and served; the copy is
    removed afterwards (the models directory is the whole session's)."""
    shutil.copytree(models_dir / TINY_MODEL_ID, models_dir / OTHER_MODEL_ID)
    try:
        up_trunk(TINY_MODEL_ID)
        up_trunk(OTHER_MODEL_ID)
        yield TINY_MODEL_ID, OTHER_MODEL_ID
    finally:
        shutil.rmtree(models_dir / OTHER_MODEL_ID, ignore_errors=True)
