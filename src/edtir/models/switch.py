"""On/off settings for the optional kernels, read once from the environment and flipped by code for a block."""

from __future__ import annotations

import contextlib
import os


class Switch:
    """``on`` unless the environment variable ``env`` is "0" (where it is unset: ``default``); ``with
    switch(False):`` sets it for the block and puts the old value back after it."""

    def __init__(self, env: str, default: bool = True):
        self.env = env
        value = os.environ.get(env)
        self.on = default if value is None else value != "0"

    @contextlib.contextmanager
    def __call__(self, on: bool):
        old, self.on = self.on, bool(on)
        try:
            yield
        finally:
            self.on = old
