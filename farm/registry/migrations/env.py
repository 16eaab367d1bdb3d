"""Alembic environment: runs on the connection ``farm.registry.catalog`` hands over."""

from alembic import context

from farm.registry.catalog import Base

connection = context.config.attributes["connection"]
# batch mode: SQLite cannot ALTER most things in place; Alembic copies the table instead
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
