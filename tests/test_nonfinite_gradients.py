"""A gradient that is not finite stops the step before anything is applied, on both sides.

The client's LoRA is poisoned with a gradient hook; the trunk's through a real trunk server
process: its LoRA A weights are made huge (B zero, so the forward is unchanged) and the
gradient sent back over the cut is scaled up at the network edge, so the trunk's LoRA B
gradients overflow while everything that crosses the wire stays finite.
"""

from __future__ import annotations

import json
import math

import grpc
import pytest
import torch
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM, AutoTokenizer
from trunk_process import start_trunk

from splitcore import LoraSettings
from splitcore.data.formats import load_dataset_file
from splitcore.model.split_spec import SplitSpec
from splitcore.privacy import ClientSecret
from splitcore.remote import state as trunk_state
from splitcore.remote.client import TrunkClient, TrunkError
from splitcore.training import CheckpointSaved, LocalEngine, SplitEngine, SplitTrainer, TrainConfig, TrainingDiverged
from splitcore.training.batches import prepare_training_data
from splitcore.training.optim_state import adamw_state_tensors

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
SECRET = ClientSecret(bytes(range(32)))
CLIPPING = pytest.mark.parametrize("max_grad_norm", [0.5, 0.0], ids=["clipped", "unclipped"])
NORM = r"\d\.\de[+-]\d\d"  # a finite norm as the message prints it


