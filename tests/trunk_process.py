"""Tests start real trunk server processes through the project's launcher."""

from splitcore.remote.process import TrunkProcess, start_trunk

__all__ = ["TrunkProcess", "start_trunk"]
