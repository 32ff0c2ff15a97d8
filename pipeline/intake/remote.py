"""Remote inputs: a manifest at `s3://...` and the images it names, fetched to a local cache.

The rest of the pipeline reads local files only. `localize_manifest` turns a manifest given as a
URI (or a local manifest that names `s3://` images) into a local manifest whose every file
reference is a local path:

- the manifest itself is downloaded (at most `remote_max_manifest_bytes`);
- each reference in `image`, `mask` and `markup` is resolved: a URI as it is; a relative path
  against the manifest's own location (so `img/a.png` in `s3://b/m/x.csv` is `s3://b/m/img/a.png`);
- each remote file is downloaded (at most `remote_max_image_bytes`) into a content-addressed
  cache, `EDITBATCH_HOME/remote-cache/objects/<sha256>/<name>`, once per URI and ETag;
- `LocalManifest.read` reads the manifest (the one reader, `pipeline.intake.manifest`) with
  each such reference mapped to its cached copy; the manifest file is never rewritten, so its
  columns, rows and row numbers are the ones the person wrote.

Only the schemes in `remote_schemes` (default `file`, `s3`) are read. A reference that cannot be
fetched (scheme not allowed, too large, missing) does not stop the batch: its row is rejected
with the reason, through the `Preflight` that `LocalManifest.preflight` builds. A remote
manifest cannot name local files: preflight's allowed folder for it is the cache alone.

Exceptions (in `pipeline.errors`): RemoteError (names the URI and what to do), with
SchemeNotAllowed (its scheme is not in `remote_schemes`) and TooLarge (over the limit).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec

from pipeline.errors import ManifestError, RemoteError, RowError, SchemeNotAllowed, TooLarge
from pipeline.files import write_atomic
from pipeline.intake.manifest import Defaults, iter_raw_rows, read_manifest, references
from pipeline.intake.preflight import Preflight, PreflightOptions, PreflightResult
from pipeline.settings import Settings
from pipeline.spec import EditSpec

__all__ = [
    "DEFAULT_SCHEMES",
    "MAX_IMAGE_BYTES",
    "MAX_MANIFEST_BYTES",
    "LocalManifest",
    "RemoteOptions",
    "exists",
    "fetch",
    "is_remote",
    "localize",
    "localize_manifest",
    "scheme_of",
]

DEFAULT_SCHEMES = ("file", "s3")
MAX_IMAGE_BYTES = 50_000_000
MAX_MANIFEST_BYTES = 200_000_000
CACHE_FOLDER = "remote-cache"
_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class RemoteOptions:
    """Where fetched files go, which schemes may be read, and how much."""

    cache_dir: Path
    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_manifest_bytes: int = MAX_MANIFEST_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteOptions:
        return cls(
            cache_dir=settings.home.resolve() / CACHE_FOLDER,
            schemes=tuple(s.lower() for s in settings.remote_schemes),
            max_image_bytes=settings.remote_max_image_bytes,
            max_manifest_bytes=settings.remote_max_manifest_bytes,
        )


@dataclass(frozen=True)
class LocalManifest:
    """A manifest every file reference of which is local, and what preflight must allow."""

    path: Path  # the manifest to read: the original, or its downloaded copy
    source: str  # the manifest as given: a URI or a local path
    roots: tuple[Path, ...]  # folders its files are in (for PreflightOptions.allowed_roots)
    problems: Mapping[str, str] = field(default_factory=dict)  # URI -> why it was not fetched
    fetched: int = 0  # files downloaded (not found in the cache)
    refs: Mapping[str, str] = field(default_factory=dict)  # reference as written -> local file

    @property
    def changed(self) -> bool:
        """Whether anything had to be fetched or refused (else the manifest is read as it is)."""
        return str(self.path) != self.source or bool(self.refs)

    def read(self, defaults: Defaults) -> Iterator[EditSpec | RowError]:
        """The manifest's rows, with every file reference pointing at a local file."""
        return read_manifest(self.path, defaults, self.refs)

    def preflight(self, options: PreflightOptions) -> Preflight:
        """A Preflight that also rejects rows naming a file that could not be fetched."""
        return _FetchAwarePreflight(options, self.problems)


