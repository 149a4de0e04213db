"""The model side: architecture families, the Bottom/Trunk/Top parts, LoRA through peft,
the split specification, weight fingerprints, dropout seeds, tiny and default models, and
the export of one ordinary adapter."""
