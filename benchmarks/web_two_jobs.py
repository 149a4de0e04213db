"""Two training jobs at once from the web app, and the memory of every process against its weights.

Starts the production stack in a fresh data directory: Redis, a trunk server (``--dtype bf16``
by default, cut 2+2), one Celery worker with two prefork slots on the training queue. Through
the JSON API (the same views, form and services as the pages: the jobs go to Celery as in
production) it uploads a small dataset as a new user, registers the trunk and submits two
small jobs (batch 1, ``--seq-len`` tokens, ``--steps`` steps). While they run it samples
VmRSS and VmHWM (/proc/<pid>/status) of the trunk, the Celery parent and each pool child
every ``POLL_S``, then prints:

- needs: the bytes of the weights the process must hold, from the checkpoint's tensor shapes
  and the loaders' own selection (trunk: its blocks in the trunk dtype; a worker slot: the
  embeddings, its first and last blocks and the final norm in WORKER_DTYPE, a tied LM head
  counted once; the Celery parent: none);
- peak: the kernel's high-water mark (VmHWM), at least the largest sampled VmRSS;
- steady: the median VmRSS while both jobs were training past their first step;
- the goal: peak <= 1.3 x needs + 0.5 GiB;
- max anon: the largest RssAnon sampled (RSS less file-backed pages, mostly the memory-mapped
  checkpoint); the largest VmRSS sampled while a job ran its leakage audit (PRIVACY_AUDIT_SAMPLE,
  ``--audit-sample``) and while none did.

The random-weight model comes from ``memory_scale.write_random_model`` (sharded bf16
safetensors of a config in ``benchmarks/configs``, cached under ``--work-dir`` and shared with
that benchmark); ``--tiny`` uses the tiny Llama of the tests instead, for a quick check.

    .venv/bin/python benchmarks/web_two_jobs.py --tiny
    .venv/bin/python benchmarks/web_two_jobs.py --config llama-3.2-3b
    .venv/bin/python benchmarks/web_two_jobs.py --config llama-3.2-3b --worker-dtype bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# benchmarks/memory_scale.py: the goal, the /proc readings and the random-weight model writer.
from memory_scale import (  # noqa: E402
    GOAL_FACTOR, GOAL_SLACK, gib, goal_bytes, read_status, resolve_config, write_random_model,
)

POLL_S = 0.1
DB_POLL_S = 0.5
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TINY_MODEL_ID = "tiny-llama"
ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(24)]
# What the loaders log about the parts they read (splitcore/model/part_loading.py), and the trunk's start.
LOAD_MARKERS = ("GiB of weights", "resident memory", "listening on")
AUDIT_PHASE = "leakage audit"  # in the phase of a job running it (webapp/training/runner.py)


# ----------------------------------------------------------------------------- model and needs


def prepare_model(args) -> tuple[Path, str]:
    """The model directory (written once, then reused) and the id the web app and the trunk know it by."""
    models = Path(args.work_dir) / "models"
    if args.tiny:
        from splitcore.model.tiny_models import TinyModelSpec, write_tiny_model

        directory = models / TINY_MODEL_ID
        if not (directory / "config.json").is_file():
            write_tiny_model(directory, TinyModelSpec(arch="llama"))
        return directory, TINY_MODEL_ID
    import torch

    config_path = resolve_config(args.config)
    name = config_path.stem if config_path.name != "config.json" else config_path.parent.name
    directory = write_random_model(config_path, models / f"{name}-bf16", torch.bfloat16, seed=args.seed)
    return directory, directory.name


def needed_bytes(model_dir: Path, layers, dtype: str, client: bool) -> int:
    """Bytes of the tensors the loaders read for ``layers`` (+ embeddings, norm and head for a client), in ``dtype``:
    the same selection as CheckpointModel.build, so a tied LM head is counted once."""
    from splitcore.model.part_loading import CheckpointModel, PartSelection

    model = CheckpointModel(model_dir, dtype=None)
    keys = model.parameter_keys(PartSelection.of(layers, embeddings=client, head=client))
    return sum(math.prod(model.checkpoint.stored(key).shape) for key in keys) * DTYPE_BYTES[dtype]


# ----------------------------------------------------------------------------- memory sampling


def children_of(pid: int) -> list[int]:
    """Child processes, from /proc/<pid>/task/*/children (recursive)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found + [grandchild for child in found for grandchild in children_of(child)]


@dataclass
class Tracked:
    role: str
    pid: int
    needed: int | None
    hwm: int = 0
    max_rss: int = 0
    max_anon: int = 0
    max_audit: int = 0  # the largest VmRSS sampled while a job ran its leakage audit
    max_other: int = 0  # ... and while none did
    samples: list[tuple[float, int]] = field(default_factory=list)
    gone: bool = False

    def sample(self, now: float, auditing: bool = False) -> None:
        status = read_status(self.pid)
        if status is None:
            self.gone = True
            return
        self.samples.append((now, status["VmRSS"]))
        self.max_rss = max(self.max_rss, status["VmRSS"])
        self.max_anon = max(self.max_anon, status.get("RssAnon", 0))
        self.hwm = max(self.hwm, status.get("VmHWM", 0))
        if auditing:
            self.max_audit = max(self.max_audit, status["VmRSS"])
        else:
            self.max_other = max(self.max_other, status["VmRSS"])

    @property
    def peak(self) -> int:
        return max(self.hwm, self.max_rss)

    def steady(self, windows: list[tuple[float, float]]) -> int | None:
        inside = [rss for when, rss in self.samples if any(start <= when <= end for start, end in windows)]
        return int(statistics.median(inside)) if inside else None


# ----------------------------------------------------------------------------- the run


def configure(run_dir: Path, redis_url: str, model_id: str, args) -> dict[str, str]:
    """The environment of this process, the worker and the migrations: a fresh SQLite database and data dirs."""
    env = {
        "SPLITLEARN_DATA_DIR": str(run_dir / "data"),
        "DATABASE_URL": f"sqlite:///{run_dir / 'db.sqlite3'}",
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "SPLITLEARN_MODELS_DIR": str(run_dir / "models"),
        "SPLITLEARN_JOBS_DIR": str(run_dir / "jobs"),
        "MEDIA_ROOT": str(run_dir / "media"),
        "DEFAULT_BASE_MODEL": model_id,
        "WORKER_DTYPE": args.worker_dtype,
        "WORKER_MODEL_CACHE_GB": str(args.worker_cache_gb),
        "PRIVACY_AUDIT_SAMPLE": str(args.audit_sample),
        "SECRET_KEY": secrets.token_urlsafe(50),
        "TRUNK_WAIT_S": "30",
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": "INFO",
    }
    os.environ.update(env)
    os.environ["DJANGO_SETTINGS_MODULE"] = "webapp.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return env


def submit_jobs(model_id: str, trunk_process, args) -> list[int]:
    """A user uploads the dataset and submits two jobs through the JSON API; the trunk is registered and checked."""
    from django.contrib.auth import get_user_model
    from django.core.files.uploadedfile import SimpleUploadedFile
    from rest_framework.test import APIClient

    from webapp.trunks.health import check_trunk
    from webapp.trunks.models import TrunkServer

    trunk = TrunkServer.objects.create(name="local", address=trunk_process.address, token=trunk_process.token)
    check_trunk(trunk)
    if trunk.status != TrunkServer.Status.UP:
        raise RuntimeError(f"the trunk is {trunk.status}: {trunk.last_error}")
    user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(16))
    api = APIClient(SERVER_NAME="localhost")
    api.force_authenticate(user)
    data = ("\n".join(json.dumps(row) for row in ROWS) + "\n").encode()
    response = api.post("/api/datasets/", {"file": SimpleUploadedFile("sums.jsonl", data), "name": "sums"},
                        format="multipart")
    if response.status_code != 201:
        raise RuntimeError(f"dataset upload refused ({response.status_code}): {response.content[:2000]!r}")
    dataset = response.json()["id"]
    jobs = []
    for index in range(2):
        job = {"dataset": dataset, "base_model": model_id, "name": f"two-jobs {index + 1}", "max_steps": args.steps,
               "batch_size": 1, "grad_accum_steps": 1, "max_seq_length": args.seq_len, "val_fraction": 0.0,
               "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-3, "seed": index, "train_trunk_lora": True,
               "bottom_layers": args.bottom_layers, "top_layers": args.top_layers}
        response = api.post("/api/jobs/", job, format="json")
        if response.status_code != 201:
            raise RuntimeError(f"job refused ({response.status_code}): {response.content[:2000]!r}")
        jobs.append(response.json()["id"])
    return jobs


def watch(job_ids: list[int], tracked: dict[int, Tracked], worker_pid: int, slot_needed: int,
          timeout: float) -> tuple[list[tuple[float, float]], str]:
    """Sample memory until every job has finished; returns the steady windows and what they are."""
    from webapp.training.models import Job

    deadline = time.monotonic() + timeout
    next_db = 0.0
    both_trained: list[tuple[float, float]] = []  # both jobs in the training phase, past their first step
    running: list[tuple[float, float]] = []  # any job running (the fallback when the former is empty)
    last_line = ""
    auditing = False
    while True:
        now = time.monotonic()
        for pid in children_of(worker_pid):
            if pid not in tracked:
                tracked[pid] = Tracked(f"worker slot (pid {pid})", pid, slot_needed)
        for process in tracked.values():
            if not process.gone:
                process.sample(now, auditing)
        if now >= next_db:
            next_db = now + DB_POLL_S
            jobs = list(Job.objects.filter(pk__in=job_ids).order_by("pk"))
            auditing = any(AUDIT_PHASE in job.phase for job in jobs)
            if all(job.status == Job.Status.RUNNING and job.phase == Job.TRAINING_PHASE and job.current_step >= 1
                   for job in jobs):
                both_trained.append((now - DB_POLL_S, now))
            if any(job.status == Job.Status.RUNNING for job in jobs):
                running.append((now - DB_POLL_S, now))
            line = "; ".join(f"job {job.pk} {job.status} {job.current_step}/{job.total_steps or '?'}"
                             f"{' (' + job.phase + ')' if job.phase else ''}" for job in jobs)
            if line != last_line:
                print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)
                last_line = line
            if all(job.is_finished for job in jobs):
                break
            if now > deadline:
                raise TimeoutError(f"the jobs did not finish within {timeout:.0f} s: {line}")
        time.sleep(POLL_S)
    if both_trained:
        return both_trained, "median VmRSS while both jobs trained past their first step"
    return running, "median VmRSS while a job ran (the jobs never trained at the same time past step 1)"


def report_jobs(job_ids: list[int]) -> bool:
    from webapp.training.models import Job, JobLog, MetricPoint

    ok = True
    for job in Job.objects.filter(pk__in=job_ids).order_by("pk"):
        losses = list(MetricPoint.objects.filter(job=job, kind="train").order_by("step").values_list("step", "loss"))
        took = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
        print(f"job {job.pk}: {job.status} at step {job.current_step}/{job.total_steps}"
              f"{f' in {took:.0f} s' if took is not None else ''}; final loss {job.last_loss}; losses by step "
              f"{', '.join(f'{step}: {loss:.4f}' for step, loss in losses) or 'none'}"
              f"{'; error: ' + job.error_message if job.error_message else ''}")
        for entry in JobLog.objects.filter(job=job).order_by("pk"):
            print(f"    [{entry.level}] {entry.message}")
        ok &= job.status == Job.Status.SUCCEEDED
    return ok


def print_table(rows: list[Tracked], windows, what_steady: str) -> bool:
    print(f"\npeak: VmHWM (at least the largest VmRSS sampled every {POLL_S:g} s); steady: {what_steady}; "
          f"goal: peak <= {GOAL_FACTOR} x needs + {gib(GOAL_SLACK)} GiB; max anon: the largest RssAnon sampled (the "
          f"rest of RSS is mostly memory-mapped checkpoint pages); max in audit / otherwise: the largest VmRSS "
          f"sampled while a job ran its leakage audit / while none did")
    header = f"{'process':<26} {'needs GiB':>9} {'goal GiB':>8} {'peak RSS GiB':>12} {'steady RSS GiB':>14} " \
             f"{'peak/needs':>10}  {'within goal?':<12} {'max anon':>8} {'max in audit':>12} {'max otherwise':>13}"
    print(header)
    print("-" * len(header))
    passed = True
    for row in rows:
        steady = row.steady(windows)
        ratio = f"{row.peak / row.needed:.2f}" if row.needed else "-"
        within = row.peak <= goal_bytes(row.needed or 0)
        passed &= within
        print(f"{row.role:<26} {gib(row.needed or 0):>9} {gib(goal_bytes(row.needed or 0)):>8} {gib(row.peak):>12} "
              f"{gib(steady) if steady is not None else '-':>14} {ratio:>10}  {'yes' if within else 'NO':<12} "
              f"{gib(row.max_anon):>8} {gib(row.max_audit) if row.max_audit else '-':>12} {gib(row.max_other):>13}")
    return passed


def quote_load_lines(label: str, text: str) -> None:
    lines = [line.strip() for line in text.splitlines() if any(marker in line for marker in LOAD_MARKERS)]
    print(f"\n{label}:")
    for line in lines or ["(no loading lines)"]:
        print(f"  {line}")


def run(args) -> int:
    from splitcore.remote.process import start_trunk
    from webapp.processes import start_redis, start_worker

    model_dir, model_id = prepare_model(args)
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    nb, nt = args.bottom_layers, args.top_layers
    trunk_needed = needed_bytes(model_dir, range(nb, num_layers - nt), args.trunk_dtype, client=False)
    slot_needed = needed_bytes(model_dir, [*range(nb), *range(num_layers - nt, num_layers)], args.worker_dtype,
                               client=True)
    runs = Path(args.work_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = runs / f"web-two-jobs-{model_id}-{args.worker_dtype}-{time.strftime('%Y%m%d-%H%M%S')}"
    (run_dir / "models").mkdir(parents=True)
    (run_dir / "models" / model_id).symlink_to(model_dir.resolve(), target_is_directory=True)
    print(f"{model_id}: {num_layers} blocks, cut {nb}+{nt}; trunk {args.trunk_dtype} needs {gib(trunk_needed)} GiB, "
          f"a worker slot ({args.worker_dtype}) {gib(slot_needed)} GiB; run directory {run_dir}", flush=True)

    started: list = []  # what to stop, in reverse
    worker = trunk = None
    stray: set[int] = set()
    try:
        redis = start_redis(run_dir / "redis")
        started.append(redis)
        env = configure(run_dir, redis.url, model_id, args)
        from django.conf import settings

        began = time.perf_counter()
        trunk = start_trunk(run_dir / "models" / model_id, run_dir, "--dtype", args.trunk_dtype, "--model-id",
                            model_id, "--max-sessions", "4", n_bottom=nb, n_top=nt, startup_timeout_s=1800)
        started.append(trunk)
        print(f"trunk up in {time.perf_counter() - began:.0f} s at {trunk.address}", flush=True)
        worker = start_worker(env, run_dir / "worker.log", name="two-jobs", concurrency=2,
                              queues=[settings.TRAINING_QUEUE])
        started.append(worker)
        tracked = {trunk.pid: Tracked(f"trunk ({args.trunk_dtype})", trunk.pid, trunk_needed),
                   worker.process.pid: Tracked("celery parent", worker.process.pid, 0)}
        for pid in children_of(worker.process.pid):
            tracked[pid] = Tracked(f"worker slot (pid {pid})", pid, slot_needed)
        now = time.monotonic()
        for process in tracked.values():
            process.sample(now)
        print("before the jobs: " + ", ".join(f"{p.role} {gib(p.samples[-1][1])} GiB" for p in tracked.values()
                                              if p.samples), flush=True)
        job_ids = submit_jobs(model_id, trunk, args)
        print(f"submitted jobs {job_ids} (batch 1 x {args.seq_len} tokens, {args.steps} steps, "
              f"privacy audit sample {args.audit_sample}, worker dtype {args.worker_dtype})", flush=True)
        began = time.perf_counter()
        windows, what_steady = watch(job_ids, tracked, worker.process.pid, slot_needed, args.timeout)
        print(f"both jobs ended after {time.perf_counter() - began:.0f} s", flush=True)
        stray = set(children_of(worker.process.pid))
        for pid in stray:  # a last reading of the high-water marks
            if pid in tracked:
                tracked[pid].sample(time.monotonic())
        tracked[trunk.pid].sample(time.monotonic())
        tracked[worker.process.pid].sample(time.monotonic())

        print()
        succeeded = report_jobs(job_ids)
        quote_load_lines(f"trunk log ({trunk.log_path})", trunk.log())
        quote_load_lines(f"worker log ({worker.log_path})", worker.log())
        rows = sorted(tracked.values(), key=lambda p: (not p.role.startswith("trunk"), p.role != "celery parent",
                                                       p.pid))
        within = print_table(rows, windows, what_steady)
        print(f"\nboth jobs succeeded: {'yes' if succeeded else 'NO'}; every process within the goal: "
              f"{'yes' if within else 'NO'}")
        return 0 if succeeded and within else 1
    finally:
        if worker is not None:
            stray |= set(children_of(worker.process.pid))
        for process in reversed(started):
            process.stop()
        for pid in stray:  # pool children the parent left behind (only ours, by pid)
            if read_status(pid) is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        print(f"logs in {run_dir}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--config", default="llama-3.2-3b",
                      help="a config in benchmarks/configs or a path to a config.json (default: llama-3.2-3b)")
    what.add_argument("--tiny", action="store_true", help="the tiny Llama of the tests instead (a quick check)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where models are cached and runs kept (default: memory_scale's, "
                             "$SPLITLEARN_DATA_DIR/memory-scale or /tmp/splitlearn-memory-scale)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of each job")
    parser.add_argument("--seq-len", type=int, default=64, help="max sequence length of the jobs")
    parser.add_argument("--worker-dtype", choices=("fp32", "bf16"), default="fp32", help="WORKER_DTYPE")
    parser.add_argument("--trunk-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--worker-cache-gb", type=float, default=8.0, help="WORKER_MODEL_CACHE_GB")
    parser.add_argument("--audit-sample", type=int, default=2,
                        help="PRIVACY_AUDIT_SAMPLE: examples the leakage audit attacks per job (0: no audit)")
    parser.add_argument("--bottom-layers", type=int, default=2)
    parser.add_argument("--top-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the jobs may take")
    args = parser.parse_args(argv)
    if args.work_dir is None:
        data = os.environ.get("SPLITLEARN_DATA_DIR")
        args.work_dir = Path(data) / "memory-scale" if data else Path("/tmp/splitlearn-memory-scale")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