class _FetchAwarePreflight(Preflight):
    """Reports why a reference was not fetched instead of "remote address" for its row."""

    def __init__(self, options: PreflightOptions, problems: Mapping[str, str]) -> None:
        super().__init__(options)
        self._problems = problems

    def check(self, spec: EditSpec) -> PreflightResult:
        result = super().check(spec)
        refs = [("image", p) for p in spec.images] + [
            (name, p) for name, p in (("mask", spec.mask), ("markup", spec.markup)) if p
        ]
        failed = [(name, uri) for name, uri in refs if uri in self._problems]
        if not failed:
            return result
        errors = [e for e in result.errors if not any(uri in e.reason for _, uri in failed)]
        errors += [
            RowError(spec.row, name, f"{uri}: {self._problems[uri]}", spec.key)
            for name, uri in failed
        ]
        return replace(result, spec=None, errors=tuple(errors))


# --- single files -----------------------------------------------------------------------------


def scheme_of(ref: str) -> str:
    """`s3` for `s3://b/k`; `file` for a plain path or a `file://` URI."""
    head, sep, _ = ref.partition("://")
    return head.lower() if sep else "file"


def is_remote(ref: str) -> bool:
    return scheme_of(ref) != "file"


def check_scheme(uri: str, options: RemoteOptions) -> None:
    scheme = scheme_of(uri)
    if scheme not in options.schemes:
        raise SchemeNotAllowed(
            f"{uri}: scheme '{scheme}' is not allowed (allowed: {', '.join(options.schemes)}); "
            "add it to EDITBATCH_REMOTE_SCHEMES if this source is trusted"
        )


def _file_path(uri: str) -> str:
    """The local path of a `file://` URI (or of a plain path)."""
    return unquote(urlsplit(uri).path) if "://" in uri else uri


def exists(uri: str) -> bool:
    """Whether a file is at `uri` (a path or any fsspec URI); False when it cannot be asked."""
    if not is_remote(uri):
        return Path(_file_path(uri)).is_file()
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        return bool(fs.isfile(path))
    except (OSError, ValueError, ImportError):
        return False


def _name(uri: str) -> str:
    """A safe file name for the cached copy that keeps the extension (formats go by it)."""
    base = posixpath.basename(urlsplit(uri).path.rstrip("/")) or "file"
    return _SAFE_NAME.sub("_", unquote(base)).lstrip(".") or "file"


