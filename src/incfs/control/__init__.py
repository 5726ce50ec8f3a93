"""The data-loader control protocol (R5): wire format, server and client.

`Client.connect(mountpoint)` is the Python interface loaders use; the wire
format is documented in docs/protocol.md.
"""

from .client import Block, Client, PendingRead

__all__ = ["Block", "Client", "PendingRead"]
