"""incfs: a lazily loaded, read-only, integrity-verified file system over FUSE."""

BLOCK_SIZE = 4096
BLOCK_SHIFT = 12
ROOT_INO = 1

__version__ = "0.1.0"
