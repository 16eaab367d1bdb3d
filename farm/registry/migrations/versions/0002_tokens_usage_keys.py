"""Token expiry, metered usage, publish idempotency keys, 64-bit version sizes.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _new_tables(metadata: sa.MetaData) -> list[sa.Table]:
    tz = sa.DateTime(timezone=True)
    usage = sa.Table(
        "usage", metadata, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant", sa.String(63), index=True, nullable=False), sa.Column("model", sa.String(200), nullable=False),
        sa.Column("base_model", sa.String(500), nullable=False), sa.Column("hour", tz, index=True, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False), sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False), sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("tenant", "model", "base_model", "hour"))
    keys = sa.Table(
        "publish_keys", metadata, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key_hash", sa.String(64), unique=True, index=True, nullable=False), sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("adapter", sa.String(63), nullable=False), sa.Column("number", sa.Integer, nullable=False), sa.Column("created_at", tz, nullable=False))
    return [usage, keys]


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    if op.get_bind().dialect.name != "sqlite":  # SQLite's INTEGER already holds 64 bits
        with op.batch_alter_table("versions") as batch:
            batch.alter_column("size_bytes", type_=sa.BigInteger(), existing_type=sa.Integer())
    metadata = sa.MetaData()
    metadata.create_all(op.get_bind(), tables=_new_tables(metadata))


def downgrade() -> None:
    metadata = sa.MetaData()
    metadata.drop_all(op.get_bind(), tables=_new_tables(metadata))
    if op.get_bind().dialect.name != "sqlite":
        with op.batch_alter_table("versions") as batch:
            batch.alter_column("size_bytes", type_=sa.Integer(), existing_type=sa.BigInteger())
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("expires_at")
