"""Where the model runs during training: split over gRPC, or whole in this process.

Both engines expose the same small surface to the training loop: a differentiable
loss for a micro-batch, the parameters trained in this process, the remote part of
the gradient norm and of the optimizer step, the trunk's state for checkpoints, and
the adapter weights for export. The loop itself does not know which one it drives.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss

from splitcore.model.adapter_export import part_adapter_state
from splitcore.model.architectures import ArchitectureFamily, family_for
from splitcore.model.lora import add_lora, init_lora_weights, lora_config_for
from splitcore.model.part_loading import ModelParts, model_parts
from splitcore.model.parts import positions_from_mask
from splitcore.model.split_spec import SplitSpec
from splitcore.privacy import ChannelNoise, ClientSecret
from splitcore.privacy.distilled_bottom import (
    DISTILL_TRUNK_SEED,
    DistillConfig,
    DistillReport,
    FrozenTrunkSessions,
    distil_private_bottom,
)
from splitcore.privacy.nopeek import nopeek_penalty
from splitcore.privacy.private_bottom import randomise_lora
from splitcore.remote import state as trunk_state
from splitcore.remote.chain import join_states, naming_link, plan_links, split_state
from splitcore.remote.client import TrunkClient, TrunkError
from splitcore.remote.trunk import RemoteTrunk, SessionNeeds, TrunkLink, check_budgets, check_trunk_serves
from splitcore.training.batches import Batch
from splitcore.training.config import TrainConfig

log = logging.getLogger(__name__)
# What a link after the first of a chain draws its dropout masks from (with the run seed and its first block).
LINK_DROPOUT_SEED = "trunk-link-dropout"


class Engine(ABC):
    """One run's model; ``params`` are the LoRA weights this process trains."""

    family: ArchitectureFamily
    params: dict[str, torch.nn.Parameter]
    device: torch.device = torch.device("cpu")  # where this process's parts compute

    @abstractmethod
    def loss(self, batch: Batch, step: int, micro_batch: int, num_items_in_batch: int) -> torch.Tensor:
        """Training loss of a micro-batch: token losses summed and divided by the step's labelled tokens."""

    @abstractmethod
    def eval_loss_sum(self, batch: Batch, index: int, step: int) -> float:
        """Sum of the token losses of the ``index``-th validation batch, without gradient and with dropout off,
        in the evaluation after training step ``step``."""

    @abstractmethod
    def train(self, mode: bool) -> None: ...

    def remote_grad_sq_norm(self) -> float:
        return 0.0

    def remote_step(self, step: int, lr: float, clip_coef: float) -> None:
        """Apply the optimizer step of the parameters trained elsewhere."""

    def remote_state(self) -> bytes | None:
        return None

    def restore_remote_state(self, step: int, data: bytes | None) -> None:
        if data:
            raise ValueError("the checkpoint holds trunk state, but this run has no remote trunk")

    @abstractmethod
    def adapter_states(self) -> list[dict[str, torch.Tensor]]:
        """LoRA weights under full-model PEFT keys, for ``export_adapter``."""

    def wire_bytes(self) -> int:
        return 0

    def resume_key(self) -> dict:
        """What a resumed run must share with the checkpoint besides the TrainConfig."""
        return {}

    def check_fresh_start(self) -> None:
        """ValueError when a run cannot take its first step on this engine as its settings ask."""

    def close(self) -> None:
        pass


def _freeze(model: torch.nn.Module) -> None:
    model.requires_grad_(False)


