"""On/off settings for the optional kernels, read once from the environment and flipped by code for a block."""

from __future__ import annotations

import contextlib
import os


class Switch:
    """``on`` unless the environment variable ``env`` is "0"; ``with switch(False):`` sets it for the block and puts
    the old value back after it."""

    def __init__(self, env: str):
        self.env = env
        self.on = os.environ.get(env, "1") != "0"

    @contextlib.contextmanager
    def __call__(self, on: bool):
        old, self.on = self.on, bool(on)
        try:
            yield
        finally:
            self.on = old
