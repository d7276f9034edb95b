# Baseline: the schema as `Base.metadata.create_all` made it before migrations (predictions, feedback, users,
# mask_feedback, drift_events). A database made then has no alembic_version table; the store stamps it at this revision.
#
# Revision ID: 0001
# Revises: 
# Create Date: 2026-12-02 04:07:55.887317
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('drift_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('detected', sa.Boolean(), nullable=False),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('drift_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_drift_events_created'), ['created'], unique=False)
        batch_op.create_index(batch_op.f('ix_drift_events_model'), ['model'], unique=False)

    op.create_table('predictions',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('image_sha', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('probs', sa.JSON(), nullable=False),
    sa.Column('embedding', sa.JSON(), nullable=True),
    sa.Column('username', sa.String(length=128), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('filename', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predictions_created'), ['created'], unique=False)
        batch_op.create_index(batch_op.f('ix_predictions_image_sha'), ['image_sha'], unique=False)
        batch_op.create_index(batch_op.f('ix_predictions_username'), ['username'], unique=False)

    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.CheckConstraint("role IN ('clinician', 'admin')", name='ck_users_role'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('username')
    )
    op.create_table('feedback',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prediction_id', sa.String(length=32), nullable=False),
    sa.Column('correct_label', sa.String(length=200), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('username', sa.String(length=128), nullable=True),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['prediction_id'], ['predictions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_feedback_created'), ['created'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_prediction_id'), ['prediction_id'], unique=False)

    op.create_table('mask_feedback',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prediction_id', sa.String(length=32), nullable=False),
    sa.Column('mask_sha', sa.String(length=64), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('username', sa.String(length=128), nullable=True),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['prediction_id'], ['predictions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('mask_feedback', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mask_feedback_created'), ['created'], unique=False)
        batch_op.create_index(batch_op.f('ix_mask_feedback_mask_sha'), ['mask_sha'], unique=False)
        batch_op.create_index(batch_op.f('ix_mask_feedback_prediction_id'), ['prediction_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('mask_feedback', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mask_feedback_prediction_id'))
        batch_op.drop_index(batch_op.f('ix_mask_feedback_mask_sha'))
        batch_op.drop_index(batch_op.f('ix_mask_feedback_created'))

    op.drop_table('mask_feedback')
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_feedback_prediction_id'))
        batch_op.drop_index(batch_op.f('ix_feedback_created'))

    op.drop_table('feedback')
    op.drop_table('users')
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_predictions_username'))
        batch_op.drop_index(batch_op.f('ix_predictions_image_sha'))
        batch_op.drop_index(batch_op.f('ix_predictions_created'))

    op.drop_table('predictions')
    with op.batch_alter_table('drift_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_drift_events_model'))
        batch_op.drop_index(batch_op.f('ix_drift_events_created'))

    op.drop_table('drift_events')
