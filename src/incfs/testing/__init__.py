"""Test tools that emulate networks and servers for incfs tests and benchmarks.

They exist so that the HTTP block source can be exercised against a *real*
server (nginx) over a *real* kernel network path (namespaces, veth, tc) with
controllable latency and faults, instead of against mocks that cannot show
timing or partial-failure behaviour.

* :mod:`incfs.testing.faultproxy` -- TCP proxy adding delay, bandwidth caps
  and faults (reset, stall, truncate, corrupt, refuse).
* :mod:`incfs.testing.nginx` -- throw-away nginx serving a directory.
* :mod:`incfs.testing.netns` -- network namespace + tbf-shaped veth link.
* :mod:`incfs.testing.link` -- all three composed for benchmarks.
"""
