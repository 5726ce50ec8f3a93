"""An OCI image layout directory (as `skopeo copy ... oci:DIR:TAG` writes it)
as pack input: index.json -> manifest -> layers, applied in order.

Every blob read is checked against its descriptor's digest and size; a
layer is checked as it streams, and pack fails (leaving no image) if it does
not match. Whiteouts follow the OCI image spec: `.wh.NAME` removes NAME
that a lower layer put in that directory, `.wh..wh..opq` drops everything
lower layers put in it. A whiteout for a name no lower layer has is ignored
(it hides nothing; the pack summary lists it).

Two passes over the layers: the first builds the merged tree from headers
alone (pack's tree: `build` fills the one pack lays out), the second reads
the data of just the files that survive, so a file replaced or deleted by a
later layer costs no space in the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import UsageError
from .base import DEFAULT_MAX_ENTRIES, Entry, too_many
from .tar import TarInput
from .tree import Tree

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"
MAX_JSON = 4 << 20
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """`oci:DIR[:TAG]` -> (DIR, TAG)."""
    rest = spec[len("oci:"):]
    if os.path.isdir(rest) or ":" not in rest:
        return Path(rest), None
    directory, _, tag = rest.rpartition(":")
    return Path(directory), tag or None


class _Hashing:
    """Passes reads through and checks, at the end, digest and size."""

    def __init__(self, f: BinaryIO, digest: str, size: int, name: str):
        alg, _, self.want = digest.partition(":")
        self.f, self.h, self.size, self.name, self.seen = f, hashlib.new(alg), size, name, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        self.seen += len(data)
        if self.size >= 0 and self.seen > self.size:
            raise UsageError(f"{self.name} is larger than its descriptor says")
        return data

    def finish(self) -> None:
        while self.read(1 << 20):
            pass
        if self.h.hexdigest() != self.want or (self.size >= 0 and self.seen != self.size):
            raise UsageError(f"{self.name} does not match its digest (damaged or replaced blob)")

    def close(self) -> None:
        self.f.close()


class OciInput:
    def __init__(self, spec: str, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.dir, self.tag = parse_spec(spec)
        self.spec = spec
        self.max_entries = max_entries
        self.notes: list[str] = []
        if not (self.dir / "index.json").is_file():
            raise UsageError(f"{self.dir} is not an OCI image layout (no index.json)")
        self.layers = self._layers()

    def close(self) -> None:
        pass

    # --- blobs and manifests ----------------------------------------------------

    def _blob_path(self, digest: object) -> Path:
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise UsageError(f"{self.spec}: bad digest {str(digest)[:80]!r}")
        alg, _, hexpart = digest.partition(":")
        return self.dir / "blobs" / alg / hexpart

    def _json_blob(self, desc: dict) -> dict:
        path = self._blob_path(desc.get("digest"))
        data = _read_small(path)
        alg, _, want = desc["digest"].partition(":")
        if hashlib.new(alg, data).hexdigest() != want:
            raise UsageError(f"{self.spec}: blob {desc['digest']} does not match its digest")
        return _parse_json(data, str(path))

    def _layers(self) -> list[dict]:
        index = _parse_json(_read_small(self.dir / "index.json"), str(self.dir / "index.json"))
        desc = self._pick(index.get("manifests"), "index.json")
        manifest = self._json_blob(desc)
        if desc.get("mediaType") in (INDEX, DOCKER_LIST) or "manifests" in manifest:
            manifest = self._json_blob(self._pick_platform(manifest.get("manifests")))
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise UsageError(f"{self.spec}: the manifest lists no layers")
        for layer in layers:
            if not isinstance(layer, dict) or layer.get("mediaType") not in LAYER_TYPES:
                kind = layer.get("mediaType") if isinstance(layer, dict) else layer
                raise UsageError(f"{self.spec}: unsupported layer type {str(kind)[:100]}")
            self._blob_path(layer.get("digest"))
            if not isinstance(layer.get("size", -1), int):
                raise UsageError(f"{self.spec}: layer size is not a number")
        return layers

    def _pick(self, manifests: object, where: str) -> dict:
        if not isinstance(manifests, list) or not manifests:
            raise UsageError(f"{self.spec}: {where} lists no images")
        descs = [m for m in manifests if isinstance(m, dict)]
        if self.tag is not None:
            found = [m for m in descs if _field(m, "annotations").get(REF_NAME) == self.tag]
            if not found:
                tags = sorted(str(_field(m, "annotations").get(REF_NAME)) for m in descs)
                raise UsageError(f"{self.spec}: no image tagged {self.tag!r} (tags: "
                                 f"{', '.join(tags)[:200]})")
            return found[0]
        if len(descs) != 1:
            raise UsageError(f"{self.spec}: {len(descs)} images in the layout; name one "
                             "as oci:DIR:TAG")
        return descs[0]

    def _pick_platform(self, manifests: object) -> dict:
        if not isinstance(manifests, list) or not manifests:
            raise UsageError(f"{self.spec}: the image index lists no manifests")
        arch = _ARCH.get(platform.machine(), platform.machine())
        for m in manifests:
            plat = _field(m, "platform")
            if plat.get("os") == "linux" and plat.get("architecture") == arch:
                return m
        if len(manifests) == 1 and isinstance(manifests[0], dict):
            # an image made for one platform: pack it as it is (packing for
            # another machine is a use), but say so in pack's notes
            plat = _field(manifests[0], "platform")
            if plat:
                self.notes.append(f"{self.spec}: the image index's only manifest is for "
                                  f"{str(plat.get('os'))[:40]}/"
                                  f"{str(plat.get('architecture'))[:40]}, not this machine's "
                                  f"linux/{arch}; packed as it is")
            return manifests[0]
        raise UsageError(f"{self.spec}: no manifest for linux/{arch} in the image index")

    def _layer_members(self, i: int, again: bool = False):
        """Layer `i`'s members; `again` for the second pass (its notes were taken)."""
        layer = self.layers[i]
        name = f"{self.spec}: layer {i} ({layer['digest'][:19]})"
        path = self._blob_path(layer["digest"])
        holder: list[_Hashing] = []

        def opener() -> _Hashing:
            try:
                f = open(path, "rb")
            except OSError as e:
                raise UsageError(f"{name}: cannot open {path}: {e.strerror}") from None
            holder.append(_Hashing(f, layer["digest"], layer.get("size", -1), name))
            return holder[0]

        tar = TarInput(name, opener, self.max_entries)
        try:
            yield from tar.members()
            holder[0].finish()
        finally:
            tar.close()
        if not again:
            self.notes.extend(tar.notes)

    # --- the merged tree ----------------------------------------------------------

    def build(self, tree: Tree, pack_file: Callable[[Entry], int]) -> None:
        """Merge the layers into `tree`, then pack the files that survive;
        each surviving file's key becomes its file number."""
        self._merge(tree)
        self._file_data(tree, pack_file)

    def _merge(self, tree: Tree) -> None:
        """Headers only: a regular file's key is (layer, member ordinal),
        where the second pass finds its data."""
        count = 0
        for i in range(len(self.layers)):
            for ordinal, (_m, entry) in enumerate(self._layer_members(i)):
                count += 1
                if count > self.max_entries:
                    raise too_many(self.spec, self.max_entries)
                if entry is None or self._whiteout(tree, entry, i):
                    continue
                node, new = tree.add(entry, layer=i)
                if new and entry.is_reg:
                    tree.key[node] = i << 32 | ordinal

    def _whiteout(self, tree: Tree, entry: Entry, layer: int) -> bool:
        parent, _, base = entry.path.rpartition(b"/")
        if not base.startswith(WHITEOUT):
            return False
        if base == OPAQUE:
            tree.opaque(parent, layer)
        elif base.startswith(WHITEOUT + WHITEOUT):
            pass  # aufs bookkeeping (.wh..wh.plnk and the like): not content
        else:
            hidden = (parent + b"/" if parent else b"") + base[len(WHITEOUT):]
            if not tree.remove(hidden, below_layer=layer):
                self.notes.append(f"{entry.origin}: whiteout for {hidden.decode(errors='replace')}"
                                  ", which no lower layer has (ignored)")
        return True

    def _file_data(self, tree: Tree, pack_file: Callable[[Entry], int]) -> None:
        """The surviving files are nodes in the order they were added, so
        their keys ascend: one pointer walks them beside the layers."""
        wanted = tree.files()
        at = 0
        for i in sorted({tree.key[node] >> 32 for node in wanted}):
            for ordinal, (_m, entry) in enumerate(self._layer_members(i, again=True)):
                if at < len(wanted) and tree.key[wanted[at]] == i << 32 | ordinal:
                    tree.key[wanted[at]] = pack_file(entry)
                    at += 1
        if at != len(wanted):
            raise UsageError(f"{self.spec}: a layer changed while it was read")


def _field(desc: object, name: str) -> dict:
    """A descriptor's object-valued field (annotations, platform), or {}
    when the descriptor or the field is not a JSON object: such a field
    matches no tag or platform instead of failing as an internal error."""
    value = desc.get(name) if isinstance(desc, dict) else None
    return value if isinstance(value, dict) else {}


def _read_small(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON + 1)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_JSON:
        raise UsageError(f"{path} is too large for an OCI index or manifest")
    return data


def _parse_json(data: bytes, what: str) -> dict:
    try:
        out = json.loads(data)
    except ValueError:
        raise UsageError(f"{what} is not valid JSON") from None
    if not isinstance(out, dict):
        raise UsageError(f"{what} is not a JSON object")
    return out
