"""TCP connections to an http(s) source, opened at a mount's first instant.

A mount's daemon spends ~150 ms importing trio, httpx and its own modules
before it can send the metadata request, and only then would it start the
TCP handshake: one round trip (100 ms on a 100 ms link) that could have run
during the imports. So `mount_background` opens the connections itself,
before it starts the daemon, with non-blocking `connect()` calls (stdlib
`socket` only: this module imports nothing heavy), and passes them down,
their descriptors named in an environment variable. The daemon's HTTP
client (`sources.http`, `sources.early_http`) takes one whenever it would
open a connection to the same host and port (`take`); one still connecting
is waited for, one that failed or is older than `MAX_AGE` is dropped for a
normal connect.

The daemon also sends its first request early (`ask_early`): a new
cache's metadata read, written here byte for byte as its HTTP client would
write it (`range_request`), on the first connection as soon as its
handshake is done, while trio still imports (~60 ms). Its answer is read
without the HTTP client (`take_asked`, incfs.loader.early), so a new
cache's mount comes up before httpx is imported at all. When a client does
take that connection, its stream (`sources.early_http`) finds the request
sent and sends only what differs: nothing, or, for any other first
request, the request on a fresh connection (the answer coming on this one
is not its). On a 100 ms link a cold start's tree shows ~35 ms sooner.

Only plain TCP is opened early; a TLS handshake still runs in the client
(it needs the trust store, which is loaded at the first handshake). Nothing
is opened when a proxy is configured for the URL (httpx would go through
the proxy, not to the host).

This module runs first in the `incfs` program, before anything else is
imported (`open_at_start`), so it imports only what costs nothing: the C
`_socket` module, not `socket` (14 ms here: enum, selectors), and no
`urllib.parse` (11 ms: re, ipaddress) or `typing`. Each millisecond spent
before the SYN is sent is a millisecond later that the tree is visible.
What the daemon does with the connections (`adopt`, `take`) imports
`socket` when it runs: the daemon has it loaded by then.
"""

from __future__ import annotations

import _socket
import errno
import os
import time

from . import __version__
from .startup import background_mount

TYPE_CHECKING = False  # typing is not imported (see above); type checkers take this as True
if TYPE_CHECKING:
    import socket

ENV = "INCFS_PRECONNECTED"
# What our HTTP client says it is (sources.http), here for `range_request`
USER_AGENT = f"incfs/{__version__}"
# Connections a mount opens early, and the loader keeps warm: the first
# misses of a mount's programs (several files at once) each find one with
# its handshake done. LoaderConfig.warm_connections takes its default here
# (the program opens them before it could import the config's module).
CONNECTIONS = 4
_DEFAULT_PORTS = {"http": 80, "https": 443}
# What a host name or an IPv4 address may hold; an IPv6 literal is hex
# digits and colons. Anything else (percent escapes, non-ASCII names, zone
# ids) gets no early connection: httpx may read it otherwise than we do.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
# What a request target may hold for `range_request` to write it as httpx
# would: unreserved characters, "/" and a query's "?", "=" and "&".
_TARGET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                          "-._~/?=&")
# Seconds a connection opened early is worth taking: the daemon takes them
# within a second of its start; an idle one much older may have been closed
# by the server (nginx's keepalive_timeout is 75 s; a request on a closed
# one fails and is retried, which costs more than a fresh connect).
MAX_AGE = 10.0

# host, port -> [(fd, opened at (time.time()))], filled by `adopt`
_adopted: dict[tuple[str, int], list[tuple[int, float]]] = {}
# fd -> the bytes of a request already sent on it (`ask_early`), whose
# answer is still to be read: the first write of its taker must begin so
_asked: dict[int, bytes] = {}
_asked_of: set[tuple[str, int]] = set()  # hosts `ask_early` sent its one request to
# fd -> host, port: taken by an early reader (`take_asked`, `take_idle`) and
# not given back yet: counted as the host's still (`available`)
_lent: dict[int, tuple[str, int]] = {}


