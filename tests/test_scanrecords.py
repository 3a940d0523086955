"""nvcache.scanrecords: determinism, the scanner's record shape, size targets, shared vocabulary."""

import base64
import collections
import json
import statistics
import zlib
from typing import Any, Dict, List, Tuple

import pytest

from nvcache import scanrecords
from nvcache.scanrecords import incompressible_record, record_set, scan_record


@pytest.fixture(scope="module")
def records() -> List[Tuple[str, bytes]]:
    return record_set(300)


def ordered(raw: bytes) -> Any:
    """The JSON with its key order kept as pairs, to check the order Go writes."""
    return json.loads(raw, object_pairs_hook=lambda pairs: pairs)


def test_deterministic_in_layer_and_seed() -> None:
    assert scan_record("sha256:ab", 5000) == scan_record("sha256:ab", 5000)
    assert scan_record("sha256:ab", 5000) != scan_record("sha256:ac", 5000)
    assert scan_record("sha256:ab", 5000, seed=1) != scan_record("sha256:ab", 5000)
    assert record_set(20, seed=3) == record_set(20, seed=3)
    assert record_set(20, seed=3) != record_set(20, seed=4)
    assert incompressible_record("x", 300) == incompressible_record("x", 300)


def test_records_have_the_scanner_shape(records: List[Tuple[str, bytes]]) -> None:
    for _, raw in records:
        top = ordered(raw)
        keys = [k for k, _ in top]
        assert keys == [k for k in ("modules", "secret_logs", "files", "removed_file") if k in keys]
        assert keys[:2] == ["modules", "secret_logs"]  # a pointer and a non-nil struct: always written
        modules = dict(top)["modules"]
        assert [k for k, _ in modules] == ["Size", "Pkgs", "Apps"]  # no json tags: Go's field names
        pkgs, apps = dict(modules)["Pkgs"], dict(modules)["Apps"]
        assert [k for k, _ in pkgs] == sorted(k for k, _ in pkgs)  # Go sorts map keys
        assert [k for k, _ in apps] == sorted(k for k, _ in apps)
        for _, value in pkgs:
            base64.b64decode(value, validate=True)  # []byte is base64
        for _, entries in apps:
            assert entries and all([k for k, _ in e] == ["app_name", "module_name", "version", "file_name"]
                                   for e in entries)
        plain: Dict[str, Any] = json.loads(raw)
        for key in ("files", "removed_file"):  # omitempty: an empty list is left out
            assert key not in plain or plain[key]
        files = plain.get("files", [])
        assert len(files) == len(set(files)) and all(f.startswith("/") for f in files)
        assert raw == scanrecords._go_json(plain).encode()  # compact, in the order written


def test_files_list_directories_and_is_unsorted(records: List[Tuple[str, bytes]]) -> None:
    big = json.loads(max(records, key=lambda r: len(r[1]))[1])
    files = big["files"]
    assert files != sorted(files)  # the scanner walks a Go map
    listed = set(files)
    parents = {f.rsplit("/", 1)[0] for f in files if f.count("/") > 1}
    assert parents <= listed  # every file's directory is listed too


@pytest.mark.parametrize("target", [200, 257, 600, 2048, 9000, 31_000, 70_000, 160_000])
def test_size_targets(target: int) -> None:
    for i in range(8):
        size = len(scan_record(f"sha256:{target}-{i}", target))
        assert target - 8 < size <= target, (i, size)
        assert abs(size - target) <= 0.1 * target


def test_tiny_records_stay_tiny() -> None:
    for target in (0, 40, 70):
        raw = scan_record(f"layer-{target}", target)
        assert len(raw) < 100 and json.loads(raw)["secret_logs"] == {}


def test_natural_mix_is_mostly_small_with_large_package_layers(records: List[Tuple[str, bytes]]) -> None:
    sizes = sorted(len(r) for _, r in records)
    assert sizes[0] < 100 and sizes[-1] > 100_000
    assert statistics.median(sizes) < 2048
    assert 0.25 < sum(s < 400 for s in sizes) / len(sizes) < 0.55
    databases = collections.Counter(path for _, r in records for path in json.loads(r)["modules"]["Pkgs"])
    assert {"var/lib/dpkg/status", "lib/apk/db/installed", "var/lib/rpm/rpmdb.sqlite"} <= set(databases)


def test_popular_packages_recur_across_records(records: List[Tuple[str, bytes]]) -> None:
    modules: collections.Counter = collections.Counter()
    with_apps = 0
    for _, raw in records:
        names = {e["module_name"] for v in json.loads(raw)["modules"]["Apps"].values() for e in v}
        with_apps += bool(names)
        modules.update(names)
    top, count = modules.most_common(1)[0]
    assert count >= 5, top  # the same popular package in many layers ...
    assert count < with_apps  # ... but not in every one
    assert len(modules) > 50  # and a long tail of others


def test_package_databases_are_what_the_scanner_extracts(records: List[Tuple[str, bytes]]) -> None:
    seen = set()
    for _, raw in records:
        for path, value in json.loads(raw)["modules"]["Pkgs"].items():
            text = base64.b64decode(value).decode()
            if path == "var/lib/dpkg/status":
                assert "Package: libc6\nStatus: install ok installed\nSource: glibc\nVersion: 2.36-9" in text
                assert {line.split(":")[0] for line in text.splitlines() if line} <= {"Package", "Status", "Source", "Version"}
            elif path == "lib/apk/db/installed":
                assert "P:musl\nV:" in text and {line[:2] for line in text.splitlines() if line} <= {"P:", "V:", "o:"}
            elif path == "var/lib/rpm/rpmdb.sqlite":
                assert {"n": "bash", "e": 0, "v": "5.1.8", "r": "6.el9_1"} in json.loads(text)
            seen.add(path)
    assert "var/lib/dpkg/status" in seen


def test_python_file_name_is_trimmed_like_the_scanner() -> None:
    entries = [e for raw in (scan_record(f"py-{i}", 3000) for i in range(40))
               for v in json.loads(raw)["modules"]["Apps"].values() for e in v if e["app_name"] == "python"]
    assert entries
    for e in entries:
        name, version = e["module_name"].split(":", 1)[1], e["version"]
        assert e["file_name"].endswith(f"/{name}-{version}")  # TrimRight's cutset eats ".dist-info/WHEEL"


def test_go_json_escapes_like_encoding_json() -> None:
    assert scanrecords._go_json({"a": "<&>", "b": [1]}) == '{"a":"\\u003c\\u0026\\u003e","b":[1]}'


def test_incompressible_record() -> None:
    data = incompressible_record("sha256:ff", 4096)
    assert len(data) == 4096 and incompressible_record("sha256:fe", 4096) != data
    assert len(zlib.compress(data, 9)) >= len(data)
    assert incompressible_record("x", 0) == b""
