"""Where the model is cut: a validated description of the three layer ranges."""

from __future__ import annotations

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
