"""The backing image on disk: fixed structures, record bodies and the log.

Pure code over bytes and files: nothing here knows FUSE, sockets or networks.
"""

from .layout import (LOG_START, SUPERBLOCK_SIZE, RecordType, Superblock,
                     SuperFlags)
from .log import LogAppender, ScanResult, scan_log

__all__ = ["LOG_START", "SUPERBLOCK_SIZE", "RecordType", "Superblock",
           "SuperFlags", "LogAppender", "ScanResult", "scan_log"]
