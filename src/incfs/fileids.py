"""Files by their 16-byte file id, for `.incfs/index/<file-id>` and
`.incfs/incomplete/<file-id>` (incfs v2's control directories).

The map is built on first use (a mount nobody asks by id pays nothing) and
kept current as inodes are created. An id names one file: if a loader gave
two files the same id, the one with the lower inode number is found.
"""

from __future__ import annotations

import binascii

from .namespace import Inode, Namespace

FILE_ID_SIZE = 16


def parse_file_id(name: bytes) -> bytes | None:
    """The id a directory entry name spells (32 hex digits, either case), or
    None: any other name names no file."""
    if len(name) != 2 * FILE_ID_SIZE:
        return None
    try:
        return binascii.unhexlify(name)
    except (binascii.Error, ValueError):
        return None


class FileIds:
    def __init__(self, ns: Namespace):
        self.ns = ns
        self._by_id: dict[bytes, int] | None = None

    def _map(self) -> dict[bytes, int]:
        if self._by_id is None:
            by_id: dict[bytes, int] = {}
            for ino in sorted(self.ns.inodes):
                node = self.ns.inodes[ino]
                if node.is_reg:
                    by_id.setdefault(node.file_id, ino)
            self._by_id = by_id
        return self._by_id

    def add(self, node: Inode) -> None:
        if self._by_id is not None and node.is_reg:
            self._by_id.setdefault(node.file_id, node.ino)

    def find(self, name: bytes) -> Inode | None:
        """The regular file a name (hex file id) names, or None."""
        file_id = parse_file_id(name)
        if file_id is None:
            return None
        ino = self._map().get(file_id)
        node = self.ns.inodes.get(ino) if ino is not None else None
        return node if node is not None and node.is_reg else None
