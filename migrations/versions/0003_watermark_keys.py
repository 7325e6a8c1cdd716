"""watermark keys and exemptions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "watermark_exemptions",
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_keys.id"],
            name=op.f("fk_watermark_exemptions_api_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("api_key_id", name=op.f("pk_watermark_exemptions")),
    )
    op.create_table(
        "watermark_keys",
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=True),
        sa.Column("scheme", sa.String(length=16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("key_encrypted", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["org_id"], ["organizations.id"], name=op.f("fk_watermark_keys_org_id_organizations")),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_watermark_keys")),
    )
    with op.batch_alter_table("watermark_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_watermark_keys_org_id"), ["org_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("watermark_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_watermark_keys_org_id"))

    op.drop_table("watermark_keys")
    op.drop_table("watermark_exemptions")
