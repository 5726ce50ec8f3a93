"""A laid-out tree held whole for the log format (1.0/1.1, `pack(...,
index=False)`): the inodes as a list and the names, (child inode, parent
inode, name) in walk order, as two arrays and a list of names rather than a
tuple per link (a tuple is 64 bytes; a million links cost 64 MB that way).
The index (format 1.2) is written as the tree is numbered instead
(`pack_index`)."""

from __future__ import annotations

from array import array
from typing import Iterator, overload

from .format.records import InodeEntry

Link = tuple[int, int, bytes]  # (child ino, parent ino, name)


class LinkTable:
    def __init__(self) -> None:
        self.children = array("Q")
        self.parents = array("Q")
        self.names: list[bytes] = []

    def append(self, child: int, parent: int, name: bytes) -> None:
        self.children.append(child)
        self.parents.append(parent)
        self.names.append(name)

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, k: int) -> Link: ...

    @overload
    def __getitem__(self, k: slice) -> list[Link]: ...

    def __getitem__(self, k):
        if isinstance(k, slice):
            return list(zip(self.children[k], self.parents[k], self.names[k]))
        return self.children[k], self.parents[k], self.names[k]

    def __iter__(self) -> Iterator[Link]:
        return zip(self.children, self.parents, self.names)


class LogCollector:
    """The packer's receiver of numbered inodes and names for the log format."""

    def __init__(self) -> None:
        self.inodes: list[InodeEntry] = []
        self.links = LinkTable()

    def inode(self, e: InodeEntry, parent: int, names: list[bytes] | None,
              subdirs: int, kinds: object = None) -> None:
        self.inodes.append(e)  # a log has BLOCKS runs, not maps: `kinds` is not used

    def name(self, child: int, parent: int, name: bytes) -> None:
        self.links.append(child, parent, name)

    def close(self) -> None:
        pass
