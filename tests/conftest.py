"""Shared pytest setup: registers the local Hub fixtures (tests/hub_fixtures.py)."""

pytest_plugins = ["hub_fixtures"]
