"""Counting at any scale (issue 18, part 5): each shard's commit writes a summary of the report's
numbers, and the report merges them instead of scanning every object row. Here the merged numbers
are checked against a scan of every row (``ReportOptions(summaries=False)``, and pandas over the
Parquet) on real runs: the shared labeled run (real Ray, real models), the same run reviewed, the
same run as a run made before summaries (all or some of them removed), and a run on an object
store. The resumed run is test_faults.py's (``test_a_resume_in_another_dtype_is_refused``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import counted_objects
from synthetic_run import write_synthetic_run

from pipeline.outputs.filters import ObjectFilter
from pipeline.outputs.report import ReportOptions, write_report
from pipeline.outputs.report.summaries import SCHEMA, VERSION

VOLATILE = ("generated_at", "shards", "run")  # when it was made, how it was counted, where the run was


def report(run, out: Path, summaries: bool = True, **options) -> tuple[dict, str, dict]:
    """(summary.json without what may differ, counts.csv, how the shards were counted)."""
    result = write_report(str(run), str(out), ReportOptions(gallery=4, flagged_gallery=4, summaries=summaries, **options))
    summary = json.loads(Path(out, "summary.json").read_text())
    shards = summary["shards"]
    return {k: v for k, v in summary.items() if k not in VOLATILE}, Path(out, "counts.csv").read_text(), {**shards, **result["paths"]}


def assert_merged_equals_scan(run, tmp_path: Path, **options) -> dict:
    merged, merged_csv, how = report(run, tmp_path / "merged", **options)
    scanned, scanned_csv, how_scanned = report(run, tmp_path / "scanned", summaries=False, **options)
    assert how_scanned["from_summaries"] == 0
    assert merged == scanned
    assert merged_csv == scanned_csv
    return how


def copy_run(labeled, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(labeled["out"], run, ignore=shutil.ignore_patterns("report", "exports"))
    return run


def test_every_commit_wrote_its_shards_summary(labeled):
    out = labeled["out"]
    parts = sorted(p.name for p in (out / "images").glob("*.parquet"))
    assert len(parts) >= 3 and sorted(p.name for p in (out / "summaries").glob("*.parquet")) == parts
    for name in parts:
        summary = pq.read_table(out / "summaries" / name)
        assert summary.schema == SCHEMA and set(summary.column("version").to_pylist()) == {VERSION}
        rows = summary.to_pandas()
        images, objects = pq.read_table(out / "images" / name).to_pandas(), pq.read_table(out / "objects" / name).to_pandas()
        counted = counted_objects(objects)
        shard = rows[rows.kind == "shard"].iloc[0]
        assert shard["shard"] == name.removesuffix(".parquet") and (shard["key"], shard["value"]) == (images.uri.min(), images.uri.max())
        assert int(rows[rows.kind == "images"]["images"].sum()) == len(images)
        classes = rows[rows.kind == "class"]
        assert dict(zip(classes.class_name, classes.objects)) == counted.class_name.value_counts().to_dict()
        assert int(classes.flagged.sum()) == int(counted.needs_review.sum()) == int(images.num_flagged.fillna(0).sum())


def test_the_report_merges_summaries_and_its_numbers_equal_a_scan(labeled, tmp_path):
    out = labeled["out"]
    how = assert_merged_equals_scan(out, tmp_path)
    assert (how["from_summaries"], how["scanned"]) == (len(list((out / "images").glob("*.parquet"))), 0)
    # ... and a scan by other means: pandas over the Parquet.
    summary = json.loads((tmp_path / "merged" / "summary.json").read_text())
    images, objects = labeled["images"], counted_objects(labeled["objects"])
    t = summary["totals"]
    assert (t["images"], t["ok"], t["error"], t["objects"]) == (len(images), (images.status == "ok").sum(), (images.status != "ok").sum(), len(objects))
    assert {c["class_name"]: c["count"] for c in t["objects_by_class"]} == objects.class_name.value_counts().to_dict()
    assert t["images_with_objects"] == objects.image_id.nunique()
    h = summary["histograms"]
    bins = np.clip(np.floor(objects.mask_score.astype(np.float32) * np.float32(50)), 0, 49).astype(int)
    assert h["mask_score"]["counts"] == np.bincount(bins, minlength=50).tolist()
    assert sum(h["area"]["counts"]) == len(objects)
    exact = np.quantile(objects.area, [0.05, 0.25, 0.5, 0.75, 0.95])
    assert np.allclose(list(h["area"]["quantiles"].values()), exact, rtol=0.012, atol=0.5)
    q = summary["quality"]
    assert q["recorded"] and q["flagged"] == int(objects.needs_review.sum())
    reasons = pd.Series([r for flags in objects[objects.needs_review]["flags"] for r in flags]).value_counts().to_dict()
    assert q["flagged_by_reason"] == reasons
    folder = objects.uri.str.rsplit("/", n=1).str[0]
    assert {g["group"]: g["objects"] for g in summary["groups"] if g["objects"]} == objects.groupby(folder).size().to_dict()


def test_a_run_without_summaries_reports_the_same_by_scanning(labeled, tmp_path):
    """A run made before summaries (none at all), and one resumed across the change (some shards without)."""
    run = copy_run(labeled, tmp_path)
    expected = report(run, tmp_path / "with")[:2]
    first = sorted((run / "summaries").iterdir())[0]
    first.unlink()
    assert report(run, tmp_path / "some")[:2] == expected
    assert report(run, tmp_path / "some-again")[2]["scanned"] == 1
    shutil.rmtree(run / "summaries")
    without, csv_text, how = report(run, tmp_path / "none")
    assert (without, csv_text) == expected and how["from_summaries"] == 0


def _encode(mask: np.ndarray) -> list[int]:
    """A mask as Label Studio's tools write it (255 in the four RGBA bytes of each mask pixel)."""
    from label_studio_converter import brush

    return brush.encode_rle(np.repeat(mask.astype(np.uint8).ravel() * 255, 4))


