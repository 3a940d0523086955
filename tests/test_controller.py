"""What the controller prints, byte for byte: its REST structs' omitempty rules over nvcache's numbers.

The expected strings are written out by hand from the rules (controller/api/apis.go: every field
omitempty, last_referred a time.Time struct and so always there, reference_count a uint32) and from
the reference page's rendering (sorted keys, 2-space indent, the prettytable). The API tests run
over both cores; the CLI ones use the package's core, on caches closed before the CLI opens them.
"""

from typing import List

import pytest
from click.testing import CliRunner

from nvcache import LayerCache
from nvcache.cli import cli
from nvcache.controller import UINT32_MAX, controller_stat, controller_view
from payloads import incompressible
from test_cli import SEED_STAT_NONE

T1 = 1727434640_230068879  # 2024-09-27T10:57:20.230068879Z
T2 = 1727434641_000000000  # 2024-09-27T10:57:21Z
A = "sha256:" + "a1" * 32
B = "sha256:" + "b2" * 32

STAT_NONE = SEED_STAT_NONE + "\n"  # the reference page's table, as the CLI prints it

ZERO_REFS_DATA = """\
{
  "cache_records": [
    {
      "last_referred": "2024-09-27T10:57:20.230068879Z",
      "layer_id": "sha256:a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1_layer_file",
      "size": 5
    }
  ],
  "record_total_size": 5
}"""
ZERO_REFS_STAT = """\
+-------------------+-------+
| Field             | Value |
+-------------------+-------+
| cache_misses      | None  |
| cache_hits        | None  |
| record_count      | 1     |
| record_total_size | 5     |
+-------------------+-------+
"""

FULL_DATA = """\
{
  "cache_hits": 68,
  "cache_misses": 17,
  "cache_records": [
    {
      "last_referred": "2024-09-27T10:57:20.230068879Z",
      "layer_id": "sha256:a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1_layer_file",
      "reference_count": 4,
      "size": 5
    },
    {
      "last_referred": "2024-09-27T10:57:21Z",
      "layer_id": "sha256:b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2_layer_file",
      "reference_count": 36,
      "size": 170
    }
  ],
  "record_total_size": 175
}"""
FULL_STAT = """\
+-------------------+-------+
| Field             | Value |
+-------------------+-------+
| cache_misses      | 17    |
| cache_hits        | 68    |
| record_count      | 2     |
| record_total_size | 175   |
+-------------------+-------+
"""

BIG_REFS_DATA = """\
{
  "cache_records": [
    {
      "last_referred": "2024-09-27T10:57:20.230068879Z",
      "layer_id": "sha256:a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1_layer_file",
      "reference_count": 4294967295,
      "size": 5
    },
    {
      "last_referred": "2024-09-27T10:57:21Z",
      "layer_id": "sha256:b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2_layer_file",
      "reference_count": 4294967295,
      "size": 170
    }
  ],
  "record_total_size": 175
}"""


def _fill_full(cache: LayerCache) -> None:
    assert cache.restore(A, incompressible(5, "a"), reference_count=4, last_referred_ns=T1)
    assert cache.restore(B, incompressible(170, "b"), reference_count=36, last_referred_ns=T2)
    cache.add_counters(68, 17)


