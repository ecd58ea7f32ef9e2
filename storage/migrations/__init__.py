"""Alembic migrations of the ichnode index (run programmatically by ``storage.index``)."""
