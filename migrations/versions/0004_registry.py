"""registry: model aliases and version lifecycle

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_models",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("active_version_id", sa.Integer(), nullable=True),
        sa.Column("previous_active_version_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["active_version_id"],
            ["model_versions.id"],
            name=op.f("fk_registry_models_active_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["previous_active_version_id"],
            ["model_versions.id"],
            name=op.f("fk_registry_models_previous_active_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_registry_models")),
    )
    op.create_table(
        "model_version_meta",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("signer_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("provenance", sa.JSON(), nullable=False),
        sa.Column("eval_results", sa.JSON(), nullable=True),
        sa.Column("eval_passed", sa.Boolean(), nullable=True),
        sa.Column("bom_digest", sa.String(length=64), nullable=True),
        sa.Column("replaced_version_id", sa.Integer(), nullable=True),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_version_meta_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["replaced_version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_version_meta_replaced_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("version_id", name=op.f("pk_model_version_meta")),
    )
    with op.batch_alter_table("model_version_meta", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_version_meta_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("model_version_meta", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_version_meta_state"))
    op.drop_table("model_version_meta")
    op.drop_table("registry_models")
