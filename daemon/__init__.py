"""A streaming plugin daemon for Dify tool plugins."""

__version__ = "0.1.0"
