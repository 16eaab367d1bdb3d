"""Adapter farm: one PEFT adapter per tenant on a shared base model, trained on Ray."""

__version__ = "0.1.0"
