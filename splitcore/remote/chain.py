"""A chain of trunks: the trunk's blocks spread over several servers, each running a contiguous range.

The client plans the chain from each server's ``Info`` before any session opens (every link must
serve this base model, and the links must meet end to end: see ``plan_chain``), sends Forward
through the links in order and Backward in reverse, and keeps one session per link, with its
own LoRA on its own blocks. A one-link chain is a plain trunk.

A run's trunk state (for checkpoints) is the union of its links' states: every entry is named
by its full-model key, so it splits back by block. A checkpoint of a chain therefore resumes on
any chain with the same cut, a single trunk included, and the other way round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from transformers import PretrainedConfig

from splitcore.model.architectures import ArchitectureFamily
from splitcore.model.split_spec import ChainPlan, plan_chain
from splitcore.remote import state as trunk_state
from splitcore.remote.client import TrunkClient
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.trunk import check_trunk_serves, choose_split, cut_bounds


def plan_links(clients: Sequence[TrunkClient], config: PretrainedConfig, family: ArchitectureFamily,
               n_bottom: int | None = None, n_top: int | None = None) -> tuple[ChainPlan, list[pb.InfoResponse]]:
    """Ask every link for its Info and plan the chain; ValueError (no session opened) when a link serves
    another model or the links do not meet end to end around the cut."""
    infos = [client.info() for client in clients]
    for index, (client, info) in enumerate(zip(clients, infos, strict=True)):
        with naming_link(index, client, len(clients)):
            check_trunk_serves(info, config, family)
    if len(clients) == 1:  # a plain trunk: its operator's bounds, in its own words
        spec = choose_split(infos[0], n_bottom, n_top)
        return ChainPlan(spec, (spec.trunk_layers,)), infos
    names = [link_name(index, client, len(clients)) for index, client in enumerate(clients)]
    return plan_chain([cut_bounds(info) for info in infos], n_bottom, n_top, names), infos


def link_name(index: int, client: TrunkClient, links: int) -> str:
    """How errors and logs name a link: "the trunk ADDRESS" alone, "link 2 (ADDRESS)" in a chain."""
    return f"the trunk {client.name}" if links == 1 else f"link {index + 1} ({client.name})"


@contextlib.contextmanager
def naming_link(index: int, client: TrunkClient, links: int):
    """A ValueError raised inside names the link of the chain it concerns (a plain trunk's stays as it is)."""
    try:
        yield
    except ValueError as exc:
        if links == 1:
            raise
        raise ValueError(f"{link_name(index, client, links)}: {exc}") from None


def layer_of(key: str, layers_marker: str) -> int | None:
    """The block index in a full-model key (``.layers.`` is ``layers_marker`` for Llama), None when it has none."""
    _, found, tail = key.partition(layers_marker)
    if not found:
        return None
    index = tail.split(".", 1)[0]
    return int(index) if index.isdigit() else None


def join_states(states: Sequence[bytes | None]) -> bytes | None:
    """The links' exported states as one trunk state (None when no link has one; a plain trunk's as it is)."""
    present = [data for data in states if data]
    if not present:
        return None
    if len(states) == 1:
        return states[0]
    adapter, optimizer = {}, {}
    for part in map(trunk_state.unpack, present):
        adapter.update(part.adapter)
        optimizer.update(part.optimizer)
    return trunk_state.pack(adapter, optimizer)


def split_state(data: bytes, layers: Sequence[range], layers_marker: str) -> list[bytes]:
    """A trunk state cut into one state per link, by the block each entry belongs to; ValueError when an
    entry belongs to no link's blocks."""
    state = trunk_state.unpack(data)
    adapters: list[dict] = [{} for _ in layers]
    optimizers: list[dict] = [{} for _ in layers]
    for entries, per_link in ((state.adapter, adapters), (state.optimizer, optimizers)):
        for key, value in entries.items():
            block = layer_of(key, layers_marker)
            index = next((i for i, own in enumerate(layers) if block in own), None)
            if index is None:
                where = "no block" if block is None else f"block {block}"
                served = ", ".join(f"{r.start}-{r.stop - 1}" for r in layers)
                raise ValueError(f"the trunk state holds {key!r}, of {where}, which no link of this run runs "
                                 f"(the links run blocks {served}); resume with the cut the state was saved at")
            per_link[index][key] = value
    return [trunk_state.pack(adapter, optimizer) for adapter, optimizer in zip(adapters, optimizers, strict=True)]
