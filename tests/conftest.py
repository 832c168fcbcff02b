"""Shared fixtures. Tests that need root or a device skip with the reason."""

from __future__ import annotations

import os

import pytest

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (loop devices and block ioctls)")
