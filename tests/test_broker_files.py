"""The content-addressed file store and the identity cache, without a server."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from broker.auth import IdentityCache
from broker.ca import CertificateAuthority
from broker.files import FileStore
from pilot.api.files import (
    BadFileHeader,
    ChecksumMismatch,
    FileTooLarge,
    MissingFile,
    SizeMismatch,
    check_sandbox_name,
    copy_verified,
    parse_size,
    shown,
)
from pilot.errors import UsageError
from pilot.tokens import TokenRole, TokenVerifier


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_store_is_content_addressed_and_deduplicated(tmp_path):
    store = FileStore(str(tmp_path / "files"))
    data = b"some content\n" * 1000
    with store.receive("a.txt", len(data), digest(data)) as incoming:
        incoming.write(data[:5000])
        incoming.write(data[5000:])
        stored = incoming.finish()
    assert stored.sha256 == digest(data) and not stored.already_present
    path = store.path(digest(data))
    assert path == os.path.join(str(tmp_path / "files"), digest(data)[:2], digest(data)[2:])
    assert open(path, "rb").read() == data
    with store.receive("b.txt", len(data), digest(data)) as incoming:
        incoming.write(data)
        assert incoming.finish().already_present
    assert store.usage() == (1, len(data)) and store.size_of(digest(data)) == len(data)
    with store.open(digest(data)) as handle:
        assert handle.read() == data
    assert store.temp_files() == []


def test_mismatches_store_nothing(tmp_path):
    store = FileStore(str(tmp_path / "files"))
    data = b"x" * 100
    with pytest.raises(ChecksumMismatch) as info:
        with store.receive("a", 100, digest(b"y" * 100)) as incoming:
            incoming.write(data)
            incoming.finish()
    assert info.value.expected == digest(b"y" * 100) and info.value.actual == digest(data)
    with pytest.raises(SizeMismatch):
        with store.receive("a", 100, digest(data)) as incoming:
            incoming.write(data[:50])
            incoming.finish()
    with pytest.raises(SizeMismatch):
        with store.receive("a", 50, digest(data)) as incoming:
            incoming.write(data)
    with pytest.raises(RuntimeError):
        with store.receive("a", 100, digest(data)) as incoming:
            incoming.write(data)
            raise RuntimeError("connection lost")
    assert store.usage() == (0, 0) and store.temp_files() == []


def test_limits_and_headers(tmp_path):
    store = FileStore(str(tmp_path / "files"), max_file_size=1000)
    with pytest.raises(FileTooLarge) as info:
        store.receive("big", 1001, "0" * 64)
    assert (info.value.size, info.value.limit) == (1001, 1000) and "fix:" in str(info.value)
    with pytest.raises(BadFileHeader, match="64 lower-case"):
        store.receive("a", 1, "ABC")
    with pytest.raises(MissingFile):
        store.open("0" * 64)
    assert store.temp_files() == []


@pytest.mark.parametrize("name", ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", "x" * 300])
def test_bad_sandbox_names(name):
    with pytest.raises(BadFileHeader, match="fix: use a relative path"):
        check_sandbox_name(name)


@pytest.mark.parametrize("name,code", [
    ("a\x00b", 0x00), ("a\x1b[31mred", 0x1b), ("two\nlines", 0x0a), ("tab\there", 0x09), ("del\x7f", 0x7f),
    ("c1\x9bx", 0x9b), ("c1\x85", 0x85), ("evil\u202etxt.exe", 0x202e), ("iso\u2066late", 0x2066),
    ("dir/\u202aembed", 0x202a), ("pop\u2069", 0x2069)])
def test_names_with_control_characters_or_bidi_overrides_are_refused_and_shown_escaped(name, code):
    with pytest.raises(BadFileHeader) as info:
        check_sandbox_name(name, "output name")
    message = str(info.value)
    assert f"U+{code:04X}" in message and "fix: rename it with printable characters" in message
    assert chr(code) not in message  # never raw: the name is shown escaped
    assert shown(name) in message or repr(name)[1:-1] in message


def test_shown_escapes_what_a_terminal_would_interpret():
    assert shown("plain name.txt") == "plain name.txt"
    assert shown("a\x1b[31mred\n") == "a\\x1b[31mred\\x0a"
    assert shown("x\u202ey") == "x\\u202ey" and shown("back\\slash") == "back\\\\slash"
    assert all(c.isprintable() for c in shown("".join(chr(i) for i in range(0x200))))


def test_good_sandbox_names():
    for name in ("a.txt", "out/result.root", "a b", ".hidden", "x..y"):
        assert check_sandbox_name(name) == name


def test_leftover_temp_files_are_removed_on_start(tmp_path):
    store = FileStore(str(tmp_path / "files"))
    (tmp_path / "files" / "tmp" / "junk").write_bytes(b"half an upload")
    FileStore(str(tmp_path / "files"))
    assert store.temp_files() == []


def test_copy_verified(tmp_path):
    data = b"abc" * 10
    dest = str(tmp_path / "out" / "f")
    copy_verified([data[:10], data[10:]], dest, digest(data), len(data))
    assert open(dest, "rb").read() == data
    with pytest.raises(ChecksumMismatch, match="download it again"):
        copy_verified([b"x" * 30], str(tmp_path / "g"), digest(data), 30)
    assert not os.path.exists(tmp_path / "g") and os.listdir(tmp_path) == ["out"]


def test_parse_size():
    assert parse_size("1024") == 1024 and parse_size("2G") == 2 << 30 and parse_size("500MiB") == 500 << 20
    with pytest.raises(UsageError, match="write e.g."):
        parse_size("lots")


def test_identity_cache_verifies_once_per_certificate_until_expiry():
    ca = CertificateAuthority.create()
    token = ca.new_token(TokenRole.USER, "alice")
    pem = token.to_pem().split(b"-----BEGIN " b"PRIVATE KEY")[0]
    now = [token.certificate.not_valid_before_utc.timestamp() + 60]
    cache = IdentityCache(TokenVerifier([ca.certificate]), clock=lambda: now[0])
    first = cache.identify(pem)
    assert cache.identify(pem) is first and (cache.hits, cache.misses) == (1, 1)
    now[0] = token.certificate.not_valid_after_utc.timestamp() + 1  # past not_after: verified again
    cache.identify(pem)
    assert cache.misses == 2


# ------------------------------------------------------------------ writing downloads (pilot.api.outdir)

def test_output_directory_follows_no_link_and_overwrites_nothing(tmp_path):
    from pilot.api.outdir import OutputDirectory, OutputRefused

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("precious\n")
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "deep").symlink_to(outside)           # a link one level down
    (out / "link.txt").symlink_to(outside / "target")  # a link where a file would go
    (out / "folder").mkdir()
    data = b"job output\n"

    def write(directory, name, content=data, sha=None):
        return directory.write(name, [content[:3], content[3:]], len(content), sha or digest(content))

    with OutputDirectory(out) as directory:
        for name, words in (("a/deep/target", "is a symbolic link, which is never followed"),
                            ("link.txt", "exists and was left as it is"),
                            ("folder", "exists and was left as it is"),
                            ("../escape", "'..' component"),
                            ("ok\x1b[2J", "control character (U+001B)")):
            with pytest.raises(OutputRefused, match=re.escape(words)):
                write(directory, name)
        with pytest.raises(ChecksumMismatch):
            write(directory, "bad.txt", sha=digest(b"other"))
        with pytest.raises(SizeMismatch):
            directory.write("short.txt", [data[:3]], len(data), digest(data))
        assert write(directory, "a/new/file.txt") == str(out / "a/new/file.txt")
    with OutputDirectory(out, force=True) as forced:
        for name, words in (("link.txt", "is a symbolic link; --force replaces regular files only"),
                            ("folder", "not a regular file"), ("a/deep/x", "is a symbolic link")):
            with pytest.raises(OutputRefused, match=re.escape(words)):
                write(forced, name)
        write(forced, "a/new/file.txt", b"replaced\n")
    assert (outside / "target").read_text() == "precious\n" and os.listdir(outside) == ["target"]
    assert (out / "a" / "new" / "file.txt").read_bytes() == b"replaced\n"
    assert sorted(os.listdir(out)) == ["a", "folder", "link.txt"]  # no temporary file left anywhere
    assert sorted(os.listdir(out / "a")) == ["deep", "new"] and os.listdir(out / "a" / "new") == ["file.txt"]
    assert os.listdir(out / "folder") == []
