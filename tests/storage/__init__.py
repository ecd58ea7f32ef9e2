"""Tests of the archive, the index and its migrations (and helpers the receiver tests share)."""