# Opened by `open_at_start` before the command line was parsed: (host, port),
# then what open_early returned for them.
_at_start: tuple[tuple[str, int], tuple[dict[str, str], list[int]]] | None = None


def open_at_start(argv: list[str], count: int = CONNECTIONS) -> None:
    """At the `incfs` program's first instant, before it imports and parses
    (~60 ms): if `argv` is a background `mount` whose URLs all name one
    host, start its connections now; `open_early` then hands these out.
    A guess (the parser has not run): what it opens for nothing, a wrong
    host among the arguments, is closed when the mount opens its own."""
    global _at_start
    if not background_mount(argv):
        return
    urls = [arg for arg in argv[1:] if arg[:8].lower().startswith(("http://", "https://"))]
    targets = {_target(url) for url in urls}
    if len(targets) == 1 and None not in targets:
        _at_start = (targets.pop(), open_early(urls[0], count))


def at_start() -> tuple[str, list[int]] | None:
    """What `open_at_start` opened, for a command that hands itself to the
    warm process (incfs.warm_client): the environment entry's value (which
    names the host and port) and the descriptors. They stay this process's
    until `received` has been called in the one that took them."""
    if _at_start is None or not _at_start[1][1]:
        return None
    _, (env, fds) = _at_start
    return env[ENV], fds


def received(value: str, fds: list[int]) -> None:
    """In the process that runs a command for another (incfs.warm): the
    connections that command's `open_at_start` opened came as `fds`
    (SCM_RIGHTS), for `open_early` to hand out as if opened here."""
    global _at_start
    if not fds:
        return
    host, port, opened, _ = value.split(" ")
    renamed = f"{host} {port} {opened} {','.join(map(str, fds))}"
    _at_start = ((host, int(port)), ({ENV: renamed}, fds))


def open_early(url: str, count: int) -> tuple[dict[str, str], list[int]]:
    """Start `count` connections to the host of an http(s) `url` (or take
    those `open_at_start` opened for it). Returns the environment entry
    naming them and their descriptors (for pass_fds), or ({}, []) when none
    could be started; the caller closes its copies once the child has them."""
    global _at_start
    target = _target(url)
    if _at_start is not None:
        (opened_for, early), _at_start = _at_start, None
        if opened_for == target and early[1]:
            return early
        close_fds(early[1])
    if target is None or count < 1:
        return {}, []
    host, port = target
    try:
        # the host as bytes: a str would be encoded with the "idna" codec,
        # whose import (re, unicodedata, stringprep) took 9-15 ms here. It is
        # ASCII (`_target` takes no other), so the bytes are the same.
        family, kind, proto, _, address = _socket.getaddrinfo(
            host.encode("ascii"), port, 0, _socket.SOCK_STREAM)[0]
    except OSError:
        return {}, []  # the daemon's own connect says what is wrong
    fds = []
    for _ in range(count):
        sock = _socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        if sock.connect_ex(address) not in (0, errno.EINPROGRESS):
            sock.close()
            break
        fds.append(sock.detach())
    if not fds:
        return {}, []
    return {ENV: f"{host} {port} {time.time():.3f} {','.join(map(str, fds))}"}, fds


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def hand_over() -> None:
    """After forking the process that adopts them: close this process's
    copies of the connections, those the variable names (and drop the
    variable: a later child must not take descriptors that are no longer
    these) and those adopted already (an early child sends the metadata
    request on one before it forks the daemon, incfs.early_fork)."""
    value = os.environ.pop(ENV, None)
    if value:
        try:
            close_fds([int(fd) for fd in value.rsplit(" ", 1)[-1].split(",")])
        except ValueError:
            pass
    discard()


def adopt() -> None:
    """Take the connections our parent opened (see ENV) into this process's
    pool, once; the variable is removed, so no child of ours sees it."""
    value = os.environ.pop(ENV, None)
    if not value:
        return
    try:
        host, port, opened, fds = value.split(" ")
        key, at = (host, int(port)), float(opened)
        descriptors = [int(fd) for fd in fds.split(",")]
    except ValueError:
        return
    for fd in descriptors:
        if _is_tcp_socket(fd):
            _adopted.setdefault(key, []).append((fd, at))


