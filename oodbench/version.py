"""The oodbench version, stored with every result row (provenance)."""

__version__ = "0.1.0"
