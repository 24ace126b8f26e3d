"""Thin Prefect tasks: I/O, quality gates, and calls into `grc_core`."""

from tasks.env import configure as _configure

_configure()
