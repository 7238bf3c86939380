"""MNIST: find it, download it if asked, verify it, and parse it into uint8 arrays.

Every data problem (missing files, a truncated or foreign file, a checksum mismatch, a failed
download) is a :class:`DatasetError` whose message names the file, what was expected and what was
found, so the command line can print it as one line. The checksums are SHA-256 of the
*decompressed* IDX bytes: the same data may be gzipped in different ways (one of the copies in
``../shared/data/mnist`` was recompressed), so a hash of the ``.gz`` bytes would reject good files.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import os
import secrets
import shutil
import struct
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np


class DatasetError(Exception):
    """A dataset is missing, damaged, not what it claims to be, or could not be downloaded."""


DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "data"

# The original host no longer serves MNIST; these mirrors do, and are tried in this order.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# SHA-256 of the decompressed IDX bytes of each file, in the order load_mnist returns them.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# The decompressed size of each, which bounds what is read from a file that claims to be it.
SIZES = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}

DOWNLOAD_TIMEOUT_S = 30
IMAGE_SHAPE = (28, 28)
_IDX = {"images": (2051, 16), "labels": (2049, 8)}  # kind -> (magic number, header bytes)
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_FILES_TEXT = ("the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
               "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each gzipped (.gz) or raw")
_HINT = ("point at a folder holding the MNIST files with --data-dir DIR "
         "or the GPUNET_DATA environment variable")

# Tests replace this to serve canned responses; everything else goes through urllib.
_urlopen = urllib.request.urlopen


def load_mnist(root: str | os.PathLike | None = None, *, download: bool = True,
               progress: bool = False, verify: bool = True
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)`` as writable uint8 arrays.

    Shapes are (60000, 28, 28), (60000,), (10000, 28, 28), (10000,). Files missing from the data
    folder (see :func:`resolve_root`) are downloaded from :data:`MIRRORS` when ``download`` is true.
    ``verify=False`` skips the checksum of files already on disk, for tiny synthetic test files;
    downloaded files are always verified, since nothing unverified may land under a final name.
    """
    folder = resolve_root(root)
    given = _given_as(root)
    if given and not folder.is_dir():
        # A folder that was named explicitly and is not there is a mistake to report, not a place
        # to create and download into; only the project's own data/ is made on demand.
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise DatasetError(f"the data folder {folder} ({given}) {what}, so nothing was created or "
                           f"downloaded; {_HINT}: one holding {_FILES_TEXT}.")
    found = {name: _find(folder, name) for name in SHA256}
    missing = [name for name, path in found.items() if path is None]
    if missing and not download:
        where = f"{folder} (which does not exist)" if not folder.is_dir() else str(folder)
        raise DatasetError(
            f"MNIST not found in {where}: missing {', '.join(missing)} (looked for each as .gz or raw "
            f"IDX, e.g. {missing[0]}.gz or {_dotted(missing[0])}); {_HINT}, or allow downloading.")
    if missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(f"cannot create the data folder {folder}: {exc.strerror or exc}; "
                               f"{_HINT}.") from exc

    arrays = {}
    for name, path in found.items():
        if path is None:
            arrays[name], found[name] = _download(name, folder, progress), folder / f"{name}.gz"
        else:
            arrays[name] = _load_file(path, name, verify)
    for split in ("train", "t10k"):
        images, labels = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        if len(arrays[images]) != len(arrays[labels]):
            raise DatasetError(
                f"{found[images]}: {len(arrays[images])} images do not match the {len(arrays[labels])} "
                f"labels in {found[labels]}; each image needs exactly one label.")
    return tuple(arrays.values())


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$GPUNET_DATA`` if set, else the project's ``data/``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("GPUNET_DATA")
    return Path(env).expanduser() if env else DEFAULT_ROOT


def _given_as(root) -> str | None:
    """How the data folder was named explicitly (an argument, or GPUNET_DATA), or None for the default."""
    if root is not None:
        return "given explicitly"
    if os.environ.get("GPUNET_DATA"):
        return f"from GPUNET_DATA={os.environ['GPUNET_DATA']}"
    return None


