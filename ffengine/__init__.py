"""ffengine: trace backdoors in vision foundation models back to their poisoned
pre-training inputs (the FoundationForensics method)."""

__version__ = "0.1.0"