@pytest.fixture(scope="module")
def trunk(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"), "--max-sessions", "4")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arithmetic.jsonl"
    rows = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_trainer(tiny_dirs, dataset, checkpoint_dir, max_grad_norm, client=None, on_checkpoint=None):
    config = TrainConfig(lora=LORA, max_steps=3, batch_size=2, grad_accum=2, seq_len=32, learning_rate=2e-2,
                         max_grad_norm=max_grad_norm, checkpoint_every=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    data = prepare_training_data(tokenizer, load_dataset_file(dataset).examples, config)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    engine = (SplitEngine(model, config, client, secret=SECRET) if client
              else LocalEngine(model, config, SplitSpec(6, 2, 2), secret=SECRET))

    def after_step_one(event):
        if isinstance(event, CheckpointSaved) and event.step == 1:
            on_checkpoint(trainer)

    trainer = SplitTrainer(engine, config, data, tokenizer.pad_token_id, checkpoint_dir=checkpoint_dir,
                           callbacks=[after_step_one])
    return trainer


def client_state(trainer) -> dict[str, torch.Tensor]:
    """The client's LoRA weights and AdamW state, copied."""
    params = trainer.engine.params
    state = {name: p.detach().clone() for name, p in params.items()}
    state.update({k: v.clone() for k, v in adamw_state_tensors(trainer.optimizer, params, "optimizer.").items()})
    return state


def assert_identical(now: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    assert now.keys() == before.keys()
    changed = [key for key in now if not torch.equal(now[key], before[key])]
    assert not changed, changed


def trunk_tensors(exported: tuple[int, bytes]) -> dict[str, torch.Tensor]:
    """An ExportState reply as tensors (its bytes are not canonical: the metadata's order varies)."""
    step, data = exported
    return {"applied_step": torch.tensor(step), **load_safetensors(data)}


def poisoned(exported: bytes, step: int) -> bytes:
    """The trunk state with huge LoRA A and zero LoRA B: the same forward, overflowing LoRA B gradients."""
    state = trunk_state.unpack(exported)
    adapter = {key: torch.full_like(value, 1e36) if "lora_A" in key else torch.zeros_like(value)
               for key, value in state.adapter.items()}
    return trunk_state.pack(adapter, state.optimizer, step)


@CLIPPING
@pytest.mark.parametrize("split", [True, False], ids=["split", "local"])
def test_a_non_finite_client_gradient_stops_the_step_before_either_side_applies_it(tiny_dirs, dataset, trunk,
                                                                                  tmp_path, max_grad_norm, split):
    before = {}

    def poison_client(trainer):
        before["client"] = client_state(trainer)
        if split:
            before["trunk"] = trunk_tensors(trainer.engine.client.export_state())
        param = next(p for name, p in trainer.engine.params.items() if "lora_B" in name)
        param.register_hook(lambda grad: torch.full_like(grad, math.inf))

    with TrunkClient(trunk.address, trunk.token) as client:
        trainer = make_trainer(tiny_dirs, dataset, tmp_path, max_grad_norm, client if split else None, poison_client)
        where = rf" \(on the client's LoRA: the trunk's is {NORM}\)" if split else ""
        with pytest.raises(TrainingDiverged, match=(
                rf"^the gradient norm became inf at step 2{where}; nothing of this step was applied; lower the "
                r"learning rate or check the data; the checkpoint of step 1 is kept$")):
            trainer.run()
        assert trainer.step == 1
        assert_identical(client_state(trainer), before["client"])
        if split:
            assert_identical(trunk_tensors(client.export_state()), before["trunk"])  # no Step was sent


@CLIPPING
def test_a_non_finite_trunk_gradient_stops_the_step_and_the_trunk_refuses_to_apply_it(tiny_dirs, dataset, trunk,
                                                                                      tmp_path, max_grad_norm):
    before = {}

    def poison_trunk(trainer):
        client = trainer.engine.client
        client.import_state(1, poisoned(client.export_state()[1], 1))
        before["client"], before["trunk"] = client_state(trainer), trunk_tensors(client.export_state())
        send = client.backward

        def scaled_backward(step, micro_batch, grad_output, hidden, attention_mask):
            return send(step, micro_batch, grad_output * 1e9, hidden, attention_mask)

        client.backward = scaled_backward  # the network edge: a larger, still finite, gradient over the cut

    with TrunkClient(trunk.address, trunk.token) as client:
        trainer = make_trainer(tiny_dirs, dataset, tmp_path, max_grad_norm, client, poison_trunk)
        with pytest.raises(TrainingDiverged, match=(
                rf"^the gradient norm became (inf|nan) at step 2 \(on the trunk's LoRA: the client's is {NORM}\); "
                r"nothing of this step was applied; .* the checkpoint of step 1 is kept$")):
            trainer.run()
        assert_identical(client_state(trainer), before["client"])
        assert_identical(trunk_tensors(client.export_state()), before["trunk"])
        with pytest.raises(TrunkError) as refused:  # were the Step sent anyway, the trunk would refuse it
            client.step(2, 2e-2, 1.0)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "step 2 hold NaN or infinite values" in refused.value.details
        assert_identical(trunk_tensors(client.export_state()), before["trunk"])


def cut_inputs(seed=0, batch=2, seq=6):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, 64, generator=generator)
    grad = torch.randn(batch, seq, 64, generator=generator)
    return hidden, torch.ones(batch, seq, dtype=torch.long), grad


@pytest.mark.parametrize("clip_coef", [1.0, 0.5])
def test_the_trunk_refuses_a_step_with_non_finite_gradients_and_keeps_serving(trunk, clip_coef):
    hidden, mask, grad = cut_inputs()
    with TrunkClient(trunk.address, trunk.token) as client:
        client.open_session(LORA, seed=3)
        client.import_state(0, poisoned(client.export_state()[1], 0))
        before = trunk_tensors(client.export_state())
        client.forward(1, 0, hidden, mask)
        grad_input, trunk_sq = client.backward(1, 0, grad * 1e4, hidden, mask)
        # inf, or NaN where overflowing terms of both signs meet in a sum: either way not a number to step on.
        assert not math.isfinite(trunk_sq), "Backward reports the overflow instead of failing"
        assert bool(torch.isfinite(grad_input).all())
        for _ in range(2):  # a retried Step is refused alike: the gradients are still there
            with pytest.raises(TrunkError) as refused:
                client.step(1, 1e-3, clip_coef)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details.startswith("the LoRA gradients of step 1 hold NaN or infinite values")
            assert "nothing was applied: the adapter and its optimizer are as after step 0" in refused.value.details
        assert_identical(trunk_tensors(client.export_state()), before)
        assert client.evaluate(hidden, mask).shape == hidden.shape, "the session still serves"
        assert client.info().active_sessions >= 1

        with TrunkClient(trunk.address, trunk.token) as other:  # another session still trains
            other.open_session(LORA, seed=3)
            other.forward(1, 0, hidden, mask)
            _, other_sq = other.backward(1, 0, grad, hidden, mask)
            assert math.isfinite(other_sq) and other_sq > 0
            assert other.step(1, 1e-3, clip_coef) == 1
            assert other.export_state()[0] == 1
