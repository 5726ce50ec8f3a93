"""The source (or mirror set) a mount's loader reads from."""

from __future__ import annotations

import trio

from ..sources import Source, SourceIdentity, open_source, options_for, preload


def open_loader_source(config, **extra) -> Source:
    """The source (or mirror set) of a mount: `config.source` then
    `config.mirrors`, with `config.source_options`; `extra` options are
    applied where a backend accepts them (used for short probes)."""
    specs = [config.source, *(config.mirrors or [])]
    options = dict(config.source_options or {})
    known = options_for(specs)
    for key, value in extra.items():
        if key in known:
            options[key] = value
    return open_source(specs if len(specs) > 1 else specs[0], **options)


def preload_loader_source(config) -> None:
    """Import the client libraries the mount's source and mirrors need
    (sources.preload), ahead of opening them."""
    preload([config.source, *(config.mirrors or [])])


def preload_aside(config) -> None:
    """preload_loader_source in a thread of its own, now: for time the
    process would otherwise spend waiting (a loader opening its source
    later then finds the modules loaded, or waits for their import)."""
    import threading

    threading.Thread(target=preload_loader_source, args=(config,), name="import-client",
                     daemon=True).start()


async def open_imported_source(config, identity: SourceIdentity | None) -> Source:
    """The mount's source for a process that has not imported its client
    yet (the metadata came without it, incfs.loader.early): the import runs
    in a worker thread, and the source takes `identity` (what an answer read
    elsewhere said of the object) as first seen."""
    await trio.to_thread.run_sync(preload_loader_source, config)
    source = open_loader_source(config)
    if identity is not None:
        source.adopt_identity(identity)
    return source
