"""MNIST, Fashion-MNIST and KMNIST: find them, download them if asked, verify them, and parse
them into uint8 arrays.

The three datasets share one format and one set of file names (``train-images-idx3-ubyte`` and
so on, 60,000 + 10,000 images of 28x28 grey levels, 10 classes), so a folder holds one of them,
and the checksums tell them apart: loading one dataset from a folder that holds another fails
with a message that says which dataset the files are.

Where the files are looked for (:func:`resolve_root`): the folder named by ``root`` (train.py's
``--data-dir``), else by ``$GPUNET_DATA``. If that folder has a subfolder named after the dataset
(``mnist/``, ``fashion-mnist/``, ``kmnist/``), the subfolder is used; if it has one named after
another dataset, it is a collection of datasets, and this one lives (or is downloaded) in its own
subfolder too; otherwise the folder itself holds the files. With nothing named, the default is
the project's ``data/<name>/``, except that MNIST keeps its original home, ``data/`` itself
(unless ``data/mnist/`` exists).

Every data problem (missing files, a truncated or foreign file, a checksum mismatch, a failed
download) is a :class:`DatasetError` whose message names the file, what was expected and what was
found, so the command line can print it as one line.

Verification. MNIST and Fashion-MNIST are checked by the SHA-256 of the *decompressed* IDX bytes:
the same data may be gzipped in different ways (one of the MNIST copies in ``../shared/data`` and
all of the Fashion-MNIST ones were recompressed), so a hash of the ``.gz`` bytes would reject good
files. For KMNIST no checksum of the decompressed data is known here: its publishers list the MD5
of each ``.gz`` file, so a KMNIST file is verified only when it is the published ``.gz``, byte for
byte; a raw or recompressed copy cannot be verified and is refused, saying so (``verify=False``
loads it unverified). Whatever ``verify`` says, a file whose checksum is that of another
dataset's published file is refused, naming that dataset.
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


DATASETS = ("mnist", "fashion-mnist", "kmnist")
TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "kmnist": "KMNIST"}
# The class of each label, in label order.
CLASSES = {
    "mnist": tuple("0123456789"),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
}
# The four files of each dataset, in the order load_dataset returns their arrays.
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "data"

# Where each dataset is downloaded from, tried in this order. The original MNIST host no longer
# serves it; these mirrors do. Fashion-MNIST's and KMNIST's are the locations their authors name.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
KMNIST_MIRRORS = ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",)

# SHA-256 of the decompressed IDX bytes of each MNIST file.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The same for Fashion-MNIST (Zalando Research), computed from the published files' content.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# KMNIST (rois-codh): the MD5 of each published .gz file, as its publishers and torchvision's
# datasets.KMNIST list them. No checksum of the decompressed data is known here.
KMNIST_GZ_MD5 = {
    "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
    "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
    "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
    "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134",
}

# The decompressed size of each file (the same in all three datasets), which bounds what is read
# from a file that claims to be it.
SIZES = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}

DOWNLOAD_TIMEOUT_S = 30
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
_IDX = {"images": (2051, 16), "labels": (2049, 8)}  # kind -> (magic number, header bytes)
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_FILES_TEXT = ("the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
               "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each gzipped (.gz) or raw")
_UNVERIFIED = "load it unverified with verify=False (train.py: --no-verify-data)"

# Tests replace this to serve canned responses; everything else goes through urllib.
_urlopen = urllib.request.urlopen


def _mirrors(name: str) -> tuple[str, ...]:
    # Looked up when asked, so that a test may replace a module-level table.
    return {"mnist": MIRRORS, "fashion-mnist": FASHION_MNIST_MIRRORS,
            "kmnist": KMNIST_MIRRORS}[name]


def _sha256_table(name: str) -> dict | None:
    return {"mnist": SHA256, "fashion-mnist": FASHION_MNIST_SHA256}.get(name)


def _gz_md5_table(name: str) -> dict | None:
    return {"kmnist": KMNIST_GZ_MD5}.get(name)


def _hint(name: str) -> str:
    return (f"point at a folder holding the {TITLES[name]} files with --data-dir DIR "
            "or the GPUNET_DATA environment variable")


def _check_name(name) -> None:
    if name not in DATASETS:
        raise ValueError(f"name must be one of {', '.join(DATASETS)}, got {name!r}")


def load_dataset(name: str, root: str | os.PathLike | None = None, *, download: bool = True,
                 progress: bool = False, verify: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)`` of dataset ``name`` (one of
    :data:`DATASETS`) as writable uint8 arrays.

    Shapes are (60000, 28, 28), (60000,), (10000, 28, 28), (10000,). The files are looked for as
    :func:`resolve_root` says (a folder named by ``root`` or ``$GPUNET_DATA``, or its subfolder
    named ``name``); those missing are downloaded from the dataset's mirrors when ``download``
    is true. ``verify=False`` skips the check against the published checksums of files already
    on disk (for tiny synthetic test files, or a KMNIST copy that cannot be verified), but a file
    recognised as another dataset's is still refused; downloaded files are always verified,
    since nothing unverified may land under a final name.
    """
    _check_name(name)
    title = TITLES[name]
    folder, base, given = _locate(root, name)
    if given and not base.is_dir():
        # A folder that was named explicitly and is not there is a mistake to report, not a place
        # to create and download into; only the project's own data/ is made on demand (and a
        # dataset's subfolder of a folder that exists).
        what = "does not exist" if not base.exists() else "is not a folder"
        raise DatasetError(f"the data folder {base} ({given}) {what}, so nothing was created or "
                           f"downloaded; {_hint(name)}: one holding {_FILES_TEXT}.")
    found = {file: _find(folder, file) for file in FILES}
    missing = [file for file, path in found.items() if path is None]
    if missing and not download:
        where = f"{folder} (which does not exist)" if not folder.is_dir() else str(folder)
        raise DatasetError(
            f"{title} not found in {where}: missing {', '.join(missing)} (looked for each as .gz or "
            f"raw IDX, e.g. {missing[0]}.gz or {_dotted(missing[0])}); {_hint(name)}, or allow "
            "downloading.")
    created = [d for d in (folder, *folder.parents) if not d.exists()] if missing else []
    if missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(f"cannot create the data folder {folder}: {exc.strerror or exc}; "
                               f"{_hint(name)}.") from exc

    arrays = {}
    try:
        for file, path in found.items():
            if path is None:
                arrays[file] = _download(name, file, folder, progress)
                found[file] = folder / f"{file}.gz"
            else:
                arrays[file] = _load_file(path, file, name, verify)
    except BaseException:
        _remove_if_empty(created)  # a failed download leaves no empty folder of its own behind
        raise
    for split in ("train", "t10k"):
        images, labels = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        if len(arrays[images]) != len(arrays[labels]):
            raise DatasetError(
                f"{found[images]}: {len(arrays[images])} images do not match the {len(arrays[labels])} "
                f"labels in {found[labels]}; each image needs exactly one label.")
    return tuple(arrays.values())


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) that are empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def load_mnist(root: str | os.PathLike | None = None, *, download: bool = True,
               progress: bool = False, verify: bool = True
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``load_dataset("mnist", ...)``: MNIST's ``(x_train, y_train, x_test, y_test)``."""
    return load_dataset("mnist", root, download=download, progress=progress, verify=verify)


def resolve_root(root: str | os.PathLike | None = None, *, dataset: str = "mnist") -> Path:
    """The folder that holds (or will hold) ``dataset``'s files.

    The folder named by ``root`` if given, else by ``$GPUNET_DATA`` if set; in it, the subfolder
    named after the dataset when there is one, or when the folder is a collection (it has a
    subfolder named after another dataset); else the named folder itself. With nothing named:
    ``data/<dataset>/`` in the project, except MNIST's ``data/`` (unless ``data/mnist/`` exists).
    """
    _check_name(dataset)
    return _locate(root, dataset)[0]


def _locate(root, name: str) -> tuple[Path, Path, str | None]:
    """(the dataset's folder, the folder that was named or the default, how it was named)."""
    given = _given_as(root)
    if given is None:
        own = DEFAULT_ROOT / name
        legacy = name == "mnist" and not own.is_dir()  # MNIST's home before there were others
        return (DEFAULT_ROOT if legacy else own), DEFAULT_ROOT, None
    base = Path(root if root is not None else os.environ["GPUNET_DATA"]).expanduser()
    own = base / name
    collection = any((base / other).is_dir() for other in DATASETS if other != name)
    return (own if own.is_dir() or collection else base), base, given


def _given_as(root) -> str | None:
    """How the data folder was named explicitly (an argument, or GPUNET_DATA), or None for the default."""
    if root is not None:
        return "given explicitly"
    if os.environ.get("GPUNET_DATA"):
        return f"from GPUNET_DATA={os.environ['GPUNET_DATA']}"
    return None


def dataset_files(name: str, root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The files of dataset ``name`` present in its folder, by name (those missing are left out)."""
    folder = resolve_root(root, dataset=name)
    found = {file: _find(folder, file) for file in FILES}
    return {file: path for file, path in found.items() if path is not None}


def dataset_available(name: str, root: str | os.PathLike | None = None) -> bool:
    """Whether all four files of dataset ``name`` are in its folder (gzipped or raw, under any
    accepted name). Their content is not read: which dataset they hold is checked on loading."""
    return len(dataset_files(name, root)) == len(FILES)


def mnist_files(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The MNIST files present in the data folder, by name (those missing are left out)."""
    return dataset_files("mnist", root)


def mnist_available(root: str | os.PathLike | None = None) -> bool:
    """Whether all four MNIST files are in the data folder (gzipped or raw, under any accepted name)."""
    return dataset_available("mnist", root)


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


def _load_file(path: Path, file: str, dataset: str, verify: bool) -> np.ndarray:
    """Read, decompress, parse and check one file already in the data folder: always that it is
    not another dataset's, and (if ``verify``) that it is the published file of ``dataset``."""
    try:
        data = _read_idx_bytes(path, source=str(path), kind=_kind(file),
                               name=file if verify else None, title=TITLES[dataset])
        array = parse_idx(data, kind=_kind(file), source=str(path))
        problem = _verification_problem(data, file, dataset, verify, lambda: _gz_md5_of(path))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read: {exc.strerror or exc}.") from exc
    if problem:
        what, advice = problem
        raise DatasetError(f"{path}: {what}; {advice}.")
    return array


# --- Parsing ---------------------------------------------------------------------------------


def _read_idx_bytes(path: Path, *, source: str, kind: str, name: str | None = None,
                    title: str = "MNIST") -> bytearray:
    """The IDX bytes of a file, decompressed if it is gzip, and never more than its header says.

    Gzip is recognised by its magic bytes rather than by the name, so a raw file named ``.gz`` or a
    gzip file without the suffix still loads. A bytearray lets the parsed arrays be writable views
    of it instead of 47 MB copies. The header is read first: a raw file longer than it declares
    (a 1 TiB sparse file, say) is refused from its size alone, and decompression stops one byte
    past the declared size (a gzip bomb inflates no further than that). With ``name`` the header
    must also declare the size of the published file (``title``'s, the same in all three
    datasets), which bounds the read for any header.
    """
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(0)
        if head[:2] == _GZIP_MAGIC:
            return _gunzip(f, source=source, kind=kind, name=name, title=title)
        size = os.fstat(f.fileno()).st_size
        declared = _declared_size(head, kind, source, name, title)
        if declared is None:  # not an IDX header of this kind: parse_idx says what it is
            return bytearray(f.read(1024))
        count, expected = declared
        if size > expected:
            raise DatasetError(f"{source}: the header says {count} {kind}, which is {expected} "
                               f"bytes, but there are {size} bytes ({size - expected} trailing bytes).")
        data = bytearray(size)
        f.readinto(data)
    return data


def _declared_size(head: bytes, kind: str, source: str, name: str | None,
                   title: str = "MNIST") -> tuple[int, int] | None:
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
        raise DatasetError(f"{source}: the header says {count} {kind}, but the published {title} "
                           f"{name} has {published}; the file is damaged or not {title}.")
    return count, expected


def _gunzip(f, *, source: str, kind: str, name: str | None, title: str = "MNIST") -> bytearray:
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
                declared = _declared_size(bytes(out[:header_size]), kind, source, name, title)
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
    """Parse the bytes of an IDX file of ``kind`` ("images" or "labels") in MNIST's format.

    Images come back as (N, 28, 28) and labels as (N,), both uint8 views of ``data`` (writable when
    ``data`` is a bytearray). The header must say exactly how long the data is and labels must be
    classes 0..9, so a truncated, padded or foreign file fails here with a message naming ``source``
    rather than training on garbage.
    """
    if kind not in _IDX:
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")
    magic, header_size = _IDX[kind]
    head = bytes(data[:1024]).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"<"):  # covers <!DOCTYPE and <html
        raise DatasetError(f"{source}: found an HTML page where IDX/gzip data was expected "
                           f"(a proxy, login or error page rather than the data file).")
    found = struct.unpack_from(">I", data)[0] if len(data) >= 4 else magic
    if found != magic:
        raise DatasetError(f"{source}: {_magic_problem(found, kind)}")
    if len(data) < header_size:
        raise DatasetError(f"{source}: {len(data)} bytes is too short for an IDX {kind} file, "
                           f"whose header alone is {header_size} bytes.")
    if kind == "images":
        count, rows, cols = struct.unpack_from(">III", data, 4)
        if (rows, cols) != IMAGE_SHAPE:
            raise DatasetError(f"{source}: images are {rows}x{cols}, expected 28x28 (MNIST's format).")
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
    bad = np.flatnonzero(array >= NUM_CLASSES)
    if bad.size:
        raise DatasetError(f"{source}: label {array[bad[0]]} at index {bad[0]} is not a class "
                           f"0..{NUM_CLASSES - 1} ({bad.size} such labels in all).")
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


def _verification_problem(data: bytes | bytearray, file: str, dataset: str, verify: bool,
                          gz_md5) -> tuple[str, str] | None:
    """(what is wrong, what to do about it) when ``data``, the decompressed bytes of ``file``,
    is not to be used as ``dataset``'s, or None. ``gz_md5()`` gives the MD5 of the file's
    ``.gz`` bytes (None for a raw file); it is only called when the SHA-256 did not settle it.

    A file whose checksum is another dataset's published one is refused whatever ``verify``
    says: it is what a folder holding the wrong dataset gives, and training on it would be a
    silent wrong answer. With ``verify``, anything but ``dataset``'s published file is refused.
    """
    title = TITLES[dataset]
    sha = hashlib.sha256(data).hexdigest()
    expected = (_sha256_table(dataset) or {}).get(file)
    if sha == expected:
        return None
    md5 = gz_md5()
    other = _identify(file, sha, md5)
    if other == dataset:  # KMNIST, by the MD5 of the published .gz
        return None
    if other is not None:
        return (f"this is {TITLES[other]}'s {file} (its checksum is the published one), not "
                f"{title}'s: the folder holds {TITLES[other]}",
                f"ask for --dataset {other}, or point --data-dir or GPUNET_DATA at the {title} "
                f"files (or at a folder with a {dataset}/ subfolder)")
    if not verify:
        return None
    if expected is not None:
        return (f"the SHA-256 of the decompressed data is {sha}, expected {expected}",
                f"the file is damaged or not the published {title} {file}: delete it and run "
                "again to download a fresh copy")
    published = _gz_md5_table(dataset)[file]
    why = (f"{title} is verified by the published MD5 of its .gz files alone (no checksum of its "
           f"decompressed data is known to gpunet), so a raw or recompressed copy cannot be "
           f"verified")
    advice = (f"put the published {file}.gz in its place (or delete it, and it is downloaded "
              f"and verified), or, trusting the copy, {_UNVERIFIED}")
    if md5 is None:
        return f"this raw (not gzipped) file cannot be verified as {title}'s {file}: {why}", advice
    return (f"the MD5 of this .gz file is {md5}, but the published {title} {file}.gz has "
            f"{published}: the file is damaged, recompressed or not {title}; {why}", advice)


def _identify(file: str, sha: str, md5: str | None) -> str | None:
    """The dataset whose published ``file`` has this SHA-256 (of the decompressed bytes) or this
    MD5 (of the .gz bytes), or None."""
    for name in DATASETS:
        if (_sha256_table(name) or {}).get(file) == sha:
            return name
        if md5 is not None and (_gz_md5_table(name) or {}).get(file) == md5:
            return name
    return None


def _gz_md5_of(path: Path) -> str | None:
    """The MD5 of the file's bytes if it is gzip (recognised by content), else None."""
    with open(path, "rb") as f:
        if f.read(2) != _GZIP_MAGIC:
            return None
        f.seek(0)
        digest = hashlib.md5(usedforsecurity=False)
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- Download --------------------------------------------------------------------------------


def _download(dataset: str, name: str, folder: Path, progress: bool) -> np.ndarray:
    """Fetch ``<mirror><name>.gz`` from the first of ``dataset``'s mirrors that serves verified
    data.

    Each attempt writes a temporary ``.part`` file beside the final one and renames it into place
    only after it parsed and verified, so an interrupted or bad download never sits under the name
    that the next run would trust.
    """
    final = folder / f"{name}.gz"
    for stale in folder.glob(f"{final.name}.{'?' * 8}.part"):  # left by a download killed -9
        stale.unlink(missing_ok=True)
    failures = []
    for mirror in _mirrors(dataset):
        url = f"{mirror}{name}.gz"
        part = _new_part_file(folder, final.name, dataset)
        try:
            if progress:
                print(f"downloading {url} -> {final}", file=sys.stdout, flush=True)
            try:
                array = _fetch(url, part, name, dataset)
            except (OSError, http.client.HTTPException, ValueError, DatasetError) as exc:
                failures.append(_failure(url, exc))
                continue
            os.replace(part, final)
            return array
        finally:
            part.unlink(missing_ok=True)  # a no-op after a successful replace
    raise DatasetError(f"could not download {final.name} into {folder}, where the {TITLES[dataset]} "
                       f"files were looked for: {'; '.join(failures)}. If you have the files, "
                       f"{_hint(dataset)}.")


def _new_part_file(folder: Path, final_name: str, dataset: str) -> Path:
    """A fresh, empty ``<final_name>.<random>.part`` file in ``folder``.

    Unlike ``tempfile.mkstemp`` (mode 0600) it gets the umask's usual permissions, which the
    final file keeps after the rename.
    """
    part = folder / f"{final_name}.{secrets.token_hex(4)}.part"
    try:
        part.touch(exist_ok=False)
    except OSError as exc:
        raise DatasetError(f"cannot write into the data folder {folder}: {exc.strerror or exc}; "
                           f"{_hint(dataset)}.") from exc
    return part


def _fetch(url: str, part: Path, name: str, dataset: str) -> np.ndarray:
    """Download ``url`` into ``part`` and return its parsed array once it verified."""
    with _urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
        shutil.copyfileobj(response, out, _CHUNK)
    data = _read_idx_bytes(part, source=url, kind=_kind(name), name=name, title=TITLES[dataset])
    array = parse_idx(data, kind=_kind(name), source=url)
    problem = _verification_problem(data, name, dataset, True, lambda: _gz_md5_of(part))
    if problem:
        raise DatasetError(f"{url}: {problem[0]}")
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
