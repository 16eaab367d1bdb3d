"""The catalog as releases before migrations made it (frozen: never edit).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tables(metadata: sa.MetaData) -> None:
    tz = sa.DateTime(timezone=True)
    sa.Table("tenants", metadata, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("name", sa.String(63), unique=True, index=True, nullable=False), sa.Column("created_at", tz, nullable=False))
    sa.Table("adapters", metadata, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("tenant_id", sa.ForeignKey("tenants.id"), index=True, nullable=False), sa.Column("name", sa.String(63), nullable=False),
             sa.Column("created_at", tz, nullable=False), sa.UniqueConstraint("tenant_id", "name"))
    sa.Table("version_numbers", metadata, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("adapter_id", sa.ForeignKey("adapters.id"), index=True, nullable=False), sa.Column("number", sa.Integer, nullable=False),
             sa.UniqueConstraint("adapter_id", "number"))
    sa.Table("versions", metadata, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("adapter_id", sa.ForeignKey("adapters.id"), index=True, nullable=False), sa.Column("number", sa.Integer, nullable=False),
             sa.Column("serve_name", sa.String(200), unique=True, index=True, nullable=False),
             sa.Column("base_model", sa.String(500), index=True, nullable=False), sa.Column("method", sa.String(32), index=True, nullable=False),
             sa.Column("rank", sa.Integer, nullable=True), sa.Column("servable_by_vllm", sa.Boolean, index=True, nullable=False),
             sa.Column("not_servable_reason", sa.Text, nullable=True),
             sa.Column("sweep_id", sa.String(200), nullable=True, index=True),
             sa.Column("dataset_fingerprint", sa.String(64), nullable=True), sa.Column("size_bytes", sa.Integer, nullable=False),
             sa.Column("status", sa.String(16), index=True, nullable=False), sa.Column("created_at", tz, index=True, nullable=False),
             sa.Column("manifest", sa.JSON, nullable=False), sa.UniqueConstraint("adapter_id", "number"))
    sa.Table("version_metrics", metadata, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("version_id", sa.ForeignKey("versions.id", ondelete="CASCADE"), index=True, nullable=False),
             sa.Column("name", sa.String(100), index=True, nullable=False), sa.Column("value", sa.Float, nullable=False),
             sa.UniqueConstraint("version_id", "name"),
             sa.Index("ix_version_metrics_name_value", "name", "value", "version_id"))
    sa.Table("aliases", metadata, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("adapter_id", sa.ForeignKey("adapters.id"), index=True, nullable=False), sa.Column("name", sa.String(63), nullable=False),
             sa.Column("version_id", sa.ForeignKey("versions.id"), index=True, nullable=False), sa.Column("updated_at", tz, nullable=False),
             sa.UniqueConstraint("adapter_id", "name"))
    sa.Table("api_tokens", metadata, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("token_hash", sa.String(64), unique=True, index=True, nullable=False),
             sa.Column("tenant", sa.String(63), nullable=True), sa.Column("label", sa.String(200), nullable=False),
             sa.Column("created_at", tz, nullable=False), sa.Column("revoked", sa.Boolean, nullable=False))


def upgrade() -> None:
    metadata = sa.MetaData()
    _tables(metadata)
    metadata.create_all(op.get_bind())


def downgrade() -> None:
    metadata = sa.MetaData()
    _tables(metadata)
    metadata.drop_all(op.get_bind())
