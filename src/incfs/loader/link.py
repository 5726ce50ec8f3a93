"""What the link to the source can carry: round-trip time and bandwidth
measured from the loader's own requests, and the pipeline depth they call
for (bandwidth x RTT).

Why measure: the right number of bytes in flight depends on the link. Too
few and a sequential reader waits a round trip per window; too many and the
extra requests only queue in the network (on the emulated links of bench/ a
burst of many parallel ranges loses its tail to the bottleneck's queue and
waits for a retransmission timeout) and hold memory. The depth is what keeps
the pipe full: bytes that arrive during one round trip, times a margin.
"""

from __future__ import annotations

import math
import time
from collections import deque

# Requests whose duration is a round-trip sample: short enough that their
# transfer time is small against any RTT worth measuring.
RTT_SAMPLE_MAX = 64 * 1024
# Recent short requests the RTT is the median of: the median, not the
# minimum, because the pipeline has to hide the latency a request really
# sees (the server's think time, and this daemon's own when the machine is
# busy), not the path's best case.
RTT_SAMPLES = 32
# Seconds over which the bandwidth estimate forgets (a link that slows down
# is noticed within a few of these).
BANDWIDTH_HALF_LIFE = 3.0
# Bytes in flight per bandwidth-delay product: 2 so that the estimate can
# grow (bytes in flight bound the bandwidth seen) and a late reply does not
# empty the pipe.
MARGIN = 2.0


class LinkEstimate:
    """Round-trip time and bandwidth of the source, from request timings.

    `started()` / `finished(nbytes, seconds)` bracket every request. The
    bandwidth is bytes received per second during which at least one request
    was in flight (idle time does not dilute it), decayed over
    `BANDWIDTH_HALF_LIFE`; the RTT is the median of recent requests of at
    most `RTT_SAMPLE_MAX` bytes."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.active = 0  # requests in flight
        self._bytes = 0.0  # decayed bytes received
        self._busy = 0.0  # decayed seconds with a request in flight
        self._stamp = clock()  # time of the last start or finish
        self._rtts: deque[float] = deque(maxlen=RTT_SAMPLES)

    def started(self) -> None:
        self._advance()
        self.active += 1

    def finished(self, nbytes: int, seconds: float) -> None:
        self._advance()
        self._bytes += nbytes
        self.active = max(0, self.active - 1)
        if nbytes <= RTT_SAMPLE_MAX and seconds > 0:
            self._rtts.append(seconds)

    def _advance(self) -> None:
        """Count the time since the last event as busy when a request was in
        flight, and let old figures fade."""
        now = self.clock()
        elapsed = max(0.0, now - self._stamp)
        if self.active:
            self._busy += elapsed
        factor = 0.5 ** (elapsed / BANDWIDTH_HALF_LIFE)
        self._bytes *= factor
        self._busy *= factor
        self._stamp = now

    @property
    def rtt(self) -> float | None:
        """Seconds; None before a short request was timed."""
        return _median(self._rtts) if self._rtts else None

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second; None before anything was received."""
        if self._busy <= 0 or self._bytes <= 0:
            return None
        return self._bytes / self._busy

    def depth(self, floor: int, ceiling: int) -> int:
        """Bytes to keep in flight: MARGIN x bandwidth x RTT, within
        [floor, ceiling] (the floor until both are measured)."""
        rtt, bandwidth = self.rtt, self.bandwidth
        if rtt is None or bandwidth is None:
            return floor
        return int(min(ceiling, max(floor, MARGIN * bandwidth * rtt)))

    def requests(self, depth: int, request: int, ceiling: int) -> int:
        """Requests of `request` bytes that hold `depth` bytes, plus one so
        the pipe never drains while a reply is processed."""
        return max(2, min(ceiling, math.ceil(depth / max(1, request)) + 1))

    def as_dict(self, floor: int, ceiling: int) -> dict:
        rtt, bandwidth = self.rtt, self.bandwidth
        return {"rtt_ms": None if rtt is None else round(rtt * 1000, 1),
                "bandwidth": None if bandwidth is None else int(bandwidth),
                "depth_bytes": self.depth(floor, ceiling)}


def _median(values) -> float:
    """statistics.median, here because that module (with fractions and
    decimal) is ~2.5 ms of a mount's start, before the tree is visible."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
