"""Tests for gpunet.datasets: tiny IDX files written here, canned and local-server downloads.

Nothing here touches the network; the real MNIST is read only through the ``mnist_dir`` fixture.
"""

import functools
import gzip
import hashlib
import io
import struct
import threading
import urllib.error
import zlib
from pathlib import Path
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from gpunet import datasets
from gpunet.datasets import DatasetError, load_mnist, parse_idx

NAMES = tuple(datasets.SHA256)  # train images, train labels, test images, test labels


# --- Helpers: tiny, valid MNIST-shaped files -------------------------------------------------


def idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 2051, len(images), 28, 28) + images.astype(np.uint8).tobytes()


def idx_labels(labels) -> bytes:
    labels = np.asarray(labels, dtype=np.uint8)
    return struct.pack(">II", 2049, len(labels)) + labels.tobytes()


def tiny_mnist() -> dict[str, bytes]:
    """Five training and three test examples whose pixels identify them."""
    images = np.arange(8 * 28 * 28, dtype=np.int64).reshape(8, 28, 28) % 251
    return {
        "train-images-idx3-ubyte": idx_images(images[:5]),
        "train-labels-idx1-ubyte": idx_labels([5, 0, 4, 1, 9]),
        "t10k-images-idx3-ubyte": idx_images(images[5:]),
        "t10k-labels-idx1-ubyte": idx_labels([7, 2, 1]),
    }


