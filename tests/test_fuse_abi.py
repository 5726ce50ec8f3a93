"""The FUSE struct layouts in incfs.fuse.abi against the kernel's header.

The structs that Debian 12's /usr/include/linux/fuse.h (protocol 7.38) has
are measured by compiling a C program against it; the ones added later
(7.40's fuse_backing_map, the wider fuse_init_out and fuse_open_out) are
checked against the sizes the upstream header documents.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from incfs.fuse import abi

HEADER = Path("/usr/include/linux/fuse.h")
MEASURED = {  # our name -> C expression
    "IN_HEADER": "sizeof(struct fuse_in_header)",
    "OUT_HEADER": "sizeof(struct fuse_out_header)",
    "ATTR": "sizeof(struct fuse_attr)",
    "ENTRY_OUT": "sizeof(struct fuse_entry_out)",
    "ATTR_OUT": "sizeof(struct fuse_attr_out)",
    "INIT_IN": "sizeof(struct fuse_init_in)",
    "INIT_OUT": "sizeof(struct fuse_init_out)",
    "OPEN_OUT": "sizeof(struct fuse_open_out)",
    "READ_IN": "sizeof(struct fuse_read_in)",
    "RELEASE_IN": "sizeof(struct fuse_release_in)",
    "FLUSH_IN": "sizeof(struct fuse_flush_in)",
    "GETATTR_IN": "sizeof(struct fuse_getattr_in)",
    "KSTATFS": "sizeof(struct fuse_kstatfs)",
    "DIRENT_HEAD": "offsetof(struct fuse_dirent, name)",
    "NOTIFY_INVAL_INODE": "sizeof(struct fuse_notify_inval_inode_out)",
    "NOTIFY_INVAL_ENTRY": "sizeof(struct fuse_notify_inval_entry_out)",
    "NOTIFY_STORE": "sizeof(struct fuse_notify_store_out)",
    "NOTIFY_DELETE": "sizeof(struct fuse_notify_delete_out)",
    "LSEEK_IN": "sizeof(struct fuse_lseek_in)",
}


def ours(name: str) -> int:
    special = {"ENTRY_OUT": abi.ENTRY_OUT_SIZE, "ATTR_OUT": abi.ATTR_OUT_SIZE}
    return special.get(name) or getattr(abi, name).size


@pytest.fixture(scope="module")
def kernel_sizes(tmp_path_factory) -> dict[str, int]:
    if not HEADER.exists() or not shutil.which("gcc"):
        pytest.fail("linux-libc-dev's fuse.h and gcc are installed by `make setup`")
    src = tmp_path_factory.mktemp("abi") / "sizes.c"
    lines = [f'printf("{k} %zu\\n", (size_t)({expr}));' for k, expr in MEASURED.items()]
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/fuse.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n")
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_struct_size_matches_the_kernel_header(kernel_sizes, name):
    assert ours(name) == kernel_sizes[name]


def test_expected_sizes_table_is_what_we_pack():
    for name, size in abi.EXPECTED_SIZES.items():
        assert ours(name) == size, name


def test_newer_structs_have_upstream_sizes():
    # 7.40: fuse_backing_map {int32 fd; uint32 flags; uint64 padding}
    assert abi.BACKING_MAP.size == 16
    # 7.40 reuses fuse_open_out's padding for backing_id, and fuse_init_out's
    # reserved words for max_stack_depth and request_timeout: sizes unchanged
    assert abi.OPEN_OUT.size == 16 and abi.INIT_OUT.size == 64
    assert abi.DEV_IOC_BACKING_OPEN == 0x4010E501
    assert abi.DEV_IOC_BACKING_CLOSE == 0x4004E502
    assert abi.DEV_IOC_CLONE == 0x8004E500


def test_dirent_sizes_are_8_byte_aligned():
    for n in range(1, 300):
        for plus in (False, True):
            size = abi.dirent_size(n, plus)
            assert size % 8 == 0 and size >= n + (152 if plus else 24)


@settings(max_examples=300, deadline=None)
@given(ino=st.integers(1, (1 << 64) - 1), mode=st.integers(0, 0xFFFFFFFF),
       size=st.integers(0, (1 << 63) - 1), nlink=st.integers(0, 0xFFFFFFFF),
       uid=st.integers(0, 0xFFFFFFFF), gid=st.integers(0, 0xFFFFFFFF),
       rdev=st.integers(0, (1 << 64) - 1), time_ns=st.integers(0, (1 << 62)),
       timeout=st.sampled_from([0.0, 1.5, 3600.0, 0.000000001]))
def test_pack_entry_is_what_entry_packs(ino, mode, size, nlink, uid, gid, rdev, time_ns, timeout):
    """READDIRPLUS packs its entries with pack_entry (no Attr or Entry made):
    the same bytes as the objects'."""
    from incfs.fuse import Attr, Entry
    from incfs.fuse.ops import pack_entry
    attr = Attr(ino=ino, mode=mode, size=size, nlink=nlink, uid=uid, gid=gid, rdev=rdev,
                blksize=4096, atime_ns=time_ns, mtime_ns=time_ns, ctime_ns=time_ns)
    assert pack_entry(ino, mode, size, nlink, uid, gid, rdev, time_ns, timeout) == \
        Entry(attr, timeout, timeout).pack()
