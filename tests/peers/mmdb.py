"""A minimal MaxMind DB (format 2.0) writer, so tests can build their own GeoIP files.

The ``maxminddb`` package only reads. This writes what a reader needs and nothing more:
an IPv6 search tree (IPv4 networks live under ``::/96``, where readers look for them),
24-bit records, a data section of maps, strings, unsigned integers and arrays written
inline (no pointers), and the metadata map after the ``\\xab\\xcd\\xefMaxMind.com``
marker. See the MaxMind DB File Format Specification, sections "Search Tree Section",
"Data Section Separator", "Output Data Section" and "Database Metadata".
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["country_record", "write_mmdb"]

_METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"
_RECORD_BITS = 24

# Data field types (spec: "Output Data Section").
_POINTER, _UTF8, _DOUBLE, _BYTES, _UINT16, _UINT32, _MAP = 1, 2, 3, 4, 5, 6, 7
_INT32, _UINT64, _UINT128, _ARRAY, _BOOLEAN = 8, 9, 10, 11, 14


def country_record(iso_code: str) -> dict[str, Any]:
    """A GeoLite2-Country shaped record."""
    return {
        "country": {"iso_code": iso_code, "names": {"en": iso_code}},
        "registered_country": {"iso_code": iso_code},
    }


def _control(type_: int, size: int) -> bytes:
    """Control byte(s): 3 type bits (or 0 + extended type byte) and 5 size bits."""
    if size < 29:
        first, extra = size, b""
    elif size < 29 + 256:
        first, extra = 29, bytes([size - 29])
    elif size < 285 + 65536:
        first, extra = 30, struct.pack(">H", size - 285)
    else:
        first, extra = 31, struct.pack(">I", size - 65821)[1:]
    if type_ <= 7:
        return bytes([(type_ << 5) | first]) + extra
    return bytes([first, type_ - 7]) + extra


def _uint(type_: int, value: int, width: int) -> bytes:
    raw = value.to_bytes(width, "big").lstrip(b"\x00")
    return _control(type_, len(raw)) + raw


def _encode(value: Any) -> bytes:
    if isinstance(value, bool):
        return _control(_BOOLEAN, int(value))
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return _control(_UTF8, len(raw)) + raw
    if isinstance(value, bytes):
        return _control(_BYTES, len(value)) + value
    if isinstance(value, float):
        return _control(_DOUBLE, 8) + struct.pack(">d", value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative integers are not supported by this writer")
        if value < 1 << 32:
            return _uint(_UINT32, value, 4)
        if value < 1 << 64:
            return _uint(_UINT64, value, 8)
        return _uint(_UINT128, value, 16)
    if isinstance(value, Mapping):
        out = bytearray(_control(_MAP, len(value)))
        for key, item in value.items():
            out += _encode(str(key)) + _encode(item)
        return bytes(out)
    if isinstance(value, list | tuple):
        out = bytearray(_control(_ARRAY, len(value)))
        for item in value:
            out += _encode(item)
        return bytes(out)
    raise TypeError(f"cannot encode {type(value).__name__}")


class _Node:
    __slots__ = ("children", "data")

    def __init__(self) -> None:
        self.children: list[_Node | None] = [None, None]
        self.data: list[int | None] = [None, None]  # data offsets for leaf records


def _bits_of(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """(128-bit integer, prefix length) in the IPv6 tree; IPv4 goes under ::/96."""
    if isinstance(network, ipaddress.IPv4Network):
        return int(network.network_address), 96 + network.prefixlen
    return int(network.network_address), network.prefixlen


def write_mmdb(
    path: Path,
    networks: Mapping[str, Mapping[str, Any]],
    *,
    database_type: str = "GeoLite2-Country",
) -> Path:
    """Write ``{cidr: record}`` to ``path`` as a MaxMind DB that ``maxminddb`` can open.

    More specific networks may sit inside larger ones; insert order does not matter
    (larger prefixes are inserted first so that the smaller ones split them).
    """
    data = bytearray()
    root = _Node()
    ordered = sorted(
        ((ipaddress.ip_network(cidr, strict=False), record) for cidr, record in networks.items()),
        key=lambda item: _bits_of(item[0])[1],
    )
    for network, record in ordered:
        offset = len(data)
        data += _encode(dict(record))
        value, prefix = _bits_of(network)
        if prefix == 0:
            raise ValueError("a /0 network is not supported by this writer")
        node = root
        for depth in range(prefix):
            bit = (value >> (127 - depth)) & 1
            if depth == prefix - 1:
                _fill(node, bit, offset)
                break
            child = node.children[bit]
            if child is None:
                child = _Node()
                # A larger network already covering this branch: push its data down.
                inherited = node.data[bit]
                child.data = [inherited, inherited]
                node.data[bit] = None
                node.children[bit] = child
            node = child

    nodes: list[_Node] = []
    queue = [root]
    while queue:  # breadth-first numbering; the root is node 0
        node = queue.pop(0)
        nodes.append(node)
        queue.extend(c for c in node.children if c is not None)
    index = {id(n): i for i, n in enumerate(nodes)}
    count = len(nodes)

    tree = bytearray()
    for node in nodes:
        records = []
        for side in (0, 1):
            child = node.children[side]
            if child is not None:
                records.append(index[id(child)])
            elif node.data[side] is not None:
                offset = node.data[side]
                assert offset is not None
                records.append(count + 16 + offset)
            else:
                records.append(count)  # "no data"
        for record in records:
            if record >= 1 << _RECORD_BITS:
                raise ValueError("database too large for 24-bit records")
            tree += record.to_bytes(3, "big")

    metadata = {
        "node_count": count,
        "record_size": _RECORD_BITS,
        "ip_version": 6,
        "database_type": database_type,
        "languages": ["en"],
        "binary_format_major_version": 2,
        "binary_format_minor_version": 0,
        "build_epoch": int(time.time()),
        "description": {"en": "Domum Gateway test database"},
    }
    encoded_meta = bytearray(_control(_MAP, len(metadata)))
    for key, value in metadata.items():
        encoded_meta += _encode(key)
        if key in ("record_size", "ip_version", "binary_format_major_version", "binary_format_minor_version"):
            encoded_meta += _uint(_UINT16, int(value), 2)
        elif key == "build_epoch":
            encoded_meta += _uint(_UINT64, int(value), 8)
        else:
            encoded_meta += _encode(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(tree) + b"\x00" * 16 + bytes(data) + _METADATA_MARKER + bytes(encoded_meta))
    return path


def _fill(node: _Node, bit: int, offset: int) -> None:
    """Point the record for ``bit`` at ``offset``, overriding any covered subtree's gaps."""
    child = node.children[bit]
    if child is None:
        node.data[bit] = offset
        return
    # A more specific network was inserted first (only with equal-length sorting ties):
    # fill the holes below it rather than replacing it.
    for side in (0, 1):
        if child.children[side] is None and child.data[side] is None:
            child.data[side] = offset
        elif child.children[side] is not None:
            _fill(child, side, offset)
