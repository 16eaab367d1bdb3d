"""Alembic migrations of the registry catalog (``farm registry migrate`` applies them).

``versions/0001`` is the schema of the releases before migrations existed, frozen; each later
revision changes it step by step. ``farm.registry.catalog`` creates a new catalog at the head
revision directly and refuses to open one that is behind, naming the command that upgrades it.
"""