def _review(run: Path, tmp_path: Path, label: str) -> dict:
    """A Label Studio review of two images imported into ``run``: on one, a region corrected (its right
    half erased) and another rejected; on the other, a region relabeled ``label`` and a new one drawn. Returns
    the import's counts and the reviewed images."""
    from pipeline.outputs import labelstudio as ls
    from pipeline.outputs.export import export
    from pipeline.outputs.review import import_review

    export(str(run), "labelstudio", str(tmp_path / "ls"), progress=False)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    rich = [t for t in tasks if len(t["predictions"][0]["result"]) >= 2] if tasks else []
    assert len(rich) >= 2, "the labeled run has images with two objects or more"
    reviewed = []
    for n, task in enumerate(rich[:2]):
        meta = task["data"][ls.DATA_KEY]
        h, w = meta["height"], meta["width"]
        regions = [dict(r, value=dict(r["value"])) for r in task["predictions"][0]["result"]]
        if n == 0:
            mask = ls.rle_decode(regions[0]["value"]["rle"], h, w)
            xs = np.nonzero(mask)[1]
            mask[:, (xs.min() + xs.max() + 1) // 2:] = False
            regions[0]["value"]["rle"] = _encode(mask)
            regions.pop(1)
        else:
            regions[0]["value"]["brushlabels"] = [label]
            mask = np.zeros((h, w), bool)
            mask[h // 4:h // 2, w // 4:w // 2] = True
            regions.append({"id": "new-region", "from_name": "label", "to_name": "image", "type": "brushlabels", "origin": "manual",
                            "original_width": w, "original_height": h, "image_rotation": 0,
                            "value": {"format": "rle", "rle": _encode(mask), "brushlabels": [label]}})
        reviewed.append({"id": n + 1, "data": task["data"], "predictions": [n + 1],
                         "annotations": [{"id": n + 1, "result": regions, "was_cancelled": False, "completed_by": 1}]})
    (tmp_path / "reviewed.json").write_text(json.dumps(reviewed))
    result = import_review(str(run), str(tmp_path / "reviewed.json"))
    return {"decisions": result.decisions, "images": {t["data"][ls.DATA_KEY]["image_id"] for t in rich[:2]}}


def test_a_reviewed_run_scans_only_the_shards_its_review_touched(labeled, tmp_path):
    run = copy_run(labeled, tmp_path)
    report(run, tmp_path / "before")
    before = json.loads((tmp_path / "before" / "summary.json").read_text())
    label = next(n for n in json.loads((run / "run.json").read_text())["class_names"].values()
                 if n not in {c["class_name"] for c in before["totals"]["objects_by_class"]})
    review = _review(run, tmp_path, label)
    d = review["decisions"]
    assert d["corrected"] == 2 and d["rejected"] == 1 and d["added"] == 1
    how = assert_merged_equals_scan(run, tmp_path)
    images = pd.concat([pq.read_table(p).to_pandas().assign(part=p.name) for p in sorted((run / "images").glob("*.parquet"))])
    touched = images[images.image_id.isin(review["images"])].part.nunique()
    assert how["scanned"] == touched < images.part.nunique() and how["from_summaries"] == images.part.nunique() - touched
    after = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert after["totals"]["objects"] == before["totals"]["objects"] - 1 + 1  # one rejected, one added
    classes = {c["class_name"]: c["count"] for c in after["totals"]["objects_by_class"]}
    assert classes[label] == 2  # relabeled, and drawn
    # A filtered report cannot be merged from summaries: every shard is scanned, and still equals the full scan.
    how = assert_merged_equals_scan(run, tmp_path / "filtered", filter=ObjectFilter.parse(min_area=50))
    assert how["from_summaries"] == 0


@pytest.mark.parametrize("qa", [True, False])
def test_summaries_on_an_object_store_merge_to_the_scan(tmp_path, qa):
    """A run in fsspec's memory store (remote: summaries read through pyarrow, not duckdb's own reader),
    with and without QA columns, grouped by folder."""
    src = f"memory://counting-{qa}/run"
    write_synthetic_run(src, num_images=90, mean_objects=4.0, image_folder=tmp_path / "img", seed=5, qa=qa, images_per_part=16,
                        summaries=True)
    merged, merged_csv, how = report(src, tmp_path / "merged")
    assert how["from_summaries"] == 6 and how["scanned"] == 0
    assert report(src, tmp_path / "scanned", summaries=False)[:2] == (merged, merged_csv)


def test_the_first_crowded_images_and_errors_of_many_shards_come_from_a_few_summaries(tmp_path, monkeypatch):
    """80 shards, their summaries read 7 at a time: the gallery's 32 most crowded images and the first
    20 error rows are read from the summaries of the shards that may hold them only, and are those of a scan."""
    from pipeline.outputs.report import stats as report_stats
    from pipeline.outputs.report.stats import RunStats
    from pipeline.outputs.rundata import RunData

    monkeypatch.setattr(report_stats, "SUMMARY_BATCH", 7)

    run = tmp_path / "run"
    write_synthetic_run(str(run), num_images=400, mean_objects=5.0, images_per_part=5, error_every=7, seed=8, summaries=True)
    got = {}
    for summaries in (True, False):
        stats = RunStats(RunData(str(run)), ReportOptions(gallery=64, summaries=summaries))
        try:
            got[summaries] = (stats.gallery_picks(), stats.errors_sample(), stats.totals(), stats.histograms(), stats.groups())
            if summaries:
                assert len(stats.summarized) == 80 and 20 <= len(stats._sample_sources()) < 80
        finally:
            stats.close()
    assert got[True] == got[False]
    assert [p["why"] for p in got[True][0]].count("most objects") == 32 and len(got[True][1]) == 20


def test_scale_benchmark_simulation_runs_small(tmp_path):
    """benchmarks/report_scale.py --simulate, small: the summaries of 30 shards, copies of two real ones."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import report_scale
    finally:
        sys.path.pop(0)
    result = report_scale.simulate(tmp_path, shards=30, objects_per_shard=300)
    templates = [pq.read_table(p).to_pandas() for p in sorted((tmp_path / "templates" / "summaries").glob("*.parquet"))]
    per_template = [int(t[t.kind == "class"].objects.sum()) for t in templates]
    assert result["shards"] == {"from_summaries": 30, "scanned": 0}
    assert result["simulated_objects"] == 15 * sum(per_template)
    assert result["peak_rss_mib"] > 0 and result["numbers_s"] >= 0
    summary = json.loads((tmp_path / "run" / "report" / "summary.json").read_text())
    assert all(g["drawn"] == g["n"] for g in summary["gallery"])  # the gallery found its images' rows in the stand-in parts
