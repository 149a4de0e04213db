"""splitcore: split a causal LM into Bottom / Trunk / Top and fine-tune it with peft LoRA.

No Django here; the trunk server and the web app build on this package.
"""

from splitcore.model.adapter_export import export_adapter, export_parts_adapter, part_adapter_state
from splitcore.model.architectures import FAMILIES, ArchitectureFamily, family_for
from splitcore.model.lora import LoraSettings, add_lora, init_lora_weights
from splitcore.model.parts import Bottom, Top, Trunk, positions_from_mask, split_model
from splitcore.model.split_spec import SplitSpec

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "ArchitectureFamily",
    "Bottom",
    "LoraSettings",
    "SplitSpec",
    "Top",
    "Trunk",
    "add_lora",
    "export_adapter",
    "export_parts_adapter",
    "family_for",
    "init_lora_weights",
    "part_adapter_state",
    "positions_from_mask",
    "split_model",
]
