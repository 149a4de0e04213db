"""How long a training step takes to reach the browser: worker -> Redis -> daphne -> WebSocket.

Starts the real stack in a temporary data directory (Redis, a trunk server on a tiny
model, a Celery worker, daphne), runs a job, and listens on /ws/jobs/<id>/ like the job
page does. For every live metric event it takes the time from the moment the worker
finished the step (``finished_at`` in the event) to its arrival at the client, and
prints the median and the 95th percentile. Target: median under 300 ms.

    .venv/bin/python benchmarks/live_latency.py [--steps 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))


def configure(data_dir: Path, redis_url: str) -> dict[str, str]:
    env = {
        "SPLITLEARN_DATA_DIR": str(data_dir), "SECRET_KEY": secrets.token_urlsafe(50), "REDIS_URL": redis_url,
        "DEFAULT_BASE_MODEL": "tiny-llama", "JOB_CHECKPOINT_EVERY": "50", "LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return env


async def listen(url: str, cookie: str, origin: str, steps: int) -> list[float]:
    import websockets

    latencies = []
    async with websockets.connect(url, additional_headers={"Cookie": cookie, "Origin": origin}) as socket:
        while True:
            event = json.loads(await asyncio.wait_for(socket.recv(), timeout=300))
            arrived = time.time()
            if event["type"] == "metric" and "finished_at" in event:
                latencies.append(arrived - event["finished_at"])
            if event["type"] == "done" or (event["type"] == "metric" and event["step"] >= steps):
                return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    from splitcore.model.tiny_models import TinyModelSpec, write_tiny_model
    from splitcore.remote.process import start_trunk
    from webapp.processes import start_redis, start_web_server, start_worker

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = start_redis(root / "redis")
        children = [redis]
        try:
            env = configure(root / "data", redis.url)
            from django.conf import settings
            from django.core.files.base import ContentFile
            from django.test import Client

            from webapp.datasets.services import create_dataset
            from webapp.training import services
            from webapp.training.models import Job
            from webapp.trunks.health import check_trunk
            from webapp.trunks.models import TrunkServer

            model_dir = write_tiny_model(Path(settings.MODELS_DIR) / "tiny-llama", TinyModelSpec(arch="llama"))
            trunk = start_trunk(model_dir, root)
            children.append(trunk)
            children.append(start_worker(env, root / "worker.log"))
            server = start_web_server(env, root / "web.log")
            children.append(server)

            from django.contrib.auth import get_user_model

            user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(16))
            row = TrunkServer.objects.create(name="local", address=trunk.address, token=trunk.token)
            check_trunk(row)
            rows = "\n".join(json.dumps({"text": f"sample {i} of a small benchmark corpus"}) for i in range(64))
            upload = ContentFile(rows.encode(), name="bench.jsonl")
            dataset = create_dataset(user, upload, "bench")
            job = services.create_job(Job(owner=user, dataset=dataset, base_model="tiny-llama",
                                          max_steps=args.steps, batch_size=4, max_seq_length=32, val_fraction=0.0))
            client = Client()
            client.force_login(user)
            cookie = f"sessionid={client.cookies['sessionid'].value}"
            ws_url = f"ws://127.0.0.1:{server.port}/ws/jobs/{job.pk}/"
            latencies = asyncio.run(listen(ws_url, cookie, server.url, args.steps))
        finally:
            for child in reversed(children):
                child.stop()
    if not latencies:
        print("no live metric events arrived")
        return 1
    latencies_ms = sorted(1000 * x for x in latencies)
    p95 = latencies_ms[min(len(latencies_ms) - 1, int(0.95 * len(latencies_ms)))]
    print(f"{len(latencies_ms)} live steps: step finished -> WebSocket client, "
          f"median {statistics.median(latencies_ms):.1f} ms, p95 {p95:.1f} ms, max {latencies_ms[-1]:.1f} ms "
          f"(target: median < 300 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
