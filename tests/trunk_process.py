"""Tests start real trunk server processes through the project's launcher."""

from splitcore.trunk_process import TrunkProcess, start_trunk

__all__ = ["TrunkProcess", "start_trunk"]
