"""Disk space of images and caches: releasing blocks, the cache cap, gc and
compaction (issue 13 item 1, issue 9 item 3's disk target).

* `records`: the RELEASED record (which data blocks left the image, and
  whether their bytes now live in the file's plain copy).
* `plainfiles`: where plain copies live and how the read path reads them.
* `release`: replaying RELEASED records, and releasing blocks (record, then
  fallocate PUNCH_HOLE).
* `cap`: `--cache-size`, least recently read data blocks released first.
* `gc`: punching dead payload (offline `incfs gc`, and online when over cap).
* `compact`: `incfs compact`, an image rewritten without dead space.
"""
