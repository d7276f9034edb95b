# Index predictions by model, version and time: drift checks, the dashboard and retraining read one model version's
# recent predictions, which was a scan of the whole table.
#
# Revision ID: 0002
# Revises: 0001
# Create Date: 2026-12-02 04:08:09.995183
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index('ix_predictions_model_version_created', ['model', 'model_version', 'created'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index('ix_predictions_model_version_created')

