"""systemd unit files for the edge and the connector, shipped as package data.

`ramp systemd units` prints them or writes them out with ramp's executable in their ExecStart
(docs/systemd.md).
"""

from __future__ import annotations

import re
from importlib import resources

UNITS = ("ramp-edge.service", "ramp-edge.socket", "ramp-connector.service")
DEFAULT_RAMP = "/usr/local/bin/ramp"  # what the shipped files say

# An Exec*= line running ramp (systemd's prefixes such as `-` or `!` kept)
_EXEC = re.compile(r"^(Exec[A-Za-z]*=[-@:+!|]*)" + re.escape(DEFAULT_RAMP) + r"(?=\s|$)", re.M)
# Characters systemd would read as quoting, a specifier (%) or a variable ($) in ExecStart
_SPECIAL = frozenset("\"'\\%$")
# Paths the units' sandbox hides from the service (ProtectHome=, PrivateTmp=)
HIDDEN_PREFIXES = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")


def unit_text(name: str) -> str:
    """The unit file `name` (one of UNITS) as shipped."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def check_ramp_path(path: str) -> None:
    """Raise ValueError if `path` cannot stand as is at the start of an ExecStart line."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r}: the ramp executable must be an absolute path")
    bad = sorted({c for c in path if c in _SPECIAL or c.isspace() or not c.isprintable()})
    if bad:
        raise ValueError(
            f"{path!r}: a unit's ExecStart would need quoting or escaping for "
            f"{' '.join(repr(c) for c in bad)}; use a path without them (a symlink, say)"
        )


def with_ramp(text: str, ramp: str) -> str:
    """`text` with `ramp` as the executable of its Exec*= lines that run ramp."""
    check_ramp_path(ramp)
    return _EXEC.sub(lambda m: m.group(1) + ramp, text)


def units(ramp: str = DEFAULT_RAMP) -> dict[str, str]:
    """Every unit file by name, running `ramp`."""
    return {name: with_ramp(unit_text(name), ramp) for name in UNITS}


__all__ = [
    "DEFAULT_RAMP",
    "HIDDEN_PREFIXES",
    "UNITS",
    "check_ramp_path",
    "unit_text",
    "units",
    "with_ramp",
]
