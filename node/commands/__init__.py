"""Implementations of the ichnode sub-commands, one module each."""
