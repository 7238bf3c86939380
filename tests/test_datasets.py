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
    with pytest.raises(DatasetError, match=r"label 10 at index 3 is not a digit 0\.\.9 \(1 such labels in all\)"):
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
