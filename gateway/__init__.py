"""The feikong head-end gateway service."""
__version__ = "0.1.0"
