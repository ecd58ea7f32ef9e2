"""ichnode storage: the file archive and the SQLAlchemy index, with Alembic migrations."""