class LocalEngine(Engine):
    """The unsplit model with one monolithic peft adapter: the baseline.

    Without trunk LoRA, the adapter covers only the Bottom and Top layers of ``spec``,
    as a split run with a frozen trunk would train. With ``secret`` (and ``spec``), the
    LoRA of the trunk's blocks starts from the seed a split run sends its trunk, so the two
    runs start identical. Noise on the cut needs a cut: a local run refuses it.
    """

    def __init__(self, model: PreTrainedModel | ModelParts, config: TrainConfig, spec: SplitSpec | None = None,
                 secret: ClientSecret | None = None, device: str | torch.device = "cpu") -> None:
        if config.privacy.needs_cut:
            raise ValueError("noise, NoPeek and a private Bottom act where the model is cut; "
                             "a local run has no cut, so run it split over a trunk")
        model = model_parts(model).full_model()  # the one run that needs every block here
        _freeze(model)
        self.device = torch.device(device)
        model.to(self.device)
        self.family = family_for(model.config)
        self.vocab_size = model.config.vocab_size
        trained = None  # every block
        if not config.train_trunk_lora:
            if spec is None:
                raise ValueError("a local run without trunk LoRA needs the split (bottom and top layers)")
            trained = set(spec.top_layers)
            if config.privacy.gradients_to_trunk:  # else the Bottom stays as it starts, as in a split run
                trained |= set(spec.bottom_layers)
        self.model: PeftModel = get_peft_model(model, lora_config_for(model, self.family, config.lora, trained))
        init_lora_weights(self.model, config.seed)
        self.secret = secret
        if secret is not None and spec is not None and config.train_trunk_lora:
            marker = f".{self.family.layers_attr}."
            trunk_layers = {f"{marker}{i}." for i in spec.trunk_layers}
            init_lora_weights(self.model, secret.trunk_seed(config.seed),
                              include=lambda name: any(layer in name for layer in trunk_layers))
        self.params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _logits(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.device)
        positions = positions_from_mask(batch.attention_mask, batch.input_ids.shape[1])
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=positions).logits  # (batch, seq, vocab)

    def loss(self, batch, step, micro_batch, num_items_in_batch):
        return ForCausalLMLoss(self._logits(batch), batch.labels.to(self.device), vocab_size=self.vocab_size,
                               num_items_in_batch=num_items_in_batch)

    @torch.no_grad()
    def eval_loss_sum(self, batch, index, step):
        return float(ForCausalLMLoss(self._logits(batch), batch.labels.to(self.device), vocab_size=self.vocab_size,
                                     num_items_in_batch=1))

    def train(self, mode):
        self.model.train(mode)

    def resume_key(self):
        return {} if self.secret is None else self.secret.resume_record()

    def adapter_states(self):
        return [part_adapter_state(self.model)]


