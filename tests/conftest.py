"""Shared by the tests: this directory is on ``sys.path`` (pytest puts a rootless
conftest's directory there), so test modules import the helpers in ``explicit.py``."""