def mnist_files(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The MNIST files present in the data folder, by name (those missing are left out)."""
    folder = resolve_root(root)
    found = {name: _find(folder, name) for name in SHA256}
    return {name: path for name, path in found.items() if path is not None}


def mnist_available(root: str | os.PathLike | None = None) -> bool:
    """Whether all four MNIST files are in the data folder (gzipped or raw, under any accepted name)."""
    folder = resolve_root(root)
    return all(_find(folder, name) is not None for name in SHA256)


def _find(folder: Path, name: str) -> Path | None:
    """The first of the accepted names for ``name`` that exists in ``folder``."""
    for candidate in (f"{name}.gz", name, f"{_dotted(name)}.gz", _dotted(name)):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _dotted(name: str) -> str:
    """The other common spelling, ``train-images.idx3-ubyte`` (e.g. from Kaggle's copy)."""
    return name.replace("-idx", ".idx")


def _kind(name: str) -> str:
    return "images" if "-images-" in name else "labels"


def _load_file(path: Path, name: str, verify: bool) -> np.ndarray:
    """Read, decompress, parse and (if asked) verify one file already in the data folder."""
    try:
        data = _read_idx_bytes(path, source=str(path), kind=_kind(name), name=name if verify else None)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read: {exc.strerror or exc}.") from exc
    array = parse_idx(data, kind=_kind(name), source=str(path))
    problem = _checksum_problem(data, name) if verify else None
    if problem:
        raise DatasetError(f"{path}: {problem}; the file is damaged or not the published MNIST {name}: "
                           f"delete it and run again to download a fresh copy.")
    return array


# --- Parsing ---------------------------------------------------------------------------------


def _read_idx_bytes(path: Path, *, source: str, kind: str, name: str | None = None) -> bytearray:
    """The IDX bytes of a file, decompressed if it is gzip, and never more than its header says.

    Gzip is recognised by its magic bytes rather than by the name, so a raw file named ``.gz`` or a
    gzip file without the suffix still loads. A bytearray lets the parsed arrays be writable views
    of it instead of 47 MB copies. The header is read first: a raw file longer than it declares
    (a 1 TiB sparse file, say) is refused from its size alone, and decompression stops one byte
    past the declared size (a gzip bomb inflates no further than that). With ``name`` the header
    must also declare the size of the published MNIST file, which bounds the read for any header.
    """
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(0)
        if head[:2] == _GZIP_MAGIC:
            return _gunzip(f, source=source, kind=kind, name=name)
        size = os.fstat(f.fileno()).st_size
        declared = _declared_size(head, kind, source, name)
        if declared is None:  # not an IDX header of this kind: parse_idx says what it is
            return bytearray(f.read(1024))
        count, expected = declared
        if size > expected:
            raise DatasetError(f"{source}: the header says {count} {kind}, which is {expected} "
                               f"bytes, but there are {size} bytes ({size - expected} trailing bytes).")
        data = bytearray(size)
        f.readinto(data)
    return data


def _declared_size(head: bytes, kind: str, source: str, name: str | None) -> tuple[int, int] | None:
    """(count, total bytes) that an IDX header of ``kind`` declares, or None if ``head`` is no
    such header; with ``name``, a count other than the published file's is a DatasetError."""
    magic, header_size = _IDX[kind]
    if len(head) < header_size or struct.unpack_from(">I", head)[0] != magic:
        return None
    count = struct.unpack_from(">I", head, 4)[0]
    # The header's own image size, so that parse_idx can name a wrong one (28x29, say).
    rows, cols = struct.unpack_from(">II", head, 8) if kind == "images" else (1, 1)
    item_size = rows * cols
    expected = header_size + count * item_size
    if name is not None and name in SIZES and expected != SIZES[name]:
        published = (SIZES[name] - header_size) // item_size
        raise DatasetError(f"{source}: the header says {count} {kind}, but the published MNIST "
                           f"{name} has {published}; the file is damaged or not MNIST.")
    return count, expected


def _gunzip(f, *, source: str, kind: str, name: str | None) -> bytearray:
    """Decompress every gzip member read from ``f`` into one bytearray, stopping one byte past
    the size that the decompressed IDX header declares.

    Feeding the input in chunks keeps a single growing output buffer, where ``gzip.decompress``
    would return immutable bytes that need one more full copy to become writable.
    """
    out = bytearray()
    header_size = _IDX[kind][1]
    limit = None          # the declared size, once the header has been decompressed
    inflater = None       # None between gzip members (pigz and friends may write several)
    pending = b""
    read = 0
    try:
        while True:
            if not pending:
                pending = f.read(_CHUNK)
                read += len(pending)
                if not pending:
                    break
            if inflater is None:
                inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            room = _CHUNK * 4 if limit is None else limit - len(out) + 1
            out += inflater.decompress(pending, room)
            pending = inflater.unconsumed_tail
            if inflater.eof:
                pending, inflater = inflater.unused_data, None
            if limit is None and len(out) >= header_size:
                declared = _declared_size(bytes(out[:header_size]), kind, source, name)
                if declared is None:  # not IDX: parse_idx names what it is from the start
                    return out
                count, limit = declared
            if limit is not None and len(out) > limit:
                raise DatasetError(
                    f"{source}: the header says {count} {kind}, which is {limit} bytes, but the "
                    f"gzip data decompresses to more; stopped reading there (a damaged file, or "
                    f"a gzip bomb).")
    except zlib.error as exc:
        raise DatasetError(f"{source}: the gzip data is corrupt ({exc}); "
                           f"expected a valid gzip stream.") from exc
    if inflater is not None:
        raise DatasetError(f"{source}: the gzip stream ends early after {read} bytes "
                           f"(a truncated file or an interrupted download).")
    return out


def parse_idx(data: bytes | bytearray, *, kind: str, source: str) -> np.ndarray:
    """Parse the bytes of an IDX file of MNIST ``kind`` ("images" or "labels").

    Images come back as (N, 28, 28) and labels as (N,), both uint8 views of ``data`` (writable when
    ``data`` is a bytearray). The header must say exactly how long the data is and labels must be
    digits, so a truncated, padded or foreign file fails here with a message naming ``source``
    rather than training on garbage.
    """
    if kind not in _IDX:
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")
    magic, header_size = _IDX[kind]
    head = bytes(data[:1024]).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"<"):  # covers <!DOCTYPE and <html
        raise DatasetError(f"{source}: found an HTML page where IDX/gzip data was expected "
                           f"(a proxy, login or error page rather than the MNIST file).")
    found = struct.unpack_from(">I", data)[0] if len(data) >= 4 else magic
    if found != magic:
        raise DatasetError(f"{source}: {_magic_problem(found, kind)}")
    if len(data) < header_size:
        raise DatasetError(f"{source}: {len(data)} bytes is too short for an IDX {kind} file, "
                           f"whose header alone is {header_size} bytes.")
    if kind == "images":
        count, rows, cols = struct.unpack_from(">III", data, 4)
        if (rows, cols) != IMAGE_SHAPE:
            raise DatasetError(f"{source}: images are {rows}x{cols}, expected 28x28 for MNIST.")
        item_size = rows * cols
    else:
        (count,) = struct.unpack_from(">I", data, 4)
        item_size = 1

    expected = header_size + count * item_size
    if len(data) != expected:
        what = "truncated" if len(data) < expected else f"{len(data) - expected} trailing bytes"
        raise DatasetError(f"{source}: the header says {count} {kind}, which is {expected} bytes, "
                           f"but there are {len(data)} bytes ({what}).")
    array = np.frombuffer(data, np.uint8, count=count * item_size, offset=header_size)
    if kind == "images":
        return array.reshape(count, *IMAGE_SHAPE)
    bad = np.flatnonzero(array > 9)
    if bad.size:
        raise DatasetError(f"{source}: label {array[bad[0]]} at index {bad[0]} is not a digit 0..9 "
                           f"({bad.size} such labels in all).")
    return array


def _magic_problem(found: int, kind: str) -> str:
    """Why a magic number is wrong, as specifically as can be said."""
    magic = _IDX[kind][0]
    if found == int.from_bytes(magic.to_bytes(4, "big"), "little"):
        return (f"the IDX header is little-endian (magic number reads as {found:#010x}, expected "
                f"{magic:#010x}); IDX is big-endian, so the file was written with the wrong byte order.")
    other = "labels" if kind == "images" else "images"
    if found == _IDX[other][0]:
        return (f"holds IDX {other} (magic number {found}) where {kind} (magic number {magic}) "
                f"were expected.")
    return (f"not an IDX {kind} file: the magic number is {found:#010x}, "
            f"expected {magic:#010x} ({magic}).")


# --- Verification ----------------------------------------------------------------------------


def _checksum_problem(data: bytes | bytearray, name: str) -> str | None:
    """What is wrong with the SHA-256 of ``data`` for MNIST file ``name``, or None if it matches."""
    actual = hashlib.sha256(data).hexdigest()
    expected = SHA256[name]
    if actual == expected:
        return None
    return f"the SHA-256 of the decompressed data is {actual}, expected {expected}"


# --- Download --------------------------------------------------------------------------------


def _download(name: str, folder: Path, progress: bool) -> np.ndarray:
    """Fetch ``<mirror><name>.gz`` from the first mirror that serves verified data.

    Each attempt writes a temporary ``.part`` file beside the final one and renames it into place
    only after it parsed and verified, so an interrupted or bad download never sits under the name
    that the next run would trust.
    """
    final = folder / f"{name}.gz"
    for stale in folder.glob(f"{final.name}.{'?' * 8}.part"):  # left by a download killed -9
        stale.unlink(missing_ok=True)
    failures = []
    for mirror in MIRRORS:
        url = f"{mirror}{name}.gz"
        part = _new_part_file(folder, final.name)
        try:
            if progress:
                print(f"downloading {url} -> {final}", file=sys.stdout, flush=True)
            try:
                array = _fetch(url, part, name)
            except (OSError, http.client.HTTPException, ValueError, DatasetError) as exc:
                failures.append(_failure(url, exc))
                continue
            os.replace(part, final)
            return array
        finally:
            part.unlink(missing_ok=True)  # a no-op after a successful replace
    raise DatasetError(f"could not download {final.name} into {folder}, where the MNIST files were looked "
                       f"for: {'; '.join(failures)}. If you have the files, {_HINT}.")


def _new_part_file(folder: Path, final_name: str) -> Path:
    """A fresh, empty ``<final_name>.<random>.part`` file in ``folder``.

    Unlike ``tempfile.mkstemp`` (mode 0600) it gets the umask's usual permissions, which the
    final file keeps after the rename.
    """
    part = folder / f"{final_name}.{secrets.token_hex(4)}.part"
    try:
        part.touch(exist_ok=False)
    except OSError as exc:
        raise DatasetError(f"cannot write into the data folder {folder}: {exc.strerror or exc}; "
                           f"{_HINT}.") from exc
    return part


def _fetch(url: str, part: Path, name: str) -> np.ndarray:
    """Download ``url`` into ``part`` and return its parsed array once it verified."""
    with _urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
        shutil.copyfileobj(response, out, _CHUNK)
    data = _read_idx_bytes(part, source=url, kind=_kind(name), name=name)
    array = parse_idx(data, kind=_kind(name), source=url)
    problem = _checksum_problem(data, name)
    if problem:
        raise DatasetError(f"{url}: {problem}")
    return array


def _failure(url: str, exc: Exception) -> str:
    """One mirror's failure in a few words; DatasetError messages already start with the URL."""
    if isinstance(exc, DatasetError):
        return str(exc).rstrip(".")
    if isinstance(exc, urllib.error.HTTPError):
        return f"{url}: HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{url}: {exc.reason}"
    return f"{url}: {str(exc) or type(exc).__name__}"
