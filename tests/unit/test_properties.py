"""Property tests of the parsers that take untrusted input: whatever they are
given, they answer with a value or the project's own error, never anything else."""

from __future__ import annotations

import json
import struct

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfs.config import load_mount_config
from modelfs.errors import ConfigError, ModelfsError
from modelfs.fetch.tensors import plan_loader_order, safetensors_header_size, tensor_extents
from modelfs.remote._http import next_page_url, parse_content_range
from modelfs.remote.listing import bad_path_reason, clean_listing, hub_entry
from modelfs.settings import SETTINGS
from modelfs.types import FileEntry

PATHS = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["a", "b", "..", ".", "", "c\udcff", "x\0y", "d" * 300]),
             min_size=1, max_size=4).map("/".join),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@given(st.lists(st.tuples(PATHS, st.integers(0, 10)), max_size=25), st.lists(PATHS, max_size=8))
def test_the_listing_cleaner_keeps_only_a_sane_tree(files, dirs) -> None:
    entries = [FileEntry(p, size, f"{n:040x}") for n, (p, size) in enumerate(files)]
    kept, directories = clean_listing("org/x", entries, dirs)
    paths = [f.path for f in kept]
    assert len(paths) == len(set(paths))
    assert all(bad_path_reason(p) is None for p in paths + list(directories))
    assert not set(paths) & set(directories)
    for p in paths:  # every parent is a directory, never a file
        parts = p.split("/")
        assert all("/".join(parts[:i]) in directories for i in range(1, len(parts)))


@given(st.dictionaries(st.sampled_from(["path", "size", "oid", "lfs", "type"]), JSON, max_size=5))
def test_a_hub_entry_is_an_entry_or_a_reason(raw) -> None:
    out = hub_entry(raw)
    if isinstance(out, FileEntry):
        assert 0 <= out.size <= 1 << 50
    else:
        assert isinstance(out, str) and len(out) < 200


@given(st.text(max_size=60))
def test_content_range_is_parsed_or_refused(value: str) -> None:
    got = parse_content_range(value)
    if got is not None:
        a, b, total = got
        assert 0 <= a <= b < total


def test_content_range_examples() -> None:
    assert parse_content_range("bytes 0-99/100") == (0, 99, 100)
    assert parse_content_range("bytes 0-99/100\n") is None
    assert parse_content_range("bytes 5-4/100") is None
    assert parse_content_range("bytes 0-100/100") is None
    assert parse_content_range("bytes ٣-4/9") is None  # Unicode digits


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80))
def test_a_link_header_gives_an_http_url_none_or_a_protocol_error(value: str) -> None:
    resp = httpx.Response(200, headers={"Link": value.encode("latin-1")},
                          request=httpx.Request("GET", "http://127.0.0.1:9/api/x?cursor=1"))
    try:
        url = next_page_url(resp, "repo org/x")
    except ModelfsError:
        return
    assert url is None or url.startswith(("http://", "https://"))


@settings(max_examples=200)
@given(st.binary(max_size=8), st.one_of(JSON.map(lambda v: json.dumps(v).encode()),
                                         st.binary(max_size=200)), st.integers(0, 1 << 40))
def test_the_safetensors_header_reader_never_trusts_the_header(first8, header, size) -> None:
    start = safetensors_header_size(first8)
    assert start is None or 10 <= start <= 8 + (100 << 20)
    data_start = 8 + len(header)
    for _, a, b in tensor_extents(header, data_start, size):
        assert data_start <= a <= b <= size
    order = plan_loader_order(header, data_start, size, 1 << 20)
    if order is not None:
        assert len(order) == -(-size // (1 << 20))


def test_a_header_nested_too_deep_is_not_a_crash() -> None:
    header = b"[" * 100_000
    assert tensor_extents(header, 8 + len(header), 1 << 30) == []
    assert safetensors_header_size(struct.pack("<Q", 1 << 40)) is None


_SCALAR_SETTINGS = [s for s in SETTINGS if s.kind in ("str", "int", "float", "bool")
                    and s.name not in ("mountpoint", "cache_dir", "control_socket", "log_file",
                                       "token_file")]


@settings(max_examples=300)
@given(st.sampled_from(_SCALAR_SETTINGS),
       st.one_of(st.text(max_size=30), st.sampled_from(["nan", "inf", "-inf", "1e400", "-1",
                                                         "0", "1KiB", "9" * 40, "true"])))
def test_any_setting_value_is_taken_or_refused_by_name(tmp_path_factory, setting, raw) -> None:
    env = {setting.env: raw, "MODELFS_CACHE_DIR": "/nonexistent/modelfs-cache"}
    try:
        load_mount_config({"mountpoint": "/mnt", "repos": ("org/x",)}, env=env)
        assert not (setting.kind == "float" and raw.strip().lower() in ("nan", "inf", "-inf")), \
            f"{setting.name} took {raw}"
    except ConfigError as exc:
        text = str(exc)
        assert setting.env in text or setting.flag in text, text
        assert len(text) < 400
    except ModelfsError as exc:  # pragma: no cover - a wrong error kind is a failure
        pytest.fail(f"{setting.name}={raw!r}: {type(exc).__name__}: {exc}")