def write_mnist(folder, files: dict[str, bytes], *, gz: bool = True, dotted: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        filename = name.replace("-idx", ".idx") if dotted else name
        if gz:
            (folder / f"{filename}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / filename).write_bytes(data)
    return folder


def with_file(name: str, data: bytes) -> dict[str, bytes]:
    """The tiny set with one file replaced."""
    return {**tiny_mnist(), name: data}


@pytest.fixture
def tiny_sizes(monkeypatch):
    """Make the table of published sizes describe the tiny files."""
    for name, data in tiny_mnist().items():
        monkeypatch.setitem(datasets.SIZES, name, len(data))


@pytest.fixture
def tiny_hashes(monkeypatch, tiny_sizes):
    """Make the checksum table describe the tiny files, for paths that always verify."""
    for name, data in tiny_mnist().items():
        monkeypatch.setitem(datasets.SHA256, name, hashlib.sha256(data).hexdigest())


def check_tiny(arrays):
    x_train, y_train, x_test, y_test = arrays
    assert [a.shape for a in arrays] == [(5, 28, 28), (5,), (3, 28, 28), (3,)]
    assert all(a.dtype == np.uint8 and a.flags.writeable for a in arrays)
    assert y_train.tolist() == [5, 0, 4, 1, 9] and y_test.tolist() == [7, 2, 1]
    expected = np.arange(8 * 28 * 28).reshape(8, 28, 28) % 251
    np.testing.assert_array_equal(x_train, expected[:5])
    np.testing.assert_array_equal(x_test, expected[5:])


# --- Loading valid files ---------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("dotted", [False, True], ids=["standard", "dotted"])
def test_loads_every_accepted_name(tmp_path, gz, dotted):
    write_mnist(tmp_path, tiny_mnist(), gz=gz, dotted=dotted)
    assert datasets.mnist_available(tmp_path)
    check_tiny(load_mnist(tmp_path, download=False, verify=False))


def test_gzip_is_recognised_by_content_not_name(tmp_path):
    files = tiny_mnist()
    # gzip data under a raw name, and raw data under a .gz name, for both kinds.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(gzip.compress(files["train-images-idx3-ubyte"]))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(files["train-labels-idx1-ubyte"])
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(files["t10k-images-idx3-ubyte"])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(gzip.compress(files["t10k-labels-idx1-ubyte"]))
    check_tiny(load_mnist(tmp_path, download=False, verify=False))


def test_multi_member_gzip_loads(tmp_path):
    data = tiny_mnist()["train-images-idx3-ubyte"]
    write_mnist(tmp_path, tiny_mnist())
    two_members = gzip.compress(data[:1000]) + gzip.compress(data[1000:])
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(two_members)
    check_tiny(load_mnist(tmp_path, download=False, verify=False))


def test_verified_load_passes_with_matching_hashes(tmp_path, tiny_hashes):
    write_mnist(tmp_path, tiny_mnist())
    check_tiny(load_mnist(tmp_path, download=False))


# --- Broken files ----------------------------------------------------------------------------


def load_with(tmp_path, name, data, *, gz=True):
    write_mnist(tmp_path, with_file(name, data), gz=gz)
    return load_mnist(tmp_path, download=False, verify=False)


def test_truncated_file(tmp_path):
    data = tiny_mnist()["train-images-idx3-ubyte"][:-10]
    expected = r"header says 5 images, which is 3936 bytes, but there are 3926 bytes \(truncated\)"
    with pytest.raises(DatasetError, match=expected) as info:
        load_with(tmp_path, "train-images-idx3-ubyte", data)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_trailing_bytes(tmp_path):
    data = tiny_mnist()["train-labels-idx1-ubyte"] + b"\0\0\0"
    with pytest.raises(DatasetError, match=r"which is 13 bytes, but there are 16 bytes \(3 trailing bytes\)"):
        load_with(tmp_path, "train-labels-idx1-ubyte", data, gz=False)


def test_wrong_magic(tmp_path):
    data = b"PK\x03\x04" + tiny_mnist()["t10k-images-idx3-ubyte"][4:]
    expected = r"not an IDX images file: the magic number is 0x504b0304, expected 0x00000803"
    with pytest.raises(DatasetError, match=expected):
        load_with(tmp_path, "t10k-images-idx3-ubyte", data)


def test_little_endian_header(tmp_path):
    images = np.zeros((5, 28, 28), np.uint8)
    data = struct.pack("<IIII", 2051, 5, 28, 28) + images.tobytes()
    with pytest.raises(DatasetError, match=r"header is little-endian \(magic number reads as 0x03080000"):
        load_with(tmp_path, "train-images-idx3-ubyte", data)


def test_labels_where_images_were_expected(tmp_path):
    with pytest.raises(DatasetError, match=r"holds IDX labels \(magic number 2049\) where images"):
        load_with(tmp_path, "t10k-images-idx3-ubyte", tiny_mnist()["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize("cols", [27, 29])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_images_must_be_28x28(tmp_path, cols, gz):
    data = struct.pack(">IIII", 2051, 5, 28, cols) + bytes(5 * 28 * cols)
    with pytest.raises(DatasetError, match=rf"images are 28x{cols}, expected 28x28"):
        load_with(tmp_path, "train-images-idx3-ubyte", data, gz=gz)


def test_image_and_label_counts_must_match(tmp_path):
    with pytest.raises(DatasetError, match=r"3 images do not match the 4 labels in .*t10k-labels-idx1-ubyte.gz"):
        load_with(tmp_path, "t10k-labels-idx1-ubyte", idx_labels([7, 2, 1, 0]))


def test_label_out_of_range(tmp_path):
    with pytest.raises(DatasetError, match=r"label 10 at index 3 is not a class 0\.\.9 \(1 such labels in all\)"):
        load_with(tmp_path, "train-labels-idx1-ubyte", idx_labels([5, 0, 4, 10, 9]))


@pytest.mark.parametrize("body", [b"<!DOCTYPE html><html><body>Access denied</body></html>",
                                  b"\n  <html><head><title>404</title></head></html>",
                                  b"\xef\xbb\xbf<?xml version='1.0'?><Error>AccessDenied</Error>"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_html_page_instead_of_data(tmp_path, body, gz):
    with pytest.raises(DatasetError, match="found an HTML page where IDX/gzip data was expected"):
        load_with(tmp_path, "train-images-idx3-ubyte", body, gz=gz)


def test_truncated_gzip_stream(tmp_path):
    write_mnist(tmp_path, tiny_mnist())
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: the gzip stream ends early"):
        load_mnist(tmp_path, download=False, verify=False)


def test_corrupt_gzip_stream(tmp_path):
    write_mnist(tmp_path, tiny_mnist())
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[3] = 0xFF  # reserved header flag bits: zlib rejects the header
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.gz: the gzip data is corrupt"):
        load_mnist(tmp_path, download=False, verify=False)


def test_checksum_mismatch_names_file_and_both_hashes(tmp_path, tiny_sizes):
    files = tiny_mnist()
    write_mnist(tmp_path, files)
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert datasets.SHA256["train-images-idx3-ubyte"] in message
    assert hashlib.sha256(files["train-images-idx3-ubyte"]).hexdigest() in message
    assert "delete it" in message


def test_parse_idx_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'images' or 'labels', got 'pixels'"):
        parse_idx(idx_labels([1]), kind="pixels", source="x")


def test_parse_idx_rejects_a_short_header():
    expected = r"x: 10 bytes is too short for an IDX images file, whose header alone is 16"
    with pytest.raises(DatasetError, match=expected):
        parse_idx(struct.pack(">III", 2051, 1, 28)[:10], kind="images", source="x")


def test_parse_idx_accepts_empty_file():
    assert parse_idx(idx_labels([]), kind="labels", source="x").shape == (0,)


# --- Where the data is looked for ------------------------------------------------------------


def test_resolve_root(monkeypatch, tmp_path):
    monkeypatch.delenv("GPUNET_DATA", raising=False)
    assert datasets.resolve_root() == datasets.DEFAULT_ROOT
    assert datasets.DEFAULT_ROOT == Path(datasets.__file__).resolve().parents[1] / "data"
    monkeypatch.setenv("GPUNET_DATA", "")
    assert datasets.resolve_root() == datasets.DEFAULT_ROOT
    monkeypatch.setenv("GPUNET_DATA", str(tmp_path / "env"))
    assert datasets.resolve_root() == tmp_path / "env"
    assert datasets.resolve_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_load_mnist_reads_gpunet_data(monkeypatch, tmp_path):
    write_mnist(tmp_path / "env", tiny_mnist())
    monkeypatch.setenv("GPUNET_DATA", str(tmp_path / "env"))
    check_tiny(load_mnist(download=False, verify=False))


def test_offline_without_files_says_where_it_looked(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert not datasets.mnist_available(folder)
    with pytest.raises(DatasetError) as info:
        load_mnist(folder, download=False)
    message = str(info.value)
    assert f"MNIST not found in {folder}: missing" in message
    assert all(name in message for name in NAMES)
    assert "--data-dir DIR" in message and "GPUNET_DATA" in message


@pytest.mark.parametrize("download", [True, False])
def test_a_named_folder_that_does_not_exist_is_reported_and_not_created(tmp_path, download,
                                                                        monkeypatch):
    asked = []
    monkeypatch.setattr(datasets, "_urlopen", lambda *a, **k: asked.append(a))
    folder = tmp_path / "typo" / "mnist"
    with pytest.raises(DatasetError) as info:
        load_mnist(folder, download=download)
    message = str(info.value)
    assert message.startswith(f"the data folder {folder} (given explicitly) does not exist, so "
                              "nothing was created or downloaded")
    assert "--data-dir DIR" in message and "train-images-idx3-ubyte" in message
    assert not (tmp_path / "typo").exists() and asked == []
    monkeypatch.setenv("GPUNET_DATA", str(folder))
    with pytest.raises(DatasetError, match=f"from GPUNET_DATA={folder}\\) does not exist"):
        load_mnist(download=download)
    assert not (tmp_path / "typo").exists() and asked == []


def test_unusable_data_folder(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DatasetError, match=r"data folder .*file \(given explicitly\) is not a folder"):
        load_mnist(tmp_path / "file")


def test_offline_reports_only_the_missing_files(tmp_path):
    files = tiny_mnist()
    del files["t10k-labels-idx1-ubyte"]
    write_mnist(tmp_path, files)
    with pytest.raises(DatasetError, match=r"missing t10k-labels-idx1-ubyte \(looked for"):
        load_mnist(tmp_path, download=False)


# --- Downloads -------------------------------------------------------------------------------


class FakeMirrors:
    """A stand-in for urlopen: each mirror prefix maps to a behaviour, every URL asked is logged."""

    def __init__(self, behaviours: dict):
        self.behaviours = behaviours
        self.urls = []

    def __call__(self, url, timeout=None):
        assert timeout == datasets.DOWNLOAD_TIMEOUT_S
        self.urls.append(url)
        mirror, name = url.rsplit("/", 1)
        behaviour = self.behaviours[mirror + "/"]
        if isinstance(behaviour, Exception):
            raise behaviour
        return io.BytesIO(behaviour(name.removesuffix(".gz")))


def good(name):
    return gzip.compress(tiny_mnist()[name])


def assert_no_debris(folder):
    leftovers = [p.name for p in folder.iterdir() if not p.name.endswith(".gz")]
    assert leftovers == []


def test_download_falls_through_to_a_good_mirror(tmp_path, monkeypatch, tiny_hashes, capsys):
    mirrors = {"https://down.example/": urllib.error.URLError("Name or service not known"),
               "https://proxy.example/": lambda name: b"<!DOCTYPE html><html>Sign in</html>",
               "https://good.example/": good}
    fake = FakeMirrors(mirrors)
    monkeypatch.setattr(datasets, "MIRRORS", tuple(mirrors))
    monkeypatch.setattr(datasets, "_urlopen", fake)
    folder = tmp_path / "new" / "data"
    folder.mkdir(parents=True)

    check_tiny(load_mnist(folder, progress=True))

    assert fake.urls[:3] == [f"{m}train-images-idx3-ubyte.gz" for m in mirrors]
    assert len(fake.urls) == 12
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    assert capsys.readouterr().out.count("downloading ") == 12
    # What landed is verified and loads offline, checksums and all.
    check_tiny(load_mnist(folder, download=False))


def test_download_only_fetches_missing_files(tmp_path, monkeypatch, tiny_hashes):
    files = tiny_mnist()
    write_mnist(tmp_path, {n: d for n, d in files.items() if n != "t10k-labels-idx1-ubyte"}, gz=False)
    fake = FakeMirrors({"https://good.example/": good})
    monkeypatch.setattr(datasets, "MIRRORS", ("https://good.example/",))
    monkeypatch.setattr(datasets, "_urlopen", fake)
    check_tiny(load_mnist(tmp_path))
    assert fake.urls == ["https://good.example/t10k-labels-idx1-ubyte.gz"]


def test_download_with_every_mirror_failing_leaves_nothing(tmp_path, monkeypatch, tiny_hashes):
    def wrong_data(name):
        data = idx_labels([1, 2, 3, 4, 5]) if "labels" in name else idx_images(np.ones((5, 28, 28)))
        return gzip.compress(data)

    mirrors = {"https://a.example/": urllib.error.URLError(TimeoutError("timed out")),
               "https://b.example/": urllib.error.HTTPError("u", 404, "Not Found", None, None),
               "https://c.example/": lambda name: b"  <html>503</html>",
               "https://d.example/": wrong_data,
               "https://e.example/": lambda name: good(name)[:-40],
               "https://f.example/": ConnectionResetError(104, "Connection reset by peer")}
    monkeypatch.setattr(datasets, "MIRRORS", tuple(mirrors))
    monkeypatch.setattr(datasets, "_urlopen", FakeMirrors(mirrors))

    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert f"could not download train-images-idx3-ubyte.gz into {tmp_path}" in message
    for reason in ["https://a.example/train-images-idx3-ubyte.gz: timed out",
                   "https://b.example/train-images-idx3-ubyte.gz: HTTP 404 Not Found",
                   "https://c.example/train-images-idx3-ubyte.gz: found an HTML page",
                   "https://d.example/train-images-idx3-ubyte.gz: the SHA-256 of the decompressed data is",
                   "https://e.example/train-images-idx3-ubyte.gz: the gzip stream ends early",
                   "https://f.example/train-images-idx3-ubyte.gz: [Errno 104] Connection reset by peer",
                   "--data-dir DIR", "GPUNET_DATA"]:
        assert reason in message
    assert list(tmp_path.iterdir()) == []


def test_a_download_removes_what_a_killed_one_left(tmp_path, monkeypatch, tiny_hashes):
    files = tiny_mnist()
    write_mnist(tmp_path, {n: d for n, d in files.items() if n != "t10k-labels-idx1-ubyte"})
    stale = tmp_path / "t10k-labels-idx1-ubyte.gz.0a1b2c3d.part"
    other = tmp_path / "t10k-images-idx3-ubyte.gz.0a1b2c3d.part"
    stale.write_bytes(b"half a download")
    other.write_bytes(b"another file's")
    monkeypatch.setattr(datasets, "MIRRORS", ("https://good.example/",))
    monkeypatch.setattr(datasets, "_urlopen", FakeMirrors({"https://good.example/": good}))
    check_tiny(load_mnist(tmp_path))
    assert not stale.exists() and other.read_bytes() == b"another file's"


def test_download_interrupted_midway_leaves_nothing(tmp_path, monkeypatch, tiny_hashes):
    class Breaks(io.BytesIO):
        def read(self, *args):
            raise KeyboardInterrupt

        readinto = read

    monkeypatch.setattr(datasets, "MIRRORS", ("https://a.example/",))
    monkeypatch.setattr(datasets, "_urlopen", lambda url, timeout: Breaks(b""))
    with pytest.raises(KeyboardInterrupt):
        load_mnist(tmp_path)
    assert list(tmp_path.iterdir()) == []


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_a_local_http_server(tmp_path, monkeypatch, tiny_hashes):
    served = write_mnist(tmp_path / "served", tiny_mnist())
    handler = functools.partial(QuietHandler, directory=str(served))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("no_proxy", "127.0.0.1")  # a configured proxy must not intercept loopback
        # The first mirror answers 404 (no such folder), the second serves the files.
        monkeypatch.setattr(datasets, "MIRRORS", (f"{base}/missing/", f"{base}/"))
        folder = tmp_path / "data"
        folder.mkdir()
        check_tiny(load_mnist(folder))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    name = "train-images-idx3-ubyte.gz"
    assert (folder / name).read_bytes() == (served / name).read_bytes()


# --- The real MNIST --------------------------------------------------------------------------


def test_real_mnist(mnist_dir):
    x_train, y_train, x_test, y_test = load_mnist(mnist_dir, download=False)
    assert (x_train.shape, y_train.shape, x_test.shape, y_test.shape) == \
        ((60000, 28, 28), (60000,), (10000, 28, 28), (10000,))
    assert all(a.dtype == np.uint8 and a.flags.writeable for a in (x_train, y_train, x_test, y_test))
    assert y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))
    assert int(x_test.sum(dtype=np.int64)) == 264923200
    assert int(x_train.sum(dtype=np.int64)) == 1567298545


# --- Reading no more than the header declares ------------------------------------------------


def zeros_gzip(header: bytes, megabytes: int) -> bytes:
    """gzip of ``header`` followed by ``megabytes`` MB of zeros, made a megabyte at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(header)]
    block = bytes(1 << 20)
    parts += [packer.compress(block) for _ in range(megabytes)]
    return b"".join(parts) + packer.flush()


def test_a_gzip_bomb_is_decompressed_no_further_than_its_header(tmp_path, monkeypatch):
    header = struct.pack(">IIII", 2051, 5, 28, 28)  # 5 images: 3936 bytes in all
    write_mnist(tmp_path, tiny_mnist())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(zeros_gzip(header, 256))
    produced = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def decompress(self, data, max_length=0):
            out = self.inner.decompress(data, max_length)
            produced.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(datasets.zlib, "decompressobj", Counting)
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path, download=False, verify=False)
    assert "train-images-idx3-ubyte.gz: the header says 5 images, which is 3936 bytes, but the " \
           "gzip data decompresses to more; stopped reading there" in str(info.value)
    assert sum(produced[:-1]) < 3936 + 4 * datasets._CHUNK  # the first call may fill 4 MB at most
    assert sum(produced) < 4 * datasets._CHUNK + 3937


def test_a_gzip_bomb_behind_a_published_name_is_stopped_at_the_published_size(tmp_path,
                                                                             tiny_hashes):
    """With verification on, a header that claims more labels than the published file (here the
    tiny set stands in for it) is refused at once, before the data is decompressed."""
    write_mnist(tmp_path, tiny_mnist())
    header = struct.pack(">II", 2049, 2 ** 32 - 1)  # four billion labels
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(zeros_gzip(header, 8))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz: the header says 4294967295 "
                                           r"labels, but the published MNIST t10k-labels-idx1-ubyte "
                                           r"has 3"):
        load_mnist(tmp_path, download=False)


def test_a_huge_sparse_raw_file_is_refused_from_its_size(tmp_path):
    write_mnist(tmp_path, tiny_mnist(), gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    with open(path, "r+b") as f:
        try:
            f.truncate(1 << 40)  # 1 TiB, sparse: no disk blocks behind it
        except OSError as exc:
            pytest.skip(f"this file system has no 1 TiB sparse files: {exc}")
    try:
        with pytest.raises(DatasetError, match=r"the header says 5 labels, which is 13 bytes, but "
                                               r"there are 1099511627776 bytes"):
            load_mnist(tmp_path, download=False, verify=False)
    finally:
        path.unlink()


# --- Fashion-MNIST and KMNIST: one format, one folder per dataset ----------------------------


def tiny_fashion() -> dict[str, bytes]:
    """The tiny set with other pixels and labels: a second dataset under the same file names."""
    files = tiny_mnist()
    images = 255 - np.arange(8 * 28 * 28, dtype=np.int64).reshape(8, 28, 28) % 251
    return {**files, "train-images-idx3-ubyte": idx_images(images[:5]),
            "train-labels-idx1-ubyte": idx_labels([9, 0, 0, 3, 0]),
            "t10k-images-idx3-ubyte": idx_images(images[5:]),
            "t10k-labels-idx1-ubyte": idx_labels([9, 2, 1])}


def published_gz(data: bytes) -> bytes:
    """One fixed gzip encoding of ``data``: the stand-in for a published .gz file."""
    return gzip.compress(data, compresslevel=9, mtime=0)


@pytest.fixture
def tiny_tables(monkeypatch, tiny_hashes):
    """The checksum tables describe the tiny sets: MNIST's and Fashion-MNIST's SHA-256 of the
    decompressed bytes, and KMNIST's MD5 of the published .gz (the tiny MNIST set, gzipped by
    published_gz, stands in for KMNIST's files)."""
    for name, data in tiny_fashion().items():
        monkeypatch.setitem(datasets.FASHION_MNIST_SHA256, name, hashlib.sha256(data).hexdigest())
    kmnist = tiny_kmnist()
    for name, data in kmnist.items():
        monkeypatch.setitem(datasets.KMNIST_GZ_MD5, name,
                            hashlib.md5(published_gz(data)).hexdigest())
    # The tiny KMNIST content must not be the tiny MNIST one, or MNIST's SHA-256 would claim it.
    assert not set(map(hashlib.sha256, kmnist.values())) & set(map(hashlib.sha256, tiny_mnist().values()))


def tiny_kmnist() -> dict[str, bytes]:
    images = (np.arange(8 * 28 * 28, dtype=np.int64).reshape(8, 28, 28) * 7) % 253
    return {"train-images-idx3-ubyte": idx_images(images[:5]),
            "train-labels-idx1-ubyte": idx_labels([8, 6, 4, 2, 0]),
            "t10k-images-idx3-ubyte": idx_images(images[5:]),
            "t10k-labels-idx1-ubyte": idx_labels([1, 3, 5])}


def write_published_kmnist(folder, files=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (files or tiny_kmnist()).items():
        (folder / f"{name}.gz").write_bytes(published_gz(data))
    return folder


def test_the_three_datasets_and_their_names():
    assert datasets.DATASETS == ("mnist", "fashion-mnist", "kmnist")
    assert datasets.FILES == NAMES
    assert all(len(datasets.CLASSES[name]) == 10 for name in datasets.DATASETS)
    assert datasets.CLASSES["fashion-mnist"][9] == "Ankle boot"
    with pytest.raises(ValueError, match="name must be one of mnist, fashion-mnist, kmnist, got 'cifar10'"):
        datasets.load_dataset("cifar10")
    with pytest.raises(ValueError, match="name must be one of"):
        datasets.resolve_root(dataset="MNIST")


def test_fashion_mnist_is_verified_by_the_sha256_of_its_content(tmp_path, tiny_tables):
    write_mnist(tmp_path, tiny_fashion(), gz=False)
    x_train, y_train, x_test, y_test = datasets.load_dataset("fashion-mnist", tmp_path, download=False)
    assert y_train.tolist() == [9, 0, 0, 3, 0] and y_test.tolist() == [9, 2, 1]
    files = tiny_fashion()
    files["t10k-labels-idx1-ubyte"] = idx_labels([9, 2, 2])  # one label changed
    write_mnist(tmp_path, files, gz=False)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: the SHA-256 of the decompressed "
                                           r"data is [0-9a-f]{64}, expected [0-9a-f]{64}; the file is "
                                           r"damaged or not the published Fashion-MNIST "):
        datasets.load_dataset("fashion-mnist", tmp_path, download=False)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("asked,held,files", [
    ("fashion-mnist", "MNIST", tiny_mnist), ("mnist", "Fashion-MNIST", tiny_fashion),
    ("kmnist", "MNIST", tiny_mnist), ("kmnist", "Fashion-MNIST", tiny_fashion)])
def test_a_folder_of_another_dataset_is_named_as_such(tmp_path, tiny_tables, verify, asked, held,
                                                      files):
    """Even unverified: a known checksum of another dataset is a silent wrong answer averted."""
    write_mnist(tmp_path, files())
    with pytest.raises(DatasetError) as info:
        datasets.load_dataset(asked, tmp_path, download=False, verify=verify)
    message = str(info.value)
    title = datasets.TITLES[asked]
    assert message.startswith(f"{tmp_path / 'train-images-idx3-ubyte.gz'}: this is {held}'s "
                              f"train-images-idx3-ubyte (its checksum is the published one), not "
                              f"{title}'s: the folder holds {held}; ask for --dataset ")
    assert f"at the {title} files (or at a folder with a {asked}/ subfolder)." in message


@pytest.mark.parametrize("verify", [True, False])
def test_published_kmnist_files_are_recognised_by_their_md5(tmp_path, tiny_tables, verify):
    write_published_kmnist(tmp_path)
    for asked in ("mnist", "fashion-mnist"):
        with pytest.raises(DatasetError, match=r"this is KMNIST's train-images-idx3-ubyte .*the "
                                               "folder holds KMNIST; ask for --dataset kmnist"):
            datasets.load_dataset(asked, tmp_path, download=False, verify=verify)


def test_kmnist_loads_when_each_gz_is_the_published_one(tmp_path, tiny_tables):
    write_published_kmnist(tmp_path)
    x_train, y_train, x_test, y_test = datasets.load_dataset("kmnist", tmp_path, download=False)
    assert y_train.tolist() == [8, 6, 4, 2, 0] and y_test.tolist() == [1, 3, 5]
    np.testing.assert_array_equal(x_test, np.frombuffer(tiny_kmnist()["t10k-images-idx3-ubyte"][16:],
                                                        np.uint8).reshape(3, 28, 28))


@pytest.mark.parametrize("how", ["recompressed", "raw", "damaged"])
def test_kmnist_that_cannot_be_verified_is_refused_saying_so(tmp_path, tiny_tables, how):
    write_published_kmnist(tmp_path)
    name = "train-labels-idx1-ubyte"
    data = tiny_kmnist()[name]
    path = tmp_path / f"{name}.gz"
    if how == "recompressed":  # the same content, gzipped otherwise: still cannot be verified
        path.write_bytes(gzip.compress(data, compresslevel=1, mtime=12345))
    elif how == "raw":
        path.unlink()
        path = tmp_path / name
        path.write_bytes(data)
    else:
        path.write_bytes(published_gz(idx_labels([8, 6, 4, 2, 1])))
    with pytest.raises(DatasetError) as info:
        datasets.load_dataset("kmnist", tmp_path, download=False)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    if how == "raw":
        assert "this raw (not gzipped) file cannot be verified as KMNIST's train-labels-idx1-ubyte" in message
    else:
        assert f"the MD5 of this .gz file is {hashlib.md5(path.read_bytes()).hexdigest()}, but the " \
               f"published KMNIST train-labels-idx1-ubyte.gz has {datasets.KMNIST_GZ_MD5[name]}: " \
               "the file is damaged, recompressed or not KMNIST" in message
    assert "KMNIST is verified by the published MD5 of its .gz files alone (no checksum of its " \
           "decompressed data is known to gpunet), so a raw or recompressed copy cannot be verified" in message
    assert message.endswith("or, trusting the copy, load it unverified with verify=False "
                            "(train.py: --no-verify-data).")
    # Asked for, the unverified load goes ahead (and still parses strictly).
    _, y_train, _, _ = datasets.load_dataset("kmnist", tmp_path, download=False, verify=False)
    assert y_train.tolist() == ([8, 6, 4, 2, 1] if how == "damaged" else [8, 6, 4, 2, 0])


def test_kmnist_downloads_are_verified_by_md5(tmp_path, monkeypatch, tiny_tables):
    def published(name):
        return published_gz(tiny_kmnist()[name])

    def recompressed(name):
        return gzip.compress(tiny_kmnist()[name], compresslevel=1, mtime=1)

    mirrors = {"https://recompressed.example/": recompressed, "https://good.example/": published}
    fake = FakeMirrors(mirrors)
    monkeypatch.setattr(datasets, "KMNIST_MIRRORS", tuple(mirrors))
    monkeypatch.setattr(datasets, "_urlopen", fake)
    folder = tmp_path / "kmnist"
    folder.mkdir()
    _, y_train, _, _ = datasets.load_dataset("kmnist", folder)
    assert y_train.tolist() == [8, 6, 4, 2, 0] and len(fake.urls) == 8
    for name in NAMES:
        assert (folder / f"{name}.gz").read_bytes() == published(name)

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    monkeypatch.setattr(datasets, "KMNIST_MIRRORS", ("https://recompressed.example/",))
    with pytest.raises(DatasetError, match=r"could not download train-images-idx3-ubyte.gz into .*, "
                                           r"where the KMNIST files were looked for: https://"
                                           r"recompressed.example/train-images-idx3-ubyte.gz: the MD5 "
                                           r"of this .gz file is [0-9a-f]{32}, but the published"):
        datasets.load_dataset("kmnist", only_bad)
    assert list(only_bad.iterdir()) == []


def test_each_dataset_downloads_from_its_own_mirrors(tmp_path, monkeypatch):
    fake = FakeMirrors({})
    monkeypatch.setattr(datasets, "_urlopen", fake)
    fake.behaviours = {m: urllib.error.URLError("offline") for m in
                       (*datasets.MIRRORS, *datasets.FASHION_MNIST_MIRRORS, *datasets.KMNIST_MIRRORS)}
    for name, mirror in [("fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
                         ("kmnist", "http://codh.rois.ac.jp/kmnist/dataset/kmnist/")]:
        fake.urls.clear()
        with pytest.raises(DatasetError, match=f"where the {datasets.TITLES[name]} files were looked for"):
            datasets.load_dataset(name, tmp_path)
        assert fake.urls == [f"{mirror}train-images-idx3-ubyte.gz"]
    assert list(tmp_path.iterdir()) == []


# --- The folder rule: a folder holds one dataset, or a subfolder for each ----------------------


def test_a_subfolder_named_after_the_dataset_is_used(tmp_path, monkeypatch, tiny_tables):
    collection = tmp_path / "data"
    write_mnist(collection / "mnist", tiny_mnist())
    write_mnist(collection / "fashion-mnist", tiny_fashion())
    assert datasets.resolve_root(collection) == collection / "mnist"
    assert datasets.resolve_root(collection, dataset="fashion-mnist") == collection / "fashion-mnist"
    # A collection gives a dataset it lacks a subfolder of its own too, never its top level.
    assert datasets.resolve_root(collection, dataset="kmnist") == collection / "kmnist"
    assert datasets.resolve_root(collection / "mnist", dataset="fashion-mnist") == collection / "mnist"
    check_tiny(datasets.load_dataset("mnist", collection, download=False))
    assert datasets.load_dataset("fashion-mnist", collection, download=False)[1].tolist() == [9, 0, 0, 3, 0]
    monkeypatch.setenv("GPUNET_DATA", str(collection))
    assert datasets.resolve_root(dataset="fashion-mnist") == collection / "fashion-mnist"
    check_tiny(load_mnist(download=False))
    assert datasets.dataset_available("fashion-mnist") and not datasets.dataset_available("kmnist")
    assert set(datasets.dataset_files("mnist")) == set(NAMES)
    assert datasets.mnist_files() == datasets.dataset_files("mnist", collection)
    with pytest.raises(DatasetError, match=f"KMNIST not found in {collection / 'kmnist'} \\(which "
                                           "does not exist\\)"):
        datasets.load_dataset("kmnist", download=False)
    assert not (collection / "kmnist").exists()


def test_a_collection_downloads_into_the_datasets_subfolder(tmp_path, monkeypatch, tiny_tables):
    collection = tmp_path / "data"
    write_mnist(collection / "mnist", tiny_mnist())
    monkeypatch.setattr(datasets, "KMNIST_MIRRORS", ("https://good.example/",))
    monkeypatch.setattr(datasets, "_urlopen", FakeMirrors(
        {"https://good.example/": lambda name: published_gz(tiny_kmnist()[name])}))
    datasets.load_dataset("kmnist", collection)
    assert sorted(p.name for p in (collection / "kmnist").iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    assert sorted(p.name for p in collection.iterdir()) == ["kmnist", "mnist"]


def test_a_failed_download_leaves_no_folder_it_created(tmp_path, monkeypatch, tiny_tables):
    """A collection asked for a dataset it lacks makes the dataset's subfolder to download into
    (and the default data/ folder is made on demand): a download that fails removes them again,
    and keeps a folder that was there before or that holds a verified file."""
    collection = tmp_path / "data"
    write_mnist(collection / "mnist", tiny_mnist())
    monkeypatch.setattr(datasets, "KMNIST_MIRRORS", ("https://down.example/",))
    monkeypatch.setattr(datasets, "_urlopen", FakeMirrors(
        {"https://down.example/": urllib.error.URLError(TimeoutError("timed out"))}))
    with pytest.raises(DatasetError, match="could not download"):
        datasets.load_dataset("kmnist", collection)
    assert sorted(p.name for p in collection.iterdir()) == ["mnist"]
    monkeypatch.delenv("GPUNET_DATA", raising=False)
    monkeypatch.setattr(datasets, "DEFAULT_ROOT", tmp_path / "default" / "data")
    with pytest.raises(DatasetError, match="could not download"):
        datasets.load_dataset("kmnist")
    assert list(tmp_path.iterdir()) == [collection]
    (collection / "kmnist").mkdir()  # there before: kept
    with pytest.raises(DatasetError, match="could not download"):
        datasets.load_dataset("kmnist", collection)
    assert (collection / "kmnist").is_dir()
    good = {"https://down.example/": lambda name: published_gz(tiny_kmnist()[name])
            if name.startswith("train-images") else b"<html>503</html>"}
    monkeypatch.setattr(datasets, "_urlopen", FakeMirrors(good))
    (collection / "kmnist").rmdir()
    with pytest.raises(DatasetError, match="could not download"):
        datasets.load_dataset("kmnist", collection)
    assert [p.name for p in (collection / "kmnist").iterdir()] == ["train-images-idx3-ubyte.gz"]


def test_the_default_folders(tmp_path, monkeypatch):
    """MNIST keeps data/ (its home before there were others) unless data/mnist/ exists; every
    other dataset lives in data/<name>/."""
    monkeypatch.delenv("GPUNET_DATA", raising=False)
    monkeypatch.setattr(datasets, "DEFAULT_ROOT", tmp_path)
    assert datasets.resolve_root() == tmp_path
    assert datasets.resolve_root(dataset="fashion-mnist") == tmp_path / "fashion-mnist"
    assert datasets.resolve_root(dataset="kmnist") == tmp_path / "kmnist"
    (tmp_path / "fashion-mnist").mkdir()
    assert datasets.resolve_root() == tmp_path  # MNIST's files in data/ stay where they were
    (tmp_path / "mnist").mkdir()
    assert datasets.resolve_root() == tmp_path / "mnist"


def test_a_named_folder_for_another_dataset_is_not_created(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(datasets, "_urlopen", lambda *a, **k: asked.append(a))
    with pytest.raises(DatasetError, match=r"the data folder .*typo \(given explicitly\) does not "
                                           r"exist, so nothing was created or downloaded; point at a "
                                           r"folder holding the Fashion-MNIST files"):
        datasets.load_dataset("fashion-mnist", tmp_path / "typo")
    assert asked == [] and list(tmp_path.iterdir()) == []


# --- The real Fashion-MNIST ------------------------------------------------------------------


def test_real_fashion_mnist(fashion_dir):
    x_train, y_train, x_test, y_test = datasets.load_dataset("fashion-mnist", fashion_dir,
                                                             download=False)
    assert (x_train.shape, y_train.shape, x_test.shape, y_test.shape) == \
        ((60000, 28, 28), (60000,), (10000, 28, 28), (10000,))
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert y_test[:5].tolist() == [9, 2, 1, 1, 6]
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10
    assert int(x_train.sum(dtype=np.int64)) == 3431114169
    assert int(x_test.sum(dtype=np.int64)) == 573469082
    # Through the folder above it (the shared data folder holds mnist/ and fashion-mnist/).
    if (fashion_dir.parent / "mnist").is_dir():
        np.testing.assert_array_equal(
            datasets.load_dataset("fashion-mnist", fashion_dir.parent, download=False)[3], y_test)


def test_real_files_of_one_dataset_are_refused_as_another(fashion_dir, mnist_dir):
    with pytest.raises(DatasetError, match="this is Fashion-MNIST's train-images-idx3-ubyte"):
        load_mnist(fashion_dir, download=False)
    for name in ("fashion-mnist", "kmnist"):
        with pytest.raises(DatasetError, match="this is MNIST's train-images-idx3-ubyte"):
            datasets.load_dataset(name, mnist_dir, download=False, verify=False)
