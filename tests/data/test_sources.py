"""The source registry: sha256 checks on the mirror, and fetching from an origin (a local HTTP server)."""

import functools
import http.server
import shutil
import threading

import pytest

from ifguide.data.sources import fetch, registry, source_path
from ifguide.errors import IfguideError

NAME = "blocklists/ldnoobw_en.txt"


def test_mirror_file_verifies(data_mirror):
    assert source_path(NAME, data_mirror).is_file()


def test_corrupted_file_is_caught(tmp_path, data_mirror):
    (tmp_path / "blocklists").mkdir()
    copy = tmp_path / NAME
    shutil.copy(data_mirror / NAME, copy)
    copy.write_bytes(copy.read_bytes().replace(b"a", b"b", 1))
    with pytest.raises(IfguideError, match="corrupted.*ldnoobw_en.txt"):
        source_path(NAME, tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(IfguideError, match="ldnoobw_en.txt is missing"):
        source_path(NAME, tmp_path)


@pytest.fixture
def origin(tmp_path, data_mirror):
    """A local HTTP server laid out like raw.githubusercontent.com/REPO/COMMIT/PATH."""
    entry = registry()[NAME]
    served = tmp_path / "origin" / entry["repo"] / entry["commit"] / entry["path"]
    served.parent.mkdir(parents=True)
    shutil.copy(data_mirror / NAME, served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "origin"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()


def test_fetch_from_origin_at_pinned_commit(tmp_path, origin, data_mirror):
    base, _ = origin
    path = fetch(NAME, tmp_path / "mirror", base_url=base)
    assert path.read_bytes() == (data_mirror / NAME).read_bytes()
    assert source_path(NAME, tmp_path / "mirror") == path


def test_fetch_rejects_changed_origin(tmp_path, origin):
    base, served = origin
    served.write_text("changed\n")
    with pytest.raises(IfguideError, match="wrong sha256"):
        fetch(NAME, tmp_path / "mirror", base_url=base)
    assert not (tmp_path / "mirror" / NAME).exists()
