#!/usr/bin/env python3
"""Serve the files of a directory lazily into an `incfs mount empty` mount.

    incfs mount empty /mnt/app --cache /var/tmp/app.img
    python examples/loader.py /mnt/app ./build      # prints "ready", then serves

Every name appears at once (files with their size, mode and fs-verity root
hash, so each block is verified before it is stored); a block is read from
the directory only when a program reads it. Run it again after a remount
and it picks up where the image left off.
"""
import os
import stat
import sys

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.control import Client
from incfs.integrity.merkle import TreeGeometry, build_tree, hash_block, required_hash_blocks


def tree_of(path: str):
    """(size, root hash, hash blocks) of a file, in one streaming pass."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return (size, *build_tree(map(hash_block, iter(lambda: f.read(BLOCK_SIZE), b"")), size))


def publish(c: Client, src: str) -> dict:
    files, inos = {}, {src: ROOT_INO}
    for top, dirs, names in os.walk(src):
        for name in sorted(dirs + names):
            path, parent = os.path.join(top, name), inos[top]
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                size, root, tree = tree_of(path)
            try:
                if stat.S_ISLNK(mode):
                    ino = c.symlink(parent, name, os.readlink(path))
                elif stat.S_ISDIR(mode):
                    ino = c.mkdir(parent, name, mode & 0o7777)
                elif stat.S_ISREG(mode):
                    ino = c.create_file(parent, name, size, mode & 0o7777, root_hash=root)
                else:
                    continue  # devices, fifos, sockets: not served
            except FileExistsError:  # a remount: the image has the name already
                ino = c.lookup(parent, name)
            inos[path] = ino
            if stat.S_ISREG(mode):
                files[ino] = (path, tree, TreeGeometry(size))
    return files


def serve(c: Client, files: dict) -> None:
    last = 0
    while True:
        wanted: dict[int, set] = {}
        for r in c.pending_reads(timeout=5, after_serial=last):  # each pending read once
            last = max(last, r.serial)
            wanted.setdefault(r.ino, set()).add((r.tree, r.block))
        for ino, keys in wanted.items():
            path, tree, geo = files[ino]
            blocks = {}
            with open(path, "rb") as f:
                for kind, index in keys:
                    proof = [index] if kind else required_hash_blocks(geo, index)
                    for s in proof:  # hash blocks (top first) that verify the block
                        blocks["hash", s] = (s, tree[s], "none", "hash")
                    if not kind:
                        blocks["data", index] = (index, os.pread(f.fileno(), BLOCK_SIZE,
                                                                 index * BLOCK_SIZE))
            c.fill_blocks(ino, blocks.values())  # blocks already present are no-ops


if __name__ == "__main__":
    mountpoint, source = sys.argv[1], os.path.abspath(sys.argv[2])
    with Client.connect(mountpoint) as client:
        published = publish(client, source)
        print("ready", len(published), "files", flush=True)
        try:
            serve(client, published)
        except (ConnectionError, KeyboardInterrupt):
            pass  # unmounted, or stopped
