"""The metadata of the wheel that goes to worker nodes: pilot/ and splitpilot/ only.

The repository's setup.cfg describes the whole distribution (broker, HTCondor side, the `splitpilot`
command and its entry points, extras). A node runs the agent and the wrapper and nothing else, so its
wheel is built from a copy holding only pilot/ and splitpilot/, with this setup.cfg: the same name and
version, the runtime requirements (protobuf, cryptography, grpcio), no console script and no entry
points that would name modules it does not carry. The node runs `python -m pilot agent`.
"""

from __future__ import annotations

import configparser
from pathlib import Path

#: The packages of the node wheel (and of the containers' software area: pilot.launch.software).
NODE_PACKAGES: tuple[str, ...] = ("pilot", "splitpilot")


def node_setup_cfg(full: Path) -> str:
    """The node wheel's setup.cfg, made from the repository's FULL setup.cfg."""
    source = configparser.ConfigParser(interpolation=None)
    source.read(full)
    node = configparser.ConfigParser(interpolation=None)
    node["metadata"] = {key: source["metadata"][key] for key in ("name", "version", "description", "license")}
    node["metadata"]["description"] += " (the node side: agent and wrapper)"
    node["options"] = {"python_requires": source["options"]["python_requires"], "packages": "find:",
                       "install_requires": source["options"]["install_requires"]}
    node["options.packages.find"] = {"include": "".join(f"\n{p}\n{p}.*" for p in NODE_PACKAGES)}
    node["options.package_data"] = {"splitpilot": source["options.package_data"]["splitpilot"]}
    lines = []
    for section in node.sections():
        lines.append(f"[{section}]")
        for key, value in node[section].items():
            lines.append(f"{key} = {value}" if "\n" not in value else f"{key} =" + value.replace("\n", "\n    "))
        lines.append("")
    return "\n".join(lines)


def write_node_sources(sources: Path, full_setup_cfg: Path) -> None:
    """Replace the staged setup.cfg in SOURCES (a copy of pilot/ and splitpilot/) with the node wheel's."""
    (sources / "setup.cfg").write_text(node_setup_cfg(full_setup_cfg))


__all__ = ["NODE_PACKAGES", "node_setup_cfg", "write_node_sources"]
