"""Open an untrusted image and drive every read path a mount would use.

Shared by the hypothesis property tests and the atheris fuzz targets: both
feed it damaged or hostile images and judge every exception it meets.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

from incfs.errors import IncfsError
from incfs.image import Image, MissingBlock

Judge = Callable[[BaseException], None]  # raises unless the failure is documented


def exercise_image(path: Path, judge: Judge, *, public_key=None, files: int = 500,
                   blocks_per_file: int = 64, verify: bool = False) -> str:
    """Returns "refused" when the image does not open, else "opened"."""
    try:
        img = Image.open(path)
    except Exception as e:  # noqa: BLE001 - the judge decides
        judge(e)
        return "refused"
    with img:
        img.totals()
        _judged(judge, img.canonical_root)  # a walk: an index may fail it (EIO)
        if public_key is not None and img.signature is not None:
            _judged(judge, img.verify_signature, public_key)
        _judged(judge, _read_tree, img, judge, files, blocks_per_file)
    if verify:
        from incfs.verify import verify_image
        _judged(judge, verify_image, path)
    return "opened"


def _read_tree(img: Image, judge: Judge, files: int, blocks_per_file: int) -> None:
    """Walking can fail too: an index is checked as it is read."""
    for _path, node in itertools.islice(img.ns.walk(), files):
        if node.data is not None:
            _read_file(img, node, judge, blocks_per_file)


def _read_file(img: Image, node, judge: Judge, blocks_per_file: int) -> None:
    for bmap, read in ((node.data, img.read_block), (node.hashes, img.hash_block)):
        for i, *_rest in itertools.islice(bmap.entries() if bmap else (), blocks_per_file):
            _judged(judge, read, node, i)
    _judged(judge, img.read_range, node, 0, 64 * 1024)
    img.missing_for_read(node, 0, 1 << 20)
    node.data.ranges()


def _judged(judge: Judge, fn, *args) -> None:
    try:
        fn(*args)
    except MissingBlock:
        pass  # absent is a normal state, not a failure
    except IncfsError as e:
        judge(e)
    except Exception as e:  # noqa: BLE001 - the judge decides
        judge(e)
