"""Run lengths a new user picks from instead of tuning: how many passes and at what learning rate.

A preset sets the epochs and the learning rate of a job (and clears max steps); "custom"
keeps what the form's Advanced group says. The default, "balanced", is the one the README's
walkthrough uses: on the demo dataset its adapter visibly answers in the dataset's style.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

CUSTOM = "custom"


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    epochs: float
    learning_rate: float
    description: str

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = (
    Preset("quick", "Quick look", 2.0, 5e-4, "2 passes over the data: a first look at whether the loss moves"),
    Preset("balanced", "Balanced", 3.0, 5e-4, "3 passes: enough for a small dataset's style to show in the answers"),
    Preset("thorough", "Thorough", 5.0, 3e-4, "5 passes at a gentler rate: for more data, or a closer fit"),
)
DEFAULT_PRESET = "balanced"
BY_KEY = {preset.key: preset for preset in PRESETS}


def choices() -> list[tuple[str, str]]:
    return [(p.key, f"{p.label}: {p.epochs:g} epochs, learning rate {p.learning_rate:g}") for p in PRESETS] + [
        (CUSTOM, "Custom: the epochs, steps and learning rate under Advanced")]
