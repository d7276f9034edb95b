"""Alembic migrations of the feedback store's schema (SQLite and PostgreSQL). `FeedbackStore` upgrades a database to the
newest revision when it opens it (under the schema lock); `alembic -c biovis/feedback/migrations/alembic.ini revision
--autogenerate -m ...` writes the next revision after a change to `biovis.feedback.db` (see nbs/10_feedback.db.ipynb)."""
