"""Alembic migrations for poller's own tables, installed as poller.migrations."""
