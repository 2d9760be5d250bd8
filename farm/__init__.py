"""farm: a multi-tenant QLoRA adapter farm on Ray."""

__version__ = "0.1.0"