class SplitEngine(Engine):
    """Bottom and Top here with their peft LoRA; the Trunk behind a gRPC session, or behind a chain of
    trunks (one session per link, each with its own LoRA on its own blocks).

    The cut is the run's choice (``config.privacy``), within the trunks' bounds. The trunk is
    never sent the run's seed: its LoRA initialisation and dropout masks come from a seed
    derived with ``secret``, a key that stays here (a fresh one when None; pass the same key
    to resume a run). Noise on the hidden states sent and the gradients sent back is drawn
    from that key too.

    ``client``: one ``TrunkClient``, or one per link of a chain, in block order. Forward goes
    through the links in order and Backward in reverse; a step is applied on every link.

    ``tokenizer``: the model's tokenizer, for a fresh run that distils its private Bottom
    (``privacy.distill_bottom``): the Bottom is distilled on public text before the training
    sessions open (``distillation`` holds the report). Leave it None to resume such a run: the
    checkpoint holds the distilled Bottom.
    """

    def __init__(self, model: PreTrainedModel | ModelParts, config: TrainConfig,
                 client: TrunkClient | Sequence[TrunkClient], label: str = "", secret: ClientSecret | None = None,
                 device: str | torch.device = "cpu", tokenizer=None) -> None:
        parts = model_parts(model)
        clients = [client] if isinstance(client, TrunkClient) else list(client)
        self.device = torch.device(device)
        self.family = parts.family
        self.secret = secret if secret is not None else ClientSecret.generate()
        plan, infos = plan_links(clients, parts.config, self.family, config.privacy.bottom_layers,
                                 config.privacy.top_layers)
        needs = SessionNeeds.of(config)
        for index, (link_client, info) in enumerate(zip(clients, infos, strict=True)):
            with naming_link(index, link_client, len(clients)):
                check_budgets(info, needs)
        spec = plan.spec
        bottom, top = parts.client_parts(spec)  # the trunk's blocks stay on the trunk servers
        for part in (bottom, top):
            _freeze(part)
        bottom.to(self.device)
        top.to(self.device)
        self.spec = spec
        self.noise = ChannelNoise(self.secret, config.seed, config.privacy.hidden_noise, config.privacy.grad_noise)
        self.nopeek = config.privacy.nopeek
        self._bottom_part = bottom
        self.bottom = add_lora(bottom, self.family, config.lora, seed=config.seed)
        randomise_lora(self.bottom, self.secret, config.seed, config.privacy.private_bottom)
        if not config.privacy.gradients_to_trunk:
            # No gradient crosses the cut, so nothing before it learns: the trunk never gets a Backward.
            self.bottom.requires_grad_(False)
        self.top = add_lora(top, self.family, config.lora, seed=config.seed)
        self.params = {}
        for part in (self.bottom, self.top):
            self.params.update({name: p for name, p in part.named_parameters() if p.requires_grad})
        self.trains_trunk = config.train_trunk_lora
        self.links: list[TrunkLink] = []
        self._distils = bool(config.privacy.distill_bottom)
        self.distillation: DistillReport | None = None
        if self._distils and tokenizer is not None:
            self.distillation = self._distil(parts, config, clients, plan.layers, label, tokenizer)
        try:
            for index, (link_client, layers) in enumerate(zip(clients, plan.layers, strict=True)):
                self.links.append(self._open_link(parts, config, label, index, link_client, layers, len(clients)))
        except BaseException:
            self.close()
            raise
        self.client = clients[0]  # the first link: it receives the Bottom's output
        self.session_lease_s = min(link.lease_s for link in self.links)

    def _open_link(self, parts: ModelParts, config: TrainConfig, label: str, index: int, client: TrunkClient,
                   layers: range, links: int) -> TrunkLink:
        """Open one link's session on its blocks and check it holds this model's weights for them.

        Every link's adapter starts from the run's trunk seed (drawn per module path, so a chain starts
        like one trunk); dropout masks differ per link (a link after the first draws them from a seed of
        its own first block)."""
        trunk_seed = self.secret.trunk_seed(config.seed)
        dropout = trunk_seed if index == 0 else self.secret.derive(LINK_DROPOUT_SEED, config.seed, layers.start)
        reply = client.open_session(config.lora if config.train_trunk_lora else None, seed=trunk_seed,
                                    optimizer=config.optimizer, label=label, layers=layers, dropout_seed=dropout)
        try:
            self._check_link(parts, index, client, layers, links, reply)
        except ValueError:
            client.close_session_quietly()
            raise
        return TrunkLink(client, layers=layers, lease_s=float(reply.info.session_ttl_s))

    def _check_link(self, parts: ModelParts, index: int, client: TrunkClient, layers: range, links: int,
                    reply) -> None:
        """ValueError unless a session's trunk holds this model's weights for its blocks ``layers``."""
        with naming_link(index, client, links):
            check_trunk_serves(reply.info, parts.config, self.family,
                               trunk_fingerprint=parts.trunk_fingerprint(layers))

    def _distil(self, parts: ModelParts, config: TrainConfig, clients: list[TrunkClient], layers: Sequence[range],
                label: str, tokenizer) -> DistillReport:
        """Distil the private Bottom on public text through sessions without LoRA, opened and closed here,
        before the training sessions open (``splitcore.privacy.distilled_bottom``)."""
        what = "distilling the private Bottom"

        def check(index: int, client: TrunkClient, reply) -> None:
            self._check_link(parts, index, client, layers[index], len(clients), reply)

        frozen = FrozenTrunkSessions(clients, layers, label=f"{label}: {what}" if label else what,
                                     seed=self.secret.derive(DISTILL_TRUNK_SEED, config.seed), check=check)
        distill = DistillConfig.for_run(config.privacy.distill_bottom, config.batch_size, config.seq_len)
        embeddings = self._bottom_part.backbone.get_submodule(self.family.embedding_attrs[0]).weight
        return distil_private_bottom(self.bottom, self.top, frozen, tokenizer, distill, self.secret, config.seed,
                                     embeddings)

    def loss(self, batch, step, micro_batch, num_items_in_batch):
        batch = batch.to(self.device)
        mask = batch.attention_mask
        bottom_out = self.bottom(batch.input_ids, mask)  # (batch, seq, hidden)
        hidden = self.noise.on_hidden(bottom_out, mask, step, micro_batch)  # what the trunk receives
        for link in self.links:  # Backward comes back through them in reverse
            hidden = RemoteTrunk.apply(hidden, mask, link, step, micro_batch)  # (batch, seq, hidden)
        hidden = self.noise.on_gradient(hidden, mask, step, micro_batch)  # blurs the gradient sent back
        loss = self.top(hidden, mask, labels=batch.labels, num_items_in_batch=num_items_in_batch).loss
        if self.nopeek > 0:
            with torch.no_grad():
                embeddings = self._bottom_part.embed(batch.input_ids, mask)  # (batch, seq, hidden)
            share = batch.num_trained_tokens / max(1, int(num_items_in_batch))  # this micro-batch's part of the step
            penalty = self.nopeek * share * nopeek_penalty(embeddings, bottom_out, mask)
            # The penalty trains the Bottom but is not part of the reported loss: its value cancels, its gradient stays.
            loss = loss + (penalty - penalty.detach())
        return loss

    @torch.no_grad()
    def eval_loss_sum(self, batch, index, step):
        batch = batch.to(self.device)
        mask = batch.attention_mask
        # Validation batches cross the cut too, blurred with a draw of their own for each evaluation.
        hidden = self.noise.on_eval_hidden(self.bottom(batch.input_ids, mask), mask, step, index)
        for link in self.links:
            hidden = link.client.evaluate(hidden, mask)
        return float(self.top(hidden, mask, labels=batch.labels, num_items_in_batch=1).loss)

    def train(self, mode):
        self.bottom.train(mode)
        self.top.train(mode)

    def remote_grad_sq_norm(self):
        return sum(link.grad_sq_norm for link in self.links)

    @contextlib.contextmanager
    def session_kept_alive(self, every_s: float | None = None):
        """Renew the trunk session's lease while this process works on its own (a leakage audit, for
        instance), so the trunk does not close the idle session meanwhile: every ``every_s`` seconds
        (default: a third of the lease the trunk announced)."""
        if every_s is None:
            every_s = max(1.0, (self.session_lease_s or 90.0) / 3)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(every_s):
                try:
                    for link in self.links:
                        link.client.keep_alive()
                except TrunkError as error:  # the next training call meets the same fault and handles it
                    log.warning("could not renew the trunk session on %s: %s", error.trunk, error)
                    return

        thread = threading.Thread(target=renew, name="trunk-session-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def remote_step(self, step, lr, clip_coef):
        # Each link applies a step once (a retried Step changes nothing), so a step lost half-way through the
        # links is retried on all of them from the last checkpoint, like a lost trunk.
        for link in self.links:
            link.client.step(step, lr, clip_coef)
            link.grad_sq_norm = 0.0

    def remote_state(self):
        if not self.trains_trunk:
            return None
        return join_states([link.client.export_state()[1] for link in self.links])

    def restore_remote_state(self, step, data):
        if bool(data) != self.trains_trunk:
            raise ValueError("the checkpoint and this run disagree on whether the trunk has LoRA")
        if not data:
            for link in self.links:
                link.client.import_state(step, b"")
            return
        marker = f".{self.family.layers_attr}."
        for link, part in zip(self.links, split_state(data, [link.layers for link in self.links], marker),
                              strict=True):
            link.client.import_state(step, part)

    def adapter_states(self):
        states = [part_adapter_state(self.bottom), part_adapter_state(self.top)]
        if self.trains_trunk:
            states.extend(trunk_state.adapter_weights(link.client.export_state()[1]) for link in self.links)
        return states

    def wire_bytes(self):
        return sum(self.wire_bytes_by_link())

    def wire_bytes_by_link(self) -> list[int]:
        """Bytes sent to and received from each link so far, in chain order."""
        return [link.client.bytes_sent + link.client.bytes_received for link in self.links]

    def resume_key(self):
        return self.secret.resume_record()

    def check_fresh_start(self):
        if self._distils and self.distillation is None:
            raise ValueError("this run distils its private Bottom (distill_bottom) before its first step, but its "
                             "engine was opened without the tokenizer the public text needs: pass tokenizer= to "
                             "SplitEngine (a resumed run needs none: its checkpoint holds the distilled Bottom)")

    def close(self):
        for link in self.links:
            link.client.close_session_quietly()