def _cli(args: List[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_an_empty_cache_prints_an_empty_object(make_cache):
    cache = make_cache()
    assert cache.cache_data() == {"cache_hits": 0, "cache_misses": 0, "cache_records": [],
                                  "record_total_size": 0}  # the API keeps every key
    assert cache.cache_data_json() == "{}"


def test_a_record_of_zero_references_has_no_reference_count(make_cache):
    cache = make_cache()
    assert cache.restore(A, incompressible(5, "a"), reference_count=0, last_referred_ns=T1)
    assert cache.cache_data()["cache_records"][0]["reference_count"] == 0
    assert cache.cache_data_json() == ZERO_REFS_DATA


def test_nonzero_everything_prints_every_field(make_cache):
    cache = make_cache()
    _fill_full(cache)
    assert cache.cache_data_json() == FULL_DATA


def test_reference_counts_beyond_uint32_saturate(make_cache):
    cache = make_cache()
    # 2**32 would wrap to 0 in a Go uint32 conversion (and vanish under omitempty): it saturates.
    assert cache.restore(A, incompressible(5, "a"), reference_count=2**32, last_referred_ns=T1)
    assert cache.restore(B, incompressible(170, "b"), reference_count=2**64 - 1, last_referred_ns=T2)
    assert [r["reference_count"] for r in cache.cache_data()["cache_records"]] == [2**32, 2**64 - 1]
    assert cache.cache_data_json() == BIG_REFS_DATA


def test_the_cli_prints_the_controllers_bytes(tmp_path):
    empty, zero, full = (str(tmp_path / name) for name in ("empty", "zero", "full"))
    LayerCache(empty, 1).close()
    with LayerCache(zero, 1) as cache:
        cache.restore(A, incompressible(5, "a"), reference_count=0, last_referred_ns=T1)
    with LayerCache(full, 1) as cache:
        _fill_full(cache)
    assert _cli(["--path", empty, "data"]) == "{}\n"
    assert _cli(["--path", empty, "stat"]) == STAT_NONE  # zeros are None, as without a cache
    assert _cli(["--path", zero, "data"]) == ZERO_REFS_DATA + "\n"
    assert _cli(["--path", zero, "stat"]) == ZERO_REFS_STAT
    assert _cli(["--path", full, "data"]) == FULL_DATA + "\n"
    assert _cli(["--path", full, "stat"]) == FULL_STAT
    # --json is nvcache's own numbers: zeros stay zeros.
    assert _cli(["--path", empty, "stat", "--json"]) == (
        '{\n  "cache_misses": 0,\n  "cache_hits": 0,\n  "record_count": 0,\n  "record_total_size": 0\n}\n')


def test_controller_view_rules_on_their_own():
    record = {"last_referred": "2024-09-27T10:57:21Z", "layer_id": "", "reference_count": 0, "size": 0}
    # An empty string and zeros go; a time never does.
    assert controller_view({"cache_hits": 0, "cache_misses": None, "cache_records": [record],
                            "record_total_size": 0}) == {
        "cache_records": [{"last_referred": "2024-09-27T10:57:21Z"}]}
    assert controller_view({"cache_hits": None, "cache_misses": None, "cache_records": [],
                            "record_total_size": None}) == {}
    refs = [UINT32_MAX - 1, UINT32_MAX, UINT32_MAX + 1, 2**33]
    shown = controller_view({"cache_records": [dict(record, layer_id="x_y", reference_count=n) for n in refs]})
    assert [r["reference_count"] for r in shown["cache_records"]] == [UINT32_MAX - 1] + [UINT32_MAX] * 3
    assert controller_stat({"cache_hits": 3, "cache_misses": 0, "record_count": None,
                            "record_total_size": 9}) == {
        "cache_misses": None, "cache_hits": 3, "record_count": None, "record_total_size": 9}
    assert list(controller_stat({})) == ["cache_misses", "cache_hits", "record_count", "record_total_size"]


@pytest.mark.parametrize("refs,shown", [(1, 1), (UINT32_MAX, UINT32_MAX), (UINT32_MAX + 1, UINT32_MAX)])
def test_one_record_round_trips_through_the_rule(make_cache, refs, shown):
    cache = make_cache()
    cache.restore(A, b"a", reference_count=refs, last_referred_ns=T2)
    expected = ('{\n  "cache_records": [\n    {\n      "last_referred": "2024-09-27T10:57:21Z",\n'
                f'      "layer_id": "{A}_layer_file",\n      "reference_count": {shown},\n      "size": 1\n'
                '    }\n  ],\n  "record_total_size": 1\n}')
    assert cache.cache_data_json() == expected
