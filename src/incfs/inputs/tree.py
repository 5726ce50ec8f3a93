"""The tree that entries build, with the rules for archives that are not a
plain listing of a tree:

* A later entry for a path replaces the earlier one ("later wins", as when
  tar extracts over what it extracted before). If both are directories the
  later one's metadata wins and the children stay; otherwise the earlier
  entry goes, with everything under it.
* A parent directory an archive never lists is made with mode 0755, owner
  0:0 and time 0.
* A hard link must name an earlier entry that is not a directory; it shares
  that inode (its own mode, owner and time are ignored, as tar does).
* A parent that exists but is not a directory is an error.

Layers (OCI) add whiteouts: `remove` a path, and `opaque` a directory,
which drops what lower layers put in it.
"""

from __future__ import annotations

import stat
from typing import Iterator

from ..errors import UsageError
from .base import Entry, _show


class Node:
    __slots__ = ("entry", "children", "layer", "key", "ino")

    def __init__(self, entry: Entry, layer: int = 0):
        # pack swaps in a compact form (bytes) once it has read the entry
        self.entry: Entry | bytes = entry
        self.children: dict[bytes, Node] | None = {} if entry.is_dir else None
        self.layer = layer  # which layer put it here (OCI)
        self.key: object = None  # the input's or packer's handle on the content
        self.ino = 0  # set when the image is laid out


def implicit_dir(path: bytes) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755, origin="(implied directory)")


class Tree:
    def __init__(self) -> None:
        self.root = Node(implicit_dir(b""))

    def add(self, e: Entry, layer: int = 0) -> tuple[Node, bool]:
        """Put `e` in the tree; returns its node and whether it is new."""
        if not e.path:
            if not e.is_dir or e.link is not None:
                raise UsageError(f"{e.origin}: the archive's root is not a directory")
            self.root.entry, self.root.layer = e, layer
            return self.root, False
        parent, name = self._parent(e.path, layer, e.origin)
        existing = parent.children.get(name)
        if e.link is not None:
            target = self.lookup(e.link)
            if target is None:
                raise UsageError(f"{e.origin}: hard link to {_show(e.link)}, which is not "
                                 "an earlier entry of the archive")
            if target.children is not None:
                raise UsageError(f"{e.origin}: hard link to a directory")
            parent.children[name] = target
            return target, False
        if existing is not None and existing.children is not None and e.is_dir:
            existing.entry, existing.layer = e, layer
            return existing, False
        node = Node(e, layer)
        parent.children[name] = node
        return node, True

    def _parent(self, path: bytes, layer: int, origin: str) -> tuple[Node, bytes]:
        *dirs, name = path.split(b"/")
        cur = self.root
        walked = b""
        for part in dirs:
            walked = walked + b"/" + part if walked else part
            child = cur.children.get(part)
            if child is None:
                child = Node(implicit_dir(walked), layer)
                cur.children[part] = child
            elif child.children is None:
                raise UsageError(f"{origin}: {_show(walked)} is not a directory")
            cur = child
        return cur, name

    def lookup(self, path: bytes) -> Node | None:
        cur = self.root
        for part in path.split(b"/") if path else ():
            if cur.children is None:
                return None
            cur = cur.children.get(part)
            if cur is None:
                return None
        return cur

    def remove(self, path: bytes, below_layer: int) -> bool:
        """Remove `path` if a layer below `below_layer` put it there."""
        parent_path, _, name = path.rpartition(b"/")
        parent = self.lookup(parent_path)
        if parent is None or parent.children is None:
            return False
        node = parent.children.get(name)
        if node is None or node.layer >= below_layer:
            return False
        del parent.children[name]
        return True

    def opaque(self, path: bytes, layer: int) -> None:
        """Drop everything lower layers put under directory `path`; what
        this layer put there stays (its own subdirectories are pruned the
        same way)."""
        node = self.lookup(path)
        if node is None or node.children is None:
            return
        stack = [node]
        while stack:
            cur = stack.pop()
            for name, child in list(cur.children.items()):
                if child.layer < layer:
                    del cur.children[name]
                elif child.children is not None:
                    stack.append(child)

    def walk(self, drain: bool = False) -> Iterator[tuple[bytes, bytes, Node | None, Node]]:
        """(path, name, parent, node) depth first, names in byte order; the
        root comes first with parent None. A hard-linked node comes once per
        name. With `drain`, each directory is emptied once its children are
        on the walk's stack, so the tree is freed as it is walked (pack's
        layout: the tree and what is made from it are never both whole)."""
        stack: list[tuple[bytes, bytes, Node | None, Node]] = [(b"", b"", None, self.root)]
        while stack:
            path, name, parent, node = stack.pop()
            yield path, name, parent, node
            if node.children:
                for child_name in sorted(node.children, reverse=True):
                    child_path = path + b"/" + child_name if path else child_name
                    stack.append((child_path, child_name, node, node.children[child_name]))
                if drain:
                    node.children = {}
