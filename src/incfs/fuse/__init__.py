"""Our own FUSE session layer: the kernel protocol spoken on /dev/fuse.

Why not pyfuse3 (see docs/fuse.md): over Debian 12's libfuse 3.14 it cannot
negotiate passthrough, cache directories in the kernel, hand us the
/dev/fuse fd, or mount as a normal user when /dev/fuse is not 0666.

    abi      the protocol's numbers and struct layouts
    ops      what a file system implements (`Operations`) and its answer types
    dirents  directory listings encoded as READDIR replies
    session  one connection served on trio: requests, replies, notifications
    device   mounting (mount(2) or fusermount3), unmounting, passthrough ioctls
"""

from .abi import InitFlag, OpenFlag
from .device import MountOptions, mount, unmount
from .dirents import Listing
from .ops import Attr, Connection, Context, Entry, FuseError, Opened, Operations, StatFs
from .session import Session

__all__ = ["Attr", "Connection", "Context", "Entry", "FuseError", "InitFlag", "Listing",
           "MountOptions", "OpenFlag", "Opened", "Operations", "Session", "StatFs", "mount",
           "unmount"]
