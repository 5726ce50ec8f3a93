"""The source (or mirror set) a mount's loader reads from."""

from __future__ import annotations

from ..sources import Source, open_source, options_for


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
