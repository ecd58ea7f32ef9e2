"""Alembic revision scripts of the ichnode index, oldest first."""
