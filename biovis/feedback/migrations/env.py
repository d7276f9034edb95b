"Alembic's environment for the feedback store: the connection the store passes in (or one to the settings' database URL)."
from alembic import context

from biovis.feedback.db import Base, default_db_url, _make_engine

config = context.config
conn = config.attributes.get('connection')


def _run(connection):
    # render_as_batch: SQLite cannot ALTER most things in place; Alembic's batch mode copies the table, PostgreSQL alters it
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction(): context.run_migrations()


if conn is not None: _run(conn)
else:
    engine = _make_engine(config.get_main_option('sqlalchemy.url') or default_db_url())
    with engine.begin() as connection: _run(connection)
    engine.dispose()
