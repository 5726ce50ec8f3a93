"""One call for a benchmark-grade HTTP server: real nginx on a shaped link.

Why: benchmarks must see both a bandwidth cap and a round-trip time, and the
kernel has no netem.  So bandwidth comes from tbf on a veth pair into a
network namespace running nginx, and latency from a :class:`FaultProxy` on
127.0.0.1 in front of it (which can also inject faults mid-benchmark).

    client -> 127.0.0.1:proxy (+rtt/2 each way) -> veth, tbf rate_bit -> nginx
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from incfs.testing.faultproxy import FaultProxy
from incfs.testing.netns import EmulatedLink
from incfs.testing.nginx import Nginx

__all__ = ["ShapedServer", "shaped_http_server"]


@dataclass(frozen=True)
class ShapedServer:
    """Handles to the composed pieces; use ``base_url``/``url`` as the client."""

    base_url: str
    proxy: FaultProxy
    nginx: Nginx
    link: EmulatedLink

    def url(self, path: str = "") -> str:
        """URL of ``path`` (relative to the served directory) via the proxy."""
        return self.base_url + path.lstrip("/")


@contextmanager
def shaped_http_server(
    root_dir: str | os.PathLike[str],
    rtt_s: float,
    rate_bit: int | None,
    *,
    rate_bit_up: int | None = None,
    emulate_handshake: bool = True,
) -> Iterator[ShapedServer]:
    """Serve ``root_dir`` over a link with ``rtt_s`` round trip and ``rate_bit``.

    ``emulate_handshake`` makes each new connection cost one extra RTT before
    its first byte, as a TCP handshake would on a real link, so benchmarks
    show the price of opening connections.  Everything is torn down on exit.
    """
    with ExitStack() as stack:
        link = stack.enter_context(EmulatedLink(rate_bit, rate_bit_up=rate_bit_up))
        nginx = stack.enter_context(Nginx(root_dir, host=link.ns_addr, netns=link.ns_name))
        proxy = FaultProxy(
            nginx.address,
            delay_up=rtt_s / 2,
            delay_down=rtt_s / 2,
            connect_delay=rtt_s if emulate_handshake else 0.0,
        )
        stack.enter_context(proxy)
        yield ShapedServer(base_url=proxy.url(), proxy=proxy, nginx=nginx, link=link)
