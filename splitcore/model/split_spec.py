"""Where the model is cut: a validated description of the three layer ranges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SplitSpec:
    """Cut a model of ``num_layers`` decoder blocks into Bottom / Trunk / Top.

    Bottom holds blocks ``[0, n_bottom)``, Top holds the last ``n_top`` blocks and the
    Trunk everything between. Each part needs at least one block: a Bottom without
    blocks would send raw token embeddings to the trunk, a Top without blocks would
    let the trunk's output map straight onto the labels.
    """

    num_layers: int
    n_bottom: int
    n_top: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "n_bottom", "n_top"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.num_layers < 3:
            raise ValueError(
                f"the model has {self.num_layers} decoder layers; splitting into Bottom, Trunk and Top "
                "needs at least 3 (one per part)"
            )
        if self.n_bottom < 1:
            raise ValueError(f"n_bottom must be at least 1 (got {self.n_bottom}): Bottom needs one decoder layer")
        if self.n_top < 1:
            raise ValueError(f"n_top must be at least 1 (got {self.n_top}): Top needs one decoder layer")
        max_client_layers = self.num_layers - 1
        if self.n_bottom + self.n_top > max_client_layers:
            raise ValueError(
                f"n_bottom + n_top = {self.n_bottom} + {self.n_top} = {self.n_bottom + self.n_top} leaves no layer "
                f"for the Trunk: the model has {self.num_layers} decoder layers, so n_bottom + n_top must be "
                f"at most {max_client_layers}"
            )

    @property
    def bottom_layers(self) -> range:
        return range(0, self.n_bottom)

    @property
    def trunk_layers(self) -> range:
        return range(self.n_bottom, self.num_layers - self.n_top)

    @property
    def top_layers(self) -> range:
        return range(self.num_layers - self.n_top, self.num_layers)


@dataclass(frozen=True)
class CutBounds:
    """The cuts a trunk allows: its ``default`` trunk range, and any non-empty range of trunk
    blocks within ``[lowest, highest)`` (so at least ``lowest`` blocks stay with the client
    before the trunk and ``num_layers - highest`` after it).

    The trunk server, its clients and the web app's trunk records all judge a cut with it.
    """

    num_layers: int
    default: range
    lowest: int
    highest: int

    def split(self, n_bottom: int | None = None, n_top: int | None = None) -> SplitSpec:
        """The cut keeping ``n_bottom``/``n_top`` blocks on the client (None: the default's on that side);
        ValueError (from SplitSpec) when it leaves a part without a block."""
        return SplitSpec(num_layers=self.num_layers,
                         n_bottom=self.default.start if n_bottom is None else n_bottom,
                         n_top=self.num_layers - self.default.stop if n_top is None else n_top)

    def allows(self, layers: range) -> bool:
        """Whether a session may run the trunk blocks ``layers``."""
        return self.lowest <= layers.start < layers.stop <= self.highest


@dataclass(frozen=True)
class ChainPlan:
    """A cut and the trunk blocks each link of a chain of trunks runs, in order: contiguous, end to
    end, together exactly the cut's trunk blocks."""

    spec: SplitSpec
    layers: tuple[range, ...]

    @property
    def links(self) -> int:
        return len(self.layers)


def blocks_words(layers: range) -> str:
    """"block 3" or "blocks 1-2": a range of decoder blocks as errors, pages and logs write it."""
    return f"block {layers.start}" if len(layers) == 1 else f"blocks {layers.start}-{layers.stop - 1}"


def plan_chain(bounds: Sequence[CutBounds], n_bottom: int | None = None, n_top: int | None = None,
               names: Sequence[str] | None = None) -> ChainPlan:
    """The cut (``n_bottom``/``n_top``; None: the first link's default before the trunk, the last link's
    after it) and each link's blocks: the part of the cut's trunk blocks its server allows.

    ValueError, naming the links and blocks, when the links are of models with different depths, when
    a link has none of the cut's blocks, when two links meet with a gap or an overlap between them, or
    when the cut's trunk blocks begin before the first link or end after the last one.
    """
    if not bounds:
        raise ValueError("a chain needs at least one trunk")
    names = list(names) if names is not None else [f"link {i + 1}" for i in range(len(bounds))]
    if len(names) != len(bounds):
        raise ValueError(f"{len(names)} names for {len(bounds)} links")
    depths = {b.num_layers for b in bounds}
    if len(depths) > 1:
        found = ", ".join(f"{name}: {b.num_layers} blocks" for name, b in zip(names, bounds, strict=True))
        raise ValueError(f"the links serve models of different depths ({found}); every link must serve the same "
                         "base model")
    first, last = bounds[0], bounds[-1]
    spec = SplitSpec(num_layers=first.num_layers,
                     n_bottom=first.default.start if n_bottom is None else n_bottom,
                     n_top=first.num_layers - last.default.stop if n_top is None else n_top)
    cut = spec.trunk_layers
    served = ", ".join(f"{name} {blocks_words(range(b.lowest, b.highest))}" for name, b in zip(names, bounds, strict=True))
    if len(bounds) == 1:
        if not first.allows(cut):
            raise ValueError(f"{names[0]} serves {blocks_words(range(first.lowest, first.highest))} of "
                             f"{first.num_layers}; this run sends it {blocks_words(cut)} (keeping {spec.n_bottom} "
                             f"before and {spec.n_top} after)")
        return ChainPlan(spec, (cut,))
    layers = []
    position = cut.start
    for index, (name, link) in enumerate(zip(names, bounds, strict=True)):
        own = range(max(link.lowest, cut.start), min(link.highest, cut.stop))
        if len(own) == 0:
            raise ValueError(f"{name} serves {blocks_words(range(link.lowest, link.highest))}, none of the trunk's "
                             f"{blocks_words(cut)} of this cut (the chain: {served})")
        if own.start > position:
            after = f"after {names[index - 1]}" if index else "before the first link"
            raise ValueError(f"a gap in the chain: no link serves {blocks_words(range(position, own.start))} {after} "
                             f"(the chain: {served}; the cut sends the trunk {blocks_words(cut)})")
        if own.start < position:
            raise ValueError(f"an overlap in the chain: {names[index - 1]} and {name} both serve "
                             f"{blocks_words(range(own.start, position))} (the chain: {served}); each block runs on one "
                             "link")
        layers.append(own)
        position = own.stop
    if position < cut.stop:
        raise ValueError(f"a gap in the chain: no link serves {blocks_words(range(position, cut.stop))} after {names[-1]} "
                         f"(the chain: {served}; the cut sends the trunk {blocks_words(cut)}; keep them on this "
                         f"machine with {spec.num_layers - position} blocks after the trunk, or add a link)")
    return ChainPlan(spec, tuple(layers))