def _etag(info: Mapping[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "checksum"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    return None


def fetch(uri: str, options: RemoteOptions, max_bytes: int, what: str = "file") -> Path:
    """Download `uri` into the cache (once per URI and ETag); the local copy's path.

    Refuses a scheme not allowed and more than `max_bytes` (checked from the listing first, and
    again while reading, in case the object changed in between).
    """
    return _fetch(uri, options, max_bytes, what)[0]


def _fetch(uri: str, options: RemoteOptions, max_bytes: int, what: str) -> tuple[Path, bool]:
    """`fetch`, and whether the file was downloaded (False: it was in the cache)."""
    check_scheme(uri, options)
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise RemoteError(f"{uri}: not found") from exc
    except ImportError as exc:
        raise RemoteError(f"{uri}: no fsspec driver for '{scheme_of(uri)}' ({exc})") from exc
    except Exception as exc:  # fsspec backends raise their own types (botocore, aiohttp)
        raise RemoteError(f"{uri}: cannot read: {exc}") from exc
    if info.get("type") == "directory":
        raise RemoteError(f"{uri}: is a folder, not a file")
    size = info.get("size")
    if isinstance(size, int) and size > max_bytes:
        raise TooLarge(_too_large(uri, what, size, max_bytes))

    index = options.cache_dir / "index" / (hashlib.sha256(uri.encode()).hexdigest() + ".json")
    etag = _etag(info)
    cached = _from_index(options, index, etag, size)
    if cached is not None:
        return cached, False

    tmp_dir = options.cache_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=tmp_dir)
    try:
        total = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with fs.open(path, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        total += len(chunk)
                        if total > max_bytes:
                            raise TooLarge(_too_large(uri, what, total, max_bytes, "over"))
                        digest.update(chunk)
                        out.write(chunk)
            except RemoteError:
                raise
            except Exception as exc:
                raise RemoteError(f"{uri}: download failed: {exc}") from exc
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        target = options.cache_dir / "objects" / sha / _name(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if etag is not None:
        write_atomic(
            index,
            json.dumps({"uri": uri, "etag": etag, "size": total, "path": str(target)}).encode(),
        )
    return target, True


def _too_large(uri: str, what: str, size: int, limit: int, qualifier: str = "") -> str:
    amount = f"{qualifier} {size:,}".strip()
    return (
        f"{uri}: {what} is {amount} bytes, over the {limit:,}-byte limit for remote "
        f"{what}s; make it smaller or raise EDITBATCH_REMOTE_MAX_{what.upper()}_BYTES"
    )


def _from_index(options: RemoteOptions, index: Path, etag: str | None, size: object) -> Path | None:
    if etag is None:
        return None
    try:
        entry = json.loads(index.read_text())
        cached = Path(entry["path"])
        fresh = entry["etag"] == etag and entry["size"] == size
        if fresh and cached.stat().st_size == size and options.cache_dir in cached.parents:
            return cached
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# --- manifests --------------------------------------------------------------------------------


class _Resolver:
    """Maps one file reference of the manifest to the local file to read instead (or to a URI
    that preflight refuses with the reason, for one that could not be fetched)."""

    def __init__(self, source: str, options: RemoteOptions) -> None:
        self.options = options
        self.remote = is_remote(source)
        self.base = source.rsplit("/", 1)[0]  # s3://bucket/folder (remote manifests)
        self.local_base = Path(_file_path(source)).resolve().parent  # (local manifests)
        self.done: dict[str, str] = {}
        self.refs: dict[str, str] = {}  # only references that do not stay as written
        self.problems: dict[str, str] = {}
        self.fetched = 0
        self.any_remote = False

    def _refuse(self, uri: str, reason: str) -> str:
        # Written back as a URI: preflight rejects "://" references, and the Preflight from
        # LocalManifest.preflight gives this reason for the row.
        shown = uri if "://" in uri else f"file://{uri}"
        self.problems[shown] = reason
        return shown

    def __call__(self, ref: str) -> str:
        ref = ref.strip()
        if not ref:
            return ref
        uri, refusal = self._absolute(ref)
        if uri not in self.done:
            self.done[uri] = self._refuse(uri, refusal) if refusal else self._local(uri)
        local = self.done[uri]
        if self.remote or refusal or is_remote(uri):
            self.refs[ref] = local
        return local

    def _absolute(self, ref: str) -> tuple[str, str | None]:
        """The reference as a URI or an absolute local path, and why it is refused, if it is."""
        if not self.remote:
            if is_remote(ref):
                return ref, None
            if "file" not in self.options.schemes:
                allowed = ", ".join(self.options.schemes)
                return ref, f"scheme 'file' is not allowed (allowed: {allowed})"
            return str((self.local_base / _file_path(ref)).resolve()), None
        if is_remote(ref):
            return ref, None
        if "://" in ref or ref.startswith("/"):
            return ref, "a remote manifest cannot name local files"
        scheme, _, base = self.base.partition("://")
        joined = posixpath.normpath(posixpath.join(base, ref))
        bucket = base.split("/", 1)[0]
        if not joined.startswith(bucket + "/"):
            return f"{scheme}://{joined}", f"{ref!r} climbs out of {bucket}"
        return f"{scheme}://{joined}", None

    def _local(self, uri: str) -> str:
        """The local path to write for `uri`, fetching it when it is remote."""
        if not is_remote(uri):
            return uri
        self.any_remote = True
        try:
            path, downloaded = _fetch(uri, self.options, self.options.max_image_bytes, "image")
        except RemoteError as exc:
            return self._refuse(uri, str(exc).removeprefix(f"{uri}: "))
        self.fetched += downloaded
        return str(path)


def localize(source: str | Path, options: RemoteOptions) -> LocalManifest:
    """The local manifest for `source` (a path or URI), fetching what it names; see module doc."""
    source = str(source)
    check_scheme(source, options)
    remote = is_remote(source)
    if remote:
        manifest_file = fetch(source, options, options.max_manifest_bytes, what="manifest")
    else:
        manifest_file = Path(_file_path(source))
        if not manifest_file.is_file():
            raise ManifestError(f"{source}: manifest not found")
    resolver = _Resolver(source, options)
    try:
        for _, raw in iter_raw_rows(manifest_file):
            if not isinstance(raw, RowError):
                for ref in references(raw):
                    resolver(ref)
    except ManifestError:
        pass  # an unreadable manifest: the manifest reader says what is wrong with it
    roots: tuple[Path, ...] = (manifest_file.resolve().parent,)
    if remote:
        roots = (options.cache_dir.resolve(),)
    elif resolver.any_remote or resolver.problems:
        roots = (*roots, options.cache_dir.resolve())
    return LocalManifest(
        manifest_file, source, roots, dict(resolver.problems), resolver.fetched, resolver.refs
    )


def localize_manifest(uri: str | Path, settings: Settings) -> LocalManifest:
    """`localize` with the cache folder, schemes and limits from settings."""
    return localize(uri, RemoteOptions.from_settings(settings))
