"""SplitTrainer: the training loop, the same for a split run and for the local baseline.

One optimizer step: ``grad_accum`` micro-batches, each loss divided by the labelled
tokens of the whole step (so accumulation equals one big batch); the global gradient
norm over all three parts (this process's LoRA plus the trunk's reported squared
norm); one clip coefficient for both sides; AdamW here and on the trunk with the same
learning rate. Metrics go to callbacks as typed events. ``should_cancel`` is polled
between steps; a cancelled run keeps a checkpoint to resume from.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from splitcore.model.adapter_export import export_adapter
from splitcore.model.seeding import CLIENT, dropout_seed, seeded_dropout
from splitcore.privacy import PrivacySettings
from splitcore.remote.state import ADAPTER_PREFIX, OPTIMIZER_PREFIX
from splitcore.training.batches import MicroBatches, TrainingData, evaluation_batches
from splitcore.training.checkpoints import CheckpointState, load_checkpoint, save_checkpoint
from splitcore.training.config import TrainConfig
from splitcore.training.engines import Engine, SplitEngine
from splitcore.training.optim_state import adamw_state_tensors, grad_sq_norm, load_adamw_state, new_adamw, scale_grads
from splitcore.training.schedule import learning_rate_at

RNG_KEY = "rng.torch"


@dataclass(frozen=True)
class StepMetrics:
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    wire_bytes: int
    elapsed_s: float
    time: float = 0.0  # wall-clock (epoch seconds) when the step finished


@dataclass(frozen=True)
class EvalMetrics:
    step: int
    val_loss: float


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: Path


TrainerEvent = StepMetrics | EvalMetrics | CheckpointSaved


@dataclass(frozen=True)
class TrainResult:
    status: str  # "completed" or "cancelled"
    step: int
    total_steps: int
    loss: float | None
    val_loss: float | None
    checkpoint: Path | None


class TrainingDiverged(RuntimeError):
    pass


class SplitTrainer:
    def __init__(
        self,
        engine: Engine,
        config: TrainConfig,
        data: TrainingData,
        pad_token_id: int,
        checkpoint_dir: str | os.PathLike | None = None,
        callbacks: Iterable[Callable[[TrainerEvent], None]] = (),
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.data = data
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.callbacks = list(callbacks)
        self.should_cancel = should_cancel or (lambda: False)
        self.micro_batches = MicroBatches(data.train, config.batch_size, config.seed, pad_token_id)
        self.val_batches = evaluation_batches(data.val, config.batch_size, pad_token_id)
        self.total_steps = config.total_steps(len(data.train))
        self.optimizer = new_adamw(engine.params.values(), config.optimizer)
        self.step = 0
        self.elapsed_s = 0.0
        self.loss: float | None = None
        self.val_loss: float | None = None
        self._saved_step: int | None = None
        self._kept_step: int | None = None  # the newest checkpoint: written by this run or resumed from

    @property
    def mode(self) -> str:
        return "split" if isinstance(self.engine, SplitEngine) else "local"

    # -------------------------------------------------------------- the loop

    def run(self, resume_from: str | os.PathLike | None = None) -> TrainResult:
        if resume_from is not None:
            self._resume(resume_from)
        elif self.step == 0:
            self.engine.check_fresh_start()
        self.engine.train(True)
        while self.step < self.total_steps:
            if self.should_cancel():
                return self._finish("cancelled")
            self._train_step(self.step + 1)
            if self.val_batches and self._due(self.config.eval_every):
                self._evaluate()
            if self._due(self.config.checkpoint_every):
                self._save_checkpoint()
        return self._finish("completed")

    def _due(self, every: int) -> bool:
        return self.step == self.total_steps or (every > 0 and self.step % every == 0)

    def _train_step(self, step: int) -> None:
        started = time.perf_counter()
        wire_before = self.engine.wire_bytes()
        ga = self.config.grad_accum
        batches = [self.micro_batches.batch((step - 1) * ga + k) for k in range(ga)]
        num_items = sum(batch.num_trained_tokens for batch in batches)
        loss = 0.0
        for micro, batch in enumerate(batches):
            with seeded_dropout(dropout_seed(self.config.seed, step, micro, CLIENT), self.engine.device):
                micro_loss = self.engine.loss(batch, step, micro, num_items)
                micro_loss.backward()
            loss += float(micro_loss.detach())
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss} at step {step}; lower the learning rate "
                                   "or check the data")
        client_sq, trunk_sq = self._client_grad_sq_norm(), self.engine.remote_grad_sq_norm()
        if not (math.isfinite(client_sq) and math.isfinite(trunk_sq)):
            # Before any optimizer step: neither side applies a NaN update (or a zero clip coefficient).
            raise TrainingDiverged(self._diverged_gradient(step, client_sq, trunk_sq))
        grad_norm = math.sqrt(client_sq + trunk_sq)
        clip_coef = 1.0
        if self.config.max_grad_norm > 0:
            clip_coef = min(1.0, self.config.max_grad_norm / (grad_norm + 1e-6))
        scale_grads(self.engine.params.values(), clip_coef)
        lr = learning_rate_at(step, self.total_steps, self.config.learning_rate, self.config.warmup_steps,
                              self.config.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.remote_step(step, lr, clip_coef)
        duration = time.perf_counter() - started
        self.step, self.loss = step, loss
        self.elapsed_s += duration
        tokens = sum(batch.num_tokens for batch in batches)
        self._emit(StepMetrics(
            step=step, total_steps=self.total_steps, epoch=self.micro_batches.epoch_of(step * ga), loss=loss, lr=lr,
            grad_norm=grad_norm, tokens_per_s=tokens / duration if duration > 0 else 0.0,
            wire_bytes=self.engine.wire_bytes() - wire_before, elapsed_s=self.elapsed_s, time=time.time(),
        ))

    def _client_grad_sq_norm(self) -> float:
        return grad_sq_norm(self.engine.params.values())

    def _diverged_gradient(self, step: int, client_sq: float, trunk_sq: float) -> str:
        """What a non-finite gradient norm means: which side, that nothing was applied, what to do."""
        where = ""
        if isinstance(self.engine, SplitEngine):  # a local run has one LoRA: no side to name
            sides = {"the client's": client_sq}
            if self.engine.trains_trunk or not math.isfinite(trunk_sq):  # a frozen trunk has no norm of its own
                sides["the trunk's"] = trunk_sq
            bad = [side for side, sq in sides.items() if not math.isfinite(sq)]
            good = [f": {side} is {math.sqrt(sq):.1e}" for side, sq in sides.items() if math.isfinite(sq)]
            where = f" (on {' and '.join(bad)} LoRA{''.join(good)})"
        if self._kept_step is not None:
            kept = f"; the checkpoint of step {self._kept_step} is kept"
        else:
            kept = "" if self.checkpoint_dir is None else "; no checkpoint was written yet"
        return (f"the gradient norm became {math.sqrt(client_sq + trunk_sq)} at step {step}{where}; nothing of "
                f"this step was applied; lower the learning rate or check the data{kept}")

    def _evaluate(self) -> float:
        self.engine.train(False)
        try:
            total = sum(self.engine.eval_loss_sum(batch, index, self.step)
                        for index, batch in enumerate(self.val_batches))
        finally:
            self.engine.train(True)
        tokens = sum(batch.num_trained_tokens for batch in self.val_batches)
        self.val_loss = total / tokens
        self._emit(EvalMetrics(step=self.step, val_loss=self.val_loss))
        return self.val_loss

    def _finish(self, status: str) -> TrainResult:
        checkpoint = None
        if self.checkpoint_dir is not None and self.step > 0:
            checkpoint = self._save_checkpoint()
        return TrainResult(status=status, step=self.step, total_steps=self.total_steps, loss=self.loss,
                           val_loss=self.val_loss, checkpoint=checkpoint)

    def _emit(self, event: TrainerEvent) -> None:
        for callback in self.callbacks:
            callback(event)

    # -------------------------------------------------------------- checkpoints

    def _save_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        if self._saved_step == self.step:
            return self.checkpoint_dir / f"step-{self.step:08d}"
        state = CheckpointState(step=self.step, total_steps=self.total_steps, elapsed_s=self.elapsed_s,
                                mode=self.mode, settings=self._resume_key(), loss=self.loss,
                                val_loss=self.val_loss)
        tensors = {ADAPTER_PREFIX + name: p.detach().cpu().clone() for name, p in self.engine.params.items()}
        tensors.update(adamw_state_tensors(self.optimizer, self.engine.params, OPTIMIZER_PREFIX))
        tensors[RNG_KEY] = torch.get_rng_state()
        path = save_checkpoint(self.checkpoint_dir, state, tensors, self.engine.remote_state())
        self._saved_step = self._kept_step = self.step
        self._emit(CheckpointSaved(step=self.step, path=path))
        return path

    def _resume_key(self) -> dict:
        return {**self.config.resume_key(), **self.engine.resume_key()}

    def _resume(self, path: str | os.PathLike) -> None:
        checkpoint = load_checkpoint(path)
        state = checkpoint.state
        if state.mode != self.mode:
            raise ValueError(f"checkpoint {checkpoint.path} is from a {state.mode} run; this run is {self.mode}")
        expected = self._resume_key()
        written = {"privacy": PrivacySettings().to_dict(), **state.settings}  # older checkpoints: no defenses
        if isinstance(written.get("privacy"), dict):  # older checkpoints: without the settings added since
            written["privacy"] = {**PrivacySettings().to_dict(), **written["privacy"]}
        if isinstance(written.get("lora"), dict):  # older checkpoints: LoRA, before the method was recorded
            written["lora"] = {"method": "lora", **written["lora"]}
        if "client_secret" not in written:  # older checkpoints did not record the key
            expected.pop("client_secret", None)
        differing = sorted(k for k in expected.keys() | written.keys() if expected.get(k) != written.get(k))
        if "client_nonce" in differing:  # a nonce mixed into the key: another one makes another key too
            written_nonce, own_nonce = written.get("client_nonce") or "none", expected.get("client_nonce") or "none"
            raise ValueError(f"checkpoint {checkpoint.path} was written by a run with key nonce {written_nonce}, this "
                             f"run's is {own_nonce}; resume with the run's own nonce (the CLI's --resume reads it "
                             "from the checkpoint)")
        if differing:
            name = differing[0]
            if name == "client_secret":
                raise ValueError(f"checkpoint {checkpoint.path} was written with another client secret (key "
                                 f"{written.get(name)}, this run's is {expected.get(name)}); resume with the key "
                                 "the run started with")
            raise ValueError(f"checkpoint {checkpoint.path} was written with {name}={written.get(name)!r}, "
                             f"this run has {name}={expected.get(name)!r}; resume with the same settings")
        tensors = checkpoint.client_tensors
        missing = [n for n in self.engine.params if ADAPTER_PREFIX + n not in tensors]
        if missing:
            raise ValueError(f"checkpoint {checkpoint.path} lacks the LoRA weight {missing[0]!r}")
        with torch.no_grad():
            for name, param in self.engine.params.items():
                value = tensors[ADAPTER_PREFIX + name]
                if value.shape != param.shape:
                    raise ValueError(f"checkpoint weight {name!r} has shape {list(value.shape)}, "
                                     f"the run's has {list(param.shape)}")
                param.copy_(value)
        load_adamw_state(self.optimizer, self.engine.params, tensors, OPTIMIZER_PREFIX)
        if RNG_KEY in tensors:
            torch.set_rng_state(tensors[RNG_KEY])
        self.engine.restore_remote_state(state.step, checkpoint.trunk_state)
        self.step, self.elapsed_s = state.step, state.elapsed_s
        self._kept_step = state.step
        self.loss, self.val_loss = state.loss, state.val_loss

    # -------------------------------------------------------------- result

    def export_adapter(self, out_dir: str | os.PathLike, base_model_name_or_path: str) -> Path:
        """Write the merged full-model PEFT adapter of the current weights."""
        return export_adapter(self.engine.adapter_states(), out_dir, self.engine.family, self.config.lora,
                              base_model_name_or_path)