def take(host: str, port: int) -> socket.socket | None:
    """A connection opened early to host:port (connected, or still
    connecting), or None. Older ones than MAX_AGE are closed, not given."""
    import socket

    pool = _adopted.get((host.lower(), port))
    while pool:
        fd, at = pool.pop(0)
        if time.time() - at > MAX_AGE:
            close_fds([fd])
            _asked.pop(fd, None)
            continue
        return socket.socket(fileno=fd)
    return None


def ask_early(url: str, length: int) -> bool:
    """Send `GET url` for its first `length` bytes (`range_request`) on the
    first connection opened early to its host whose handshake is done,
    unless that was done already; without waiting (False: none is
    connected yet, none was opened, or the URL is not one for this). The
    client that takes that connection finds the request sent (`asked`)."""
    import socket

    request, target = range_request(url, length), _target(url)
    if request is None or target is None:
        return False
    adopt()
    pool = _adopted.get(target)
    if target in _asked_of or not pool:
        return target in _asked_of
    fd = pool[0][0]  # the one the client takes first
    sent = send_request(fd, request)
    if sent is None:
        return False
    asked_on(url, fd, sent)
    return True


def send_request(fd: int, request: bytes) -> bytes | None:
    """Send `request` on the connection `fd`, without waiting: what was sent
    (a start of it, when the socket took no more), or None when its
    handshake is not done (or it failed)."""
    import socket

    if not _connected(fd):
        return None
    sock = socket.socket(fileno=fd)
    try:
        return request[:sock.send(request)]
    except OSError:
        return None
    finally:
        sock.detach()


def asked_on(url: str, fd: int, sent: bytes) -> None:
    """Record that `sent` went out on the early connection `fd` to `url`'s
    host (`ask_early` here, or the command's `send_request` before the
    connection came to this process, incfs.early_fork)."""
    _asked[fd] = sent
    _asked_of.add(_target(url))


def was_asked(url: str) -> bool:
    """Whether `ask_early` sent its request to `url`'s host."""
    return _target(url) in _asked_of


def take_asked(url: str, length: int) -> socket.socket | None:
    """The connection `ask_early` sent `range_request(url, length)` on,
    whole, taken out of the pool for a reader of its answer that is not the
    HTTP client (incfs.loader.early); None if there is none, or if only part
    of the request went out (the client's stream sends the rest)."""
    import socket

    target, request = _target(url), range_request(url, length)
    for fd, at in _adopted.get(target, []) if target is not None else []:
        if _asked.get(fd) == request and time.time() - at <= MAX_AGE:
            _adopted[target].remove((fd, at))
            del _asked[fd]
            _lent[fd] = target
            return socket.socket(fileno=fd)
    return None


def take_idle(url: str) -> socket.socket | None:
    """An early connection to `url`'s host with its handshake done and no
    request on it, taken out of the pool (for incfs.loader.early, which
    asks for more of the metadata before the HTTP client is imported), or
    None."""
    import socket

    target = _target(url)
    for fd, at in list(_adopted.get(target, [])) if target is not None else []:
        if fd not in _asked and time.time() - at <= MAX_AGE and _connected(fd):
            _adopted[target].remove((fd, at))
            _lent[fd] = target
            return socket.socket(fileno=fd)
    return None


def give_back(fd: int, reusable: bool) -> None:
    """The end of an early reader's use of a connection `take_asked` or
    `take_idle` gave it: `reusable` (it read a whole answer, and the server
    keeps the connection open) puts it back in the pool, idle, for the next
    reader or the HTTP client, which take it as one just opened (the
    server's keep-alive timer restarted with the answer); else it is
    closed."""
    target = _lent.pop(fd, None)
    if not reusable or target is None:
        close_fds([fd])
        return
    _adopted.setdefault(target, []).append((fd, time.time()))


