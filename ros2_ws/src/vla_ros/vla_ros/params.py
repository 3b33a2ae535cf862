"""Parameters declared up front from one table per node, read back as attributes."""
from __future__ import annotations

from types import SimpleNamespace

from rcl_interfaces.msg import ParameterDescriptor


def declare(node, table: dict[str, tuple[object, str]]) -> SimpleNamespace:
    """Declare every `name: (default, description)` of `table` on `node` (the type follows the
    default, as `ros2 param describe` shows it) and return the values the node was started with."""
    for name, (default, description) in table.items():
        node.declare_parameter(name, default, ParameterDescriptor(description=description))
    return read(node, table)


def read(node, table: dict) -> SimpleNamespace:
    return SimpleNamespace(**{name: node.get_parameter(name).value for name in table})
