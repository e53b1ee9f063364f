"""The device registry: every device type installed, found through the ``vhost.devices``
entry point group (pyproject.toml: ``[project.entry-points."vhost.devices"]``).

A package that provides a device adds one line there, ``NAME = "package.module:OBJECT"``
where OBJECT is a :class:`vhost.device.DeviceType`; once installed it appears in
``python -m vhost`` without this project knowing it. Nothing here imports a device
until it is asked for by name (or the list is asked for).

Boundary: discovery only; vhost.cli runs what it finds.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from vhost.device import DeviceType

GROUP = "vhost.devices"


class RegistryError(Exception):
    """No such device, or an entry point that does not give a DeviceType."""


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)  # the first installed wins, as for console scripts
    return found


def names() -> list[str]:
    """Every registered device name, sorted (nothing is imported)."""
    return sorted(_entry_points())


def load(name: str) -> DeviceType:
    """The device type registered as ``name``."""
    ep = _entry_points().get(name)
    if ep is None:
        known = ", ".join(names()) or "none"
        raise RegistryError(f"no device {name!r} is registered (known: {known})")
    try:
        obj = ep.load()
    except Exception as e:  # a broken plug-in must not take the program down
        raise RegistryError(f"device {name!r} ({ep.value}) cannot be loaded: {e!r}") from None
    if not isinstance(obj, DeviceType):
        raise RegistryError(
            f"device {name!r} ({ep.value}) is a {type(obj).__name__}, not a vhost.device.DeviceType"
        )
    if obj.name != name:
        raise RegistryError(f"device {name!r} ({ep.value}) calls itself {obj.name!r}")
    return obj
