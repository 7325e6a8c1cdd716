"""pool states and limit overrides

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from alembic import op
import sqlalchemy as sa


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "limit_overrides",
        sa.Column("scope", sa.String(length=80), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("limits", sa.JSON(), nullable=False),
        sa.Column("changed_by", sa.String(length=64), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", name=op.f("pk_limit_overrides")),
    )
    with op.batch_alter_table("limit_overrides", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_limit_overrides_org_id"), ["org_id"], unique=False)

    op.create_table(
        "pool_states",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("changed_by", sa.String(length=64), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_pool_states")),
    )


def downgrade() -> None:
    op.drop_table("pool_states")
    with op.batch_alter_table("limit_overrides", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_limit_overrides_org_id"))

    op.drop_table("limit_overrides")
