"""incfs.startup: the collector paused while a process imports, and the
mount command's exit without the interpreter's teardown."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)


def test_leave_at_once_skips_teardown_but_flushes_output():
    proc = _python("""
        import atexit, sys
        from incfs import startup
        atexit.register(print, "teardown")
        def main():
            sys.stdout.write("mounted")  # buffered: the exit must flush it
            startup.leave_at_once()
            sys.exit(0)
        startup.run(main)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "mounted"


def test_a_failed_command_exits_as_usual():
    proc = _python("""
        import atexit, sys
        from incfs import startup
        atexit.register(print, "teardown")
        def main():
            startup.leave_at_once()
            sys.exit(2)
        startup.run(main)
    """)
    assert proc.returncode == 2
    assert proc.stdout.strip() == "teardown"


def test_without_the_request_the_interpreter_ends_as_usual():
    proc = _python("""
        import atexit
        from incfs import startup
        atexit.register(print, "teardown")
        startup.run(lambda: None)
    """)
    assert proc.returncode == 0
    assert proc.stdout.strip() == "teardown"


def test_collector_paused_while_importing_then_frozen_and_back():
    proc = _python("""
        import gc, os
        from incfs import startup
        startup.importing()
        paused = gc.isenabled()
        if os.fork() == 0:  # a forked child (the supervisor, the daemon) inherits the pause
            startup.imports_done()
            os._exit(0 if gc.isenabled() and gc.get_freeze_count() > 0 else 1)
        _, status = os.wait()
        startup.imports_done()
        print(paused, gc.isenabled(), gc.get_freeze_count() > 0, os.waitstatus_to_exitcode(status))
    """)
    assert proc.stdout.split() == ["False", "True", "True", "0"], proc.stderr


def test_a_collector_it_did_not_pause_is_left_alone():
    proc = _python("""
        import gc
        from incfs import startup
        gc.disable()  # an embedding program's own choice
        startup.imports_done()
        print(gc.isenabled(), gc.get_freeze_count())
    """)
    assert proc.stdout.split() == ["False", "0"], proc.stderr


def test_commands_other_than_mount_run_with_the_collector_on(tmp_path):
    proc = _python(f"""
        import gc
        from click.testing import CliRunner
        from incfs import startup
        from incfs.cli import main
        startup.importing()
        result = CliRunner().invoke(main, ["keygen", {str(tmp_path / "k")!r}])
        print(result.exit_code, gc.isenabled())
    """)
    assert proc.stdout.split() == ["0", "True"], proc.stderr


def test_mount_command_connections_open_before_parsing_and_are_handed_out():
    from incfs import preconnect

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/app.img"
        preconnect.open_at_start(["mount", "--prefetch", "none", url, "/mnt"], 2)
        env, fds = preconnect.open_early(url, 2)  # what mount_background asks for
        try:
            assert len(fds) == 2 and env[preconnect.ENV].endswith(",".join(map(str, fds)))
            server.settimeout(5)
            server.accept()[0].close()  # they were connecting before open_early was called
            again_env, again = preconnect.open_early(url, 2)  # handed out once only
            preconnect.close_fds(again)
            assert again and again != fds
        finally:
            preconnect.close_fds(fds)


def test_no_early_connections_for_a_guess_that_could_be_wrong():
    from incfs import preconnect

    for argv in (["mount", "http://a.example/x", "--mirror", "http://b.example/x", "/m"],
                 ["mount", "--foreground", "http://a.example/x", "/m"],
                 ["status", "http://a.example/x"], ["mount", "image.img", "/m"]):
        preconnect.open_at_start(argv, 2)
        assert preconnect._at_start is None, argv


