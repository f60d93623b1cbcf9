"""Listing an object store at scale: a real moto S3 server on loopback with 22,000 keys.

``iter_image_uris`` lists s3:// page by page (ListObjectsV2, 1,000 keys a page) and keeps
nothing in s3fs's listings cache, so the driver's memory while listing does not grow with the
bucket. The control is what the listing did before (``fs.walk``, as ``fs.find``/``fs.glob`` do
too): its memory grows with the keys and every key stays in the cache. Listing results are
checked against fsspec's own walk and glob on the same bucket: same images, globs matched the
same way (``*``, ``?``, ``[...]``, ``**``), hidden files and folders skipped.
"""
from __future__ import annotations

import gc
import tracemalloc

import pytest
import s3fs

from moto_server import start_moto
from pipeline.io.listing import SourceError, iter_image_uris, iter_tar_uris

EXT = [".jpg", ".png"]
SMALL, LARGE = 2_000, 20_000
PER_FOLDER = 1_000  # keys per "folder", like a real dataset's layout

ODD_KEYS = [
    "photos/a.jpg", "photos/abc.jpg", "photos/b.PNG", "photos/.hidden.jpg", "photos/notes.txt", "photos/sub/c.jpg",
    "photos/sub/deep/d.jpg", "photos/.thumbs/t.jpg", "photos/sub/.git/g.jpg", "photos/x/y.jpg", "photos.jpg",
    "photos/dir/", "other/z.jpg", "photos/a/b.jpg", "shards/s-000.tar", "shards/s-001.tar", "shards/x/s-002.tar",
]


