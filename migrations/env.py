"""Alembic environment for poller.

Unlike Alembic's generated template, this file does not call fileConfig,
so running migrations in-process leaves poller's logging as the CLI set it.
poller.migrate hands over an open connection in config.attributes.
"""

from alembic import context

from poller.schema import VERSION_TABLE, metadata


def include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    # The database also holds the other application's tables: compare
    # only what poller itself defines.
    if type_ == "table":
        return name in metadata.tables
    table = getattr(obj, "table", None)
    return table is None or table.name in metadata.tables


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("poller's migrations run through `poller db upgrade`, which passes a connection.")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_object=include_object,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
