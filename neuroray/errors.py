"""Errors a user can act on.

Every failure caused by input (a path, a key, a config value, a file's contents) raises a
subclass of :class:`NeurorayError`; the CLI prints its message on one line and exits non-zero,
while any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class NeurorayError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""


class ConfigError(NeurorayError):
    """A config file or override names an unknown key, has a wrong type or an impossible value."""


class VolumeError(NeurorayError):
    """A volume cannot be opened, read or written (missing file or key, corrupt chunk, bad dtype)."""


class SWCError(NeurorayError):
    """An SWC file is malformed (bad line, duplicate id, dangling parent, cycle, bad radius)."""


class RegistryError(NeurorayError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""