def _connected(fd: int) -> bool:
    """Whether the connection on `fd` has its handshake done, without
    waiting (False: still connecting, or it failed)."""
    import select
    import socket

    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(0):
        return False
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    except OSError:
        return False
    finally:
        sock.detach()


def asked(fd: int) -> bytes:
    """What `ask_early` sent on `fd` (b"" if nothing), once."""
    return _asked.pop(fd, b"")


def available_to(url: str) -> int:
    """`available` for `url`'s host and port (0 for a URL not of ours)."""
    target = _target(url)
    return 0 if target is None else available(*target)


def available(host: str, port: int) -> int:
    """Connections opened early to host:port not taken yet, with those an
    early reader has (they come back to the pool, unless it closes them)."""
    key = (host.lower(), port)
    return len(_adopted.get(key, ())) + sum(1 for target in _lent.values() if target == key)


def discard() -> None:
    """Close every connection nobody took."""
    for pool in _adopted.values():
        close_fds([fd for fd, _ in pool])
        pool.clear()
    _asked.clear()
    _asked_of.clear()
    _lent.clear()


def range_request(url: str, length: int, offset: int = 0) -> bytes | None:
    """The bytes of `GET url` for `length` bytes at `offset` (its first, by
    default) as the daemon's HTTP client (sources.http) sends them, for
    `ask_early` and incfs.loader.early; None when this
    strict reading cannot be sure of them: not plain http (TLS is the
    client's), a user or password in the URL, a path or query with
    characters httpx might escape otherwise. tests/test_startup.py holds
    it to the bytes httpx really sends."""
    target = _target(url)
    if target is None or url[:7].lower() != "http://":
        return None
    rest = url[7:].partition("#")[0]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    if "@" in rest[:cut] or not _TARGET_CHARS.issuperset(rest[cut:]):
        return None
    host, port = target
    host = f"[{host}]" if ":" in host else host
    host += f":{port}" if port != _DEFAULT_PORTS["http"] else ""
    path = rest[cut:] if rest[cut:].startswith("/") else "/" + rest[cut:]
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n"
            f"Connection: keep-alive\r\nAccept-Encoding: identity\r\n"
            f"User-Agent: {USER_AGENT}\r\nRange: bytes={offset}-{offset + length - 1}\r\n\r\n"
            ).encode("ascii")


def _target(url: str) -> tuple[str, int] | None:
    """(host, port) to connect to for `url`, or None: not http(s), a host
    this strict reading does not accept, or a proxy would carry the request.
    Read as urllib.parse.urlsplit reads it (tests/test_startup.py compares
    them), without importing it."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        return None
    authority = rest
    for end in "/?#":
        authority = authority.partition(end)[0]
    authority = authority.rpartition("@")[2]  # user:password@ is not the host
    if authority.startswith("["):
        host, bracket, after = authority[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            return None
        port_text, allowed = after[1:], _IPV6_CHARS
    else:
        host, _, port_text = authority.partition(":")
        allowed = _NAME_CHARS
    if not host or not allowed.issuperset(host):
        return None
    if port_text and not (port_text.isascii() and port_text.isdigit()
                          and int(port_text) < 65536):
        return None
    if _proxy_configured(scheme):
        return None
    return host.lower(), int(port_text) if port_text else _DEFAULT_PORTS[scheme]


def _proxy_configured(scheme: str) -> bool:
    """Whether the environment names a proxy httpx may use for `scheme`
    (NO_PROXY is not weighed: when in doubt, open nothing early)."""
    names = {f"{scheme}_proxy", "all_proxy"}
    return any(value for key, value in os.environ.items() if key.lower() in names)


def _is_tcp_socket(fd: int) -> bool:
    """Whether `fd` is (still) a TCP socket: the variable names descriptors
    of our parent's; never adopt anything else that has the number now."""
    import socket
    import stat

    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET,
                                                                  socket.AF_INET6)
    finally:
        sock.detach()