def _folders(prefix: str, n: int) -> list:
    return [[f"{prefix}/d{d:03d}/img{{0:06d}}.jpg", PER_FOLDER, "x"] for d in range(n // PER_FOLDER)]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    preload = {
        "big": [*_folders(f"k{SMALL}", SMALL), *_folders(f"k{LARGE}", LARGE)],
        "mixed": [
            *[[key, 1, "x"] for key in ODD_KEYS],
            ["photos/.cache/c{0:05d}.jpg", 2500, "x"],  # a hidden folder longer than a listing page
            ["photos/zz/{0:04d}.jpg", 1200, "x"],
        ],
    }
    server = start_moto(tmp_path_factory.mktemp("moto-big"), preload)
    yield server
    server.stop()


def _fs(server) -> s3fs.S3FileSystem:
    """The instance the listing code gets for these storage options (fsspec caches instances)."""
    from fsspec.core import url_to_fs

    return url_to_fs("s3://big", **server.options)[0]


def _walk_as_before(server, path: str):
    """CONTROL: how the driver listed s3:// before (``fs.walk``, hidden folders pruned)."""
    fs = _fs(server)
    for root, dirs, files in fs.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(tuple(EXT)) and not name.startswith("."):
                yield f"s3://{root}/{name}"


def _traced_peak(listing) -> tuple[int, int]:
    """(keys listed, peak bytes Python allocated while listing them, the yielded URIs dropped)."""
    gc.collect()
    tracemalloc.start()
    count = sum(1 for _ in listing)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return count, peak


def _cached_entries(fs) -> int:
    return sum(len(v) for v in fs.dircache.values())


def test_listing_memory_is_flat_from_2000_to_20000_keys(bucket):
    fs = _fs(bucket)
    fs.invalidate_cache()
    list(iter_image_uris("s3://mixed/photos/sub", EXT, bucket.options))  # warm up: client, service model
    new = {n: _traced_peak(iter_image_uris(f"s3://big/k{n}", EXT, bucket.options)) for n in (SMALL, LARGE)}
    assert new[SMALL][0] == SMALL and new[LARGE][0] == LARGE
    assert _cached_entries(fs) == 0, "the streamed listing left keys in s3fs's listings cache"
    old = {}
    for n in (SMALL, LARGE):
        fs.invalidate_cache()
        old[n] = _traced_peak(_walk_as_before(bucket, f"big/k{n}"))
    cached_after_old = _cached_entries(fs)
    fs.invalidate_cache()
    mb = {k: {n: round(p / 2**20, 2) for n, (_, p) in v.items()} for k, v in (("streamed", new), ("walk", old))}
    print(f"\nlisting peak MB (tracemalloc): {mb}; s3fs cache after the walk of {LARGE}: {cached_after_old} entries")
    # Flat: ten times the keys, at most 25% (and under 1 MB) more at the peak; one page of 1,000
    # keys (parsed XML + dicts) is what it holds.
    assert new[LARGE][1] <= 1.25 * new[SMALL][1] and new[LARGE][1] - new[SMALL][1] < 2**20, mb
    # Control: the walk as before grows with the keys (and keeps every one of them cached), so
    # this measurement would catch a listing that holds the bucket.
    assert old[LARGE][0] == LARGE and cached_after_old >= LARGE
    assert old[LARGE][1] > 5 * old[SMALL][1] and old[LARGE][1] > 5 * new[LARGE][1], mb


def test_listing_matches_fsspec_walk_and_glob(bucket):
    fs = _fs(bucket)
    fs.invalidate_cache()
    listed = list(iter_image_uris("s3://mixed/photos", EXT, bucket.options))
    assert listed == sorted(listed), "key order (S3's lexicographic order), the same on every run"
    assert set(listed) == set(_walk_as_before(bucket, "mixed/photos"))
    assert len(listed) == 1207 and "s3://mixed/photos/b.PNG" in listed  # suffixes match in any case
    assert not [u for u in listed if "/." in u]  # .hidden.jpg, .thumbs/, sub/.git/, .cache/ skipped
    # The 2,500 keys of photos/.cache/ fill more than a page: the listing skips past the rest of
    # that folder instead of paging through it (1 one-key probe of what the URI is + 3 pages, not 5).
    fs.invalidate_cache()  # (the control walk above filled it: the probe would be answered from there)
    before = bucket.requests("GET", "/mixed?list-type=2")
    assert len(list(iter_image_uris("s3://mixed/photos", EXT, bucket.options))) == 1207
    assert bucket.requests("GET", "/mixed?list-type=2") - before == 4
    assert _cached_entries(fs) == 0

    def as_fsspec_globs(pattern: str) -> list[str]:
        """CONTROL: the old glob (fs.glob, materialised), filtered as the listing filters."""
        path = f"mixed/{pattern}"
        head = path[: min(path.index(c) for c in "*?[" if c in path)]
        fixed = head.rsplit("/", 1)[0]
        fs.invalidate_cache()
        return [f"s3://{m}" for m in sorted(fs.glob(path)) if m.lower().endswith((".jpg", ".png")) and fs.isfile(m)
                and not any(p.startswith(".") for p in m[len(fixed):].split("/") if p)]

    for pattern in ["photos/*.jpg", "photos/**/*.jpg", "photos/*/*.jpg", "photos/a*", "photos/**", "photos/[ab]*.jpg",
                    "photos/[!a]*", "photos/?.jpg", "photos/**/d.jpg", "photos/sub/**/*.jpg", "*.jpg", "**/*.jpg", "pho*/a.jpg"]:
        fs.invalidate_cache()
        streamed = list(iter_image_uris(f"s3://mixed/{pattern}", EXT, bucket.options))
        assert _cached_entries(fs) == 0, pattern
        assert streamed == as_fsspec_globs(pattern), pattern
    # One object named explicitly is taken whatever its suffix; a prefix with nothing is an error.
    assert list(iter_image_uris("s3://mixed/photos/notes.txt", EXT, bucket.options)) == ["s3://mixed/photos/notes.txt"]
    with pytest.raises(SourceError, match="nothing found at s3://mixed/nope"):
        list(iter_image_uris("s3://mixed/nope", EXT, bucket.options))
    # Tar shards: globs stream the same way (objects only, any depth with **), braces are expanded.
    assert list(iter_tar_uris("s3://mixed/shards/*.tar", bucket.options)) == ["s3://mixed/shards/s-000.tar", "s3://mixed/shards/s-001.tar"]
    assert list(iter_tar_uris("s3://mixed/shards/**/s-*.tar", bucket.options))[-1] == "s3://mixed/shards/x/s-002.tar"
    assert list(iter_tar_uris("s3://mixed/shards/s-{000..001}.tar", bucket.options)) == ["s3://mixed/shards/s-000.tar", "s3://mixed/shards/s-001.tar"]
