"""tenant isolation: per-organization email uniqueness, the audit's TCP peer

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_constraint("uq_users_email", type_="unique")
        batch_op.create_unique_constraint("uq_users_org_id_email", ["org_id", "email"])
        batch_op.create_index(batch_op.f("ix_users_email"), ["email"], unique=False)

    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("peer_addr", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_column("peer_addr")

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_email"))
        batch_op.drop_constraint("uq_users_org_id_email", type_="unique")
        batch_op.create_unique_constraint("uq_users_email", ["email"])