def test_the_program_opens_connections_before_importing_anything_costly():
    """incfs.console, incfs.startup and incfs.preconnect load nothing that
    costs time before the first SYN: no typing, socket, urllib.parse, and no
    idna codec (which getaddrinfo of a str host imports, with re)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/app.img"
        proc = _python(f"""
            import sys
            before = set(sys.modules)
            import incfs.console
            from incfs import preconnect
            preconnect.open_at_start(["mount", {url!r}, "/mnt"])
            assert preconnect._at_start is not None
            print(" ".join(sorted(set(sys.modules) - before)))
        """)
        assert proc.returncode == 0, proc.stderr
        loaded = set(proc.stdout.split())
        assert {"incfs.console", "incfs.preconnect", "_socket"} <= loaded
        assert not {"typing", "socket", "urllib.parse", "re", "encodings.idna",
                    "dataclasses", "incfs.cli"} & loaded, loaded


def test_the_command_reaches_the_warm_process_before_importing_anything_costly(tmp_path):
    """incfs.warm_client (the fingerprint, the socket's path, the attempt)
    adds nothing costly either: a warm mount's command hands itself over
    ~20 ms into its start. With no warm process it says so (None)."""
    proc = _python(f"""
        import os, sys
        os.environ["XDG_RUNTIME_DIR"] = {str(tmp_path)!r}
        before = set(sys.modules)
        import incfs.console
        from incfs import warm_client
        print(warm_client.run_in_warm(["incfs", "mount", "http://h.example/x", "/mnt"]))
        print(" ".join(sorted(set(sys.modules) - before)))
    """)
    assert proc.returncode == 0, proc.stderr
    status, loaded = proc.stdout.splitlines()
    assert status == "None"
    loaded = set(loaded.split())
    assert {"incfs.warm_client", "incfs.fingerprint", "incfs.rundir"} <= loaded
    assert not {"typing", "socket", "json", "pathlib", "hashlib", "re", "signal",
                "dataclasses", "incfs.cli", "click"} & loaded, loaded


def test_the_early_url_reading_agrees_with_urlsplit():
    from urllib.parse import urlsplit

    from incfs import preconnect

    for url in ("http://127.0.0.1:8080/app.img", "https://Mirror.Example.org/a/b?x=1#f",
                "http://user:pw@host.example:81/p", "http://[::1]:9000/x", "HTTP://h/",
                "http://h:/x", "http://a@b@c.example/x", "https://h.example?q", "http://h#frag",
                "http://under_score.example/"):
        parts = urlsplit(url)
        expected = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        assert preconnect._target(url) == expected, url
    # what it does not read (urlsplit may, or refuses), it opens nothing for
    for url in ("ftp://h/x", "http://h:99999/x", "http://h:8a/x", "http://[::1/x",
                "http://[::1]x/", "http://ex%41mple.org/", "http://bücher.example/",
                "http:///x", "s3://bucket/key", "http://h:\u0662/x"):
        assert preconnect._target(url) is None, url


def test_the_request_sent_early_is_the_one_httpx_sends():
    """preconnect.range_request writes the first read's request as the HTTP
    client does (sources.http): a mismatch would cost the daemon a fresh
    connection (sources.early_http), so an httpx that changes its header
    order fails here. What it cannot be sure of, it does not write."""
    import threading

    import trio

    from incfs import preconnect
    from incfs.sources import HttpSource, RetryPolicy

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def answer_twice() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                seen.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\n"
                             b"Content-Length: 10\r\nConnection: close\r\n\r\n0123456789")

    async def first_read(url: str) -> bytes:
        async with HttpSource(url, retry=RetryPolicy(max_attempts=1)) as src:
            return await src.read(0, 10)

    server = threading.Thread(target=answer_twice, daemon=True)
    server.start()
    urls = [f"http://127.0.0.1:{port}/images/app-1.2.img?v=2&t=x_y~z",
            f"http://LOCALHOST:{port}"]
    try:
        for url in urls:
            assert trio.run(first_read, url) == b"0123456789"
    finally:
        server.join(10)
        listener.close()
    assert seen == [preconnect.range_request(url, 10) for url in urls]
    for url in ("https://h.example/x", "http://user@h.example/x", "http://h.example/a%20b",
                "http://h.example/a b", "http://h.example/caf\u00e9", "ftp://h.example/x"):
        assert preconnect.range_request(url, 10) is None, url


def test_the_daemon_asks_for_the_metadata_before_importing_trio(tmp_path):
    """loader.cachefile.ask_early, the daemon's first step (mount.run_foreground),
    writes a new cache's metadata request on the early connection with
    neither trio, the HTTP client nor the image code loaded; for a local
    image it asks nothing and makes no cache directory."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/app.img"
        proc = _python(f"""
            import os, select, sys
            os.environ["XDG_CACHE_HOME"] = {str(tmp_path / "xdg")!r}
            from incfs import preconnect
            from incfs.mount import MountConfig
            env, fds = preconnect.open_early({url!r}, 1)
            os.environ.update(env)
            poller = select.poll()
            poller.register(fds[0], select.POLLOUT)
            poller.poll(5000)  # the handshake is done
            from incfs.loader import cachefile
            cachefile.ask_early(MountConfig(source="/no/such.img", mountpoint="/mnt"))
            cachefile.ask_early(MountConfig(source={url!r}, mountpoint="/mnt",
                                            cache={str(tmp_path / "c.img")!r}))
            print(" ".join(m for m in ("trio", "httpx", "incfs.image", "incfs.sources")
                           if m in sys.modules) or "-")
        """)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["-"]
        server.settimeout(5)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            got = conn.recv(65536)
    from incfs import preconnect
    from incfs.loader.config import DEFAULTS
    assert got == preconnect.range_request(url, DEFAULTS.first_read)
    assert not (tmp_path / "xdg").exists()


def test_a_cold_start_makes_its_value_records_without_dataclasses():
    """Making a dataclass takes 0.3-1.6 ms on Python 3.11 (each generated
    method is compiled from source), and a cold start made ~40 of them on
    its way to READY. The value records (on-disk records, FUSE replies, the
    configurations) are NamedTuples (~70 us each) and the state objects,
    equal only to themselves, plain classes (~6 us): of what the command and
    the daemon import before READY, only records with mutable fields,
    defaults made per instance or checks in __post_init__ stay
    dataclasses, and no more of them than now."""
    proc = _python("""
        import dataclasses
        made = []
        make = dataclasses._process_class
        def counted(cls, *args, **kwargs):
            made.append(f"{cls.__module__}.{cls.__qualname__}")
            return make(cls, *args, **kwargs)
        dataclasses._process_class = counted
        import incfs.cli, incfs.mount
        incfs.mount._import_serving(True)
        from incfs.loader import cachefile, early, ondemand, remote
        print(" ".join(m for m in made if m.startswith("incfs.")))
    """)
    assert proc.returncode == 0, proc.stderr
    made = set(proc.stdout.split())
    assert "incfs.mount.MountConfig" in made  # the hook saw them
    values = {"incfs.loader.config.LoaderConfig", "incfs.format.layout.Superblock",
              "incfs.format.layout.RecordHeader", "incfs.format.index.IndexHeader",
              "incfs.format.index.InodeRecord", "incfs.format.records.DirentEntry",
              "incfs.fuse.ops.Attr", "incfs.fuse.ops.Entry", "incfs.fuse.ops.Context",
              "incfs.fuse.device.MountOptions", "incfs.sources.base.SourceIdentity",
              "incfs.fills.FillBlock", "incfs.kmount.MountEntry"}
    states = {"incfs.loader.plan.Job", "incfs.loader.schedule.Stream", "incfs.mount.Backing",
              "incfs.mount.Succession", "incfs.sources.mirrors.Mirror", "incfs.waits.PendingRead",
              "incfs.passthrough._FileState", "incfs.image.SignatureState"}
    assert not (values | states) & made, (values | states) & made
    assert len(made) <= 10, sorted(made)
