"""The fine-tuning service's records: files, jobs, their events and checkpoints; trained tokens
in the metered usage.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _new_tables(metadata: sa.MetaData) -> list[sa.Table]:
    tz = sa.DateTime(timezone=True)
    files = sa.Table(
        "files", metadata, sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(63), index=True, nullable=False), sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False), sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False), sa.Column("records", sa.Integer, nullable=False),
        sa.Column("format", sa.String(32), nullable=False), sa.Column("store_path", sa.String(500), nullable=False),
        sa.Column("status", sa.String(16), nullable=False), sa.Column("created_at", tz, index=True, nullable=False))
    jobs = sa.Table(
        "fine_tuning_jobs", metadata, sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(63), index=True, nullable=False), sa.Column("model", sa.String(200), nullable=False),
        sa.Column("base_model", sa.String(500), index=True, nullable=False),
        sa.Column("training_file", sa.String(40), nullable=False), sa.Column("validation_file", sa.String(40)),
        sa.Column("request", sa.JSON, nullable=False), sa.Column("job", sa.JSON),
        sa.Column("status", sa.String(20), index=True, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False), sa.Column("fine_tuned_model", sa.String(200)),
        sa.Column("error", sa.JSON), sa.Column("trained_tokens", sa.BigInteger),
        sa.Column("created_at", tz, index=True, nullable=False), sa.Column("started_at", tz),
        sa.Column("finished_at", tz), sa.Column("estimated_finish", tz))
    events = sa.Table(
        "fine_tuning_events", metadata, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True, nullable=False),
        sa.Column("created_at", tz, nullable=False), sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(8), nullable=False), sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.JSON))
    checkpoints = sa.Table(
        "fine_tuning_checkpoints", metadata, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True, nullable=False),
        sa.Column("step", sa.Integer, nullable=False), sa.Column("model", sa.String(200), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False), sa.Column("created_at", tz, nullable=False),
        sa.UniqueConstraint("job_id", "step"))
    return [files, jobs, events, checkpoints]


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("trained_tokens", sa.BigInteger, nullable=False, server_default="0"))
    metadata = sa.MetaData()
    metadata.create_all(op.get_bind(), tables=_new_tables(metadata))


def downgrade() -> None:
    metadata = sa.MetaData()
    metadata.drop_all(op.get_bind(), tables=_new_tables(metadata))
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("trained_tokens")
