"""The names of a laid-out tree as pack keeps them until the image is
written: (child inode, parent inode, name) in walk order, held as two arrays
and a list of names rather than a tuple per link (a tuple is 64 bytes; a
million links cost 64 MB that way)."""

from __future__ import annotations

from array import array
from typing import Iterator, overload

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
