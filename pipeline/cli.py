"""``autolabel`` command line: ``autolabel run [--config FILE] [key=value ...]``.

Exit codes: 0 the run finished (some images may be error rows), 2 bad config or weights
(nothing was started), 1 the job failed while running.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from typing import Optional

from pipeline.config import ConfigError, allowed_keys, load_config, storage_option_sets

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2

log = logging.getLogger("autolabel")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autolabel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="label a folder/bucket of images",
        description="Run the labeling job. Overrides use dotted keys: " + ", ".join(allowed_keys()),
    )
    run.add_argument("--config", help="YAML config file (see configs/default.yaml)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in output.uri")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.set_defaults(handler=_run)
    report = sub.add_parser(
        "report",
        help="write an HTML report (+ counts.csv, summary.json) of a run",
        description="Write RUN_DIR/report/report.html (one self-contained page: totals, charts, gallery, "
        "config), counts.csv and summary.json. Reads the Parquet column by column, in bounded memory.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (output.uri of `autolabel run`), any fsspec URL")
    report.add_argument("--out", help="folder for report.html, counts.csv, summary.json (default: RUN_DIR/report)")
    report.add_argument("--group-by", default="folder", help="images column to group counts by, or 'folder' (parent folder of the URI; default)")
    report.add_argument("--gallery", type=int, default=12, help="sample images drawn with their masks: half the most crowded, half random (default 12)")
    report.add_argument("--seed", type=int, default=0, help="seed of the gallery's random picks (default 0)")
    report.add_argument("--flagged-gallery", type=int, default=12,
                        help="flagged objects drawn in the Quality section, taken in turn from each reason (default 12)")
    _filter_arguments(report)
    _storage_arguments(report, "the run folder and --out")
    report.set_defaults(handler=_report)
    export = sub.add_parser(
        "export",
        help="export a run's masks as COCO, YOLO-seg, PNG, cutouts, Label Studio tasks, or videos' tracks (YouTube-VIS, MOT, Label Studio video)",
        description="Export the ok images of RUN_DIR, streaming image by image, to --out (default RUN_DIR/exports/FORMAT).",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (output.uri of `autolabel run`), any fsspec URL")
    export.add_argument("--format", required=True, choices=["coco", "yolo", "png", "cutouts", "labelstudio", "ytvis", "mot", "labelstudio-video"],
                        help="coco: instances.json; yolo: YOLO-seg images/ labels/ data.yaml; png: instance-id PNGs; cutouts: RGBA PNG per object; "
                        "labelstudio: tasks.json (masks as brush predictions) + labeling-config.xml, for review; videos' tracks: "
                        "ytvis: YouTube-VIS instances.json (RLE per frame); mot: MOT Challenge NAME.txt per video (boxes); "
                        "labelstudio-video: tasks.json (tracks as videorectangle boxes) + labeling-config.xml")
    export.add_argument("--out", help="destination folder, any fsspec URL (default: RUN_DIR/exports/FORMAT)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --out (a folder holding only an export, recognised by its "
                        ".autolabel-export.json); any other non-empty folder is refused")
    export.add_argument("--segmentation", choices=["rle", "polygon"], default="rle", help="coco: masks as COCO RLE (lossless, default) or polygons")
    export.add_argument("--class-png", action="store_true", help="png: also write a class-id PNG per image (class_id + 1, 0 = background)")
    export.add_argument("--val-fraction", type=float, default=0.0, help="yolo: share of images put in the val split, by image id (default 0: val = train)")
    export.add_argument("--image-root", metavar="DIR_OR_URI",
                        help="labelstudio: the folder the image URLs are relative to (default: the deepest folder holding every local image); "
                        "start Label Studio with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to it")
    export.add_argument("--image-root-url", metavar="URL",
                        help="labelstudio: URL under which Label Studio can load --image-root (e.g. http://files:8081/photos); "
                        "default: /data/local-files/?d=<path> for local images, other URIs (s3://, https://) as they are")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    _filter_arguments(export)
    _storage_arguments(export, "the run folder and --out")
    export.set_defaults(handler=_export)

    review = sub.add_parser(
        "review",
        help="bring people's corrections back: import a reviewed Label Studio export",
        description="The human review loop: `autolabel export RUN --format labelstudio --flagged`, review in Label Studio, "
        "export the project as JSON, then `autolabel review import RUN FILE`. Exports and reports use the reviewed objects afterwards.",
    )
    review_sub = review.add_subparsers(dest="review_command", required=True)
    review_import = review_sub.add_parser(
        "import",
        help="record the decisions of a Label Studio JSON export in RUN/review/",
        description="Compare each reviewed task's annotation with the run's masks and record, per object, accepted, corrected "
        "(new mask/label), rejected or added in RUN_DIR/review/import-<time>.parquet (the run's own files are not touched). "
        "A later import of the same tasks supersedes earlier decisions.",
    )
    review_import.add_argument("run_dir", metavar="RUN_DIR", help="the run the tasks were exported from (any fsspec URL)")
    review_import.add_argument("file", metavar="FILE", help="Label Studio's JSON export of the project (any fsspec URL)")
    _storage_arguments(review_import, "the run folder and FILE", images=False)
    review_import.set_defaults(handler=_review_import)

    predict = sub.add_parser(
        "predict",
        help="segment one image from points / a box / a prior mask, or label it (--classes, --automatic)",
        description="Segment one object in one image (local path or fsspec URL) and write mask PNG(s), "
        "cutout.png (RGBA) and overlay.png; or, with --classes / --class-embeddings, find every object with the "
        "detector (or, with --automatic, every mask SAM finds) and write a mask PNG per object, objects.json and "
        "overlay.png. key=value sets sam.*, detector.* and automatic.* config keys as for `run`.",
    )
    predict.add_argument("image")
    predict.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]", help="click; LABEL 1 foreground (default), 0 background; repeatable")
    predict.add_argument("--box", metavar="X0,Y0,X1,Y1")
    predict.add_argument("--mask", metavar="FILE", help="prior mask PNG (nonzero = object), same size as the image")
    predict.add_argument("--classes", metavar="NAMES",
                         help="find every object of these classes with the detector and segment each: names for a YOLOE / "
                         "YOLO-World detector.weights (e.g. forklift,pallet), or ids to keep for a closed-set YOLO")
    predict.add_argument("--class-embeddings", metavar="FILE",
                         help="find every object of the classes in this .npz (ultralytics' save_prompt_embeddings; no text encoder needed)")
    predict.add_argument("--automatic", action="store_true",
                         help="segment everything: SAM 2.1's automatic mask generator with the automatic.* keys, no detector")
    predict.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=None,
                         help="three ranked candidates (default: sam.multimask, auto = only for a lone point)")
    predict.add_argument("--out", required=True, metavar="DIR")
    predict.add_argument("--config", help="YAML config file (its sam, detector and automatic sections are used)")
    predict.add_argument("overrides", nargs="*", metavar="key=value")
    predict.set_defaults(handler=_predict)
    # Each further subcommand: a sub-parser here with set_defaults(handler=...), the handler
    # importing its module lazily (so `autolabel --help` stays fast) and returning an exit code.
    return parser


def _filter_arguments(parser: argparse.ArgumentParser) -> None:
    """Object filters shared by report and export (pipeline/outputs/filters.py)."""
    parser.add_argument("--min-mask-score", type=float, help="keep objects whose mask_score (SAM's predicted IoU) is at least this")
    parser.add_argument("--min-area", type=int, help="keep objects whose mask has at least this many pixels")
    parser.add_argument("--classes", help="keep these classes: names or ids, comma-separated (e.g. person,car or 0,2)")
    flags = parser.add_mutually_exclusive_group()
    flags.add_argument("--flagged", action="store_true", help="keep the objects flagged for review (needs_review; not yet reviewed by a person)")
    flags.add_argument("--unflagged", action="store_true", help="keep the objects not flagged for review")
    parser.add_argument("--include-duplicates", action="store_true",
                        help="also keep masks marked status=duplicate (left out by default, like in num_objects)")


def _storage_arguments(parser: argparse.ArgumentParser, where: str, images: bool = True) -> None:
    """fsspec storage options for report and export: one flag for the run folder and the output, one
    for re-reading the images (they often live elsewhere, with other credentials, like the run's own
    output.storage_options and input.storage_options). Values are never printed or written."""
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help=f"fsspec option for {where}, e.g. endpoint_url=http://host:9000, key=..., secret=..., anon=true; repeatable")
    if not images:
        return
    parser.add_argument("--image-storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for re-reading the run's images (what the run had in input.storage_options; "
                        "run.json does not keep their values); repeatable")


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    # key=value overrides may come after options (`predict IMG --out D sam.size=small`), which
    # argparse cannot split with a sub-command's positional in front: collect them here.
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")  # run and predict; report and export take none
    stray = [e for e in extra if "=" not in e or e.startswith("-") or not takes_overrides]
    if stray:  # a stray key=value may be a credential meant for --storage-option: show its key only
        parser.error(f"unrecognized arguments: {' '.join(e.split('=', 1)[0] + '=...' if '=' in e and not e.startswith('-') else e for e in stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from pipeline.run import console

    log_file = console.new_log_file(args.command) if args.command == "run" else None
    with console.configured(log_file):
        return args.handler(args)


def _predict(args) -> int:
    from pipeline.predict import predict_command

    return predict_command(args)


def _run(args) -> int:
    from pipeline.run import console
    from pipeline.run.job import JobFailed, format_summary, run

    clean = console.clean
    log_file = console.current_log_file()
    try:
        cfg = load_config(args.config, args.overrides)
        console.OPTION_SETS[:] = storage_option_sets(cfg)
        console.route_ray_logs()
        log.info("log file (this run's messages, the libraries' too): %s", log_file)
        with _stopping_the_ray_it_starts():
            manifest = run(cfg, overwrite=args.overwrite)
    except ConfigError as exc:
        print(f"autolabel: error: {clean(str(exc))}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except JobFailed as exc:
        print(f"autolabel: error: the job failed: {clean(str(exc))}\n  finished shards are kept; rerun the same command to resume"
              f"\n  log: {log_file}", file=sys.stderr)
        return EXIT_FAILED
    except Exception:  # a bug or a library's own error: its traceback, without credentials
        print(f"autolabel: error: unexpected failure\n{clean(traceback.format_exc())}\n  log: {log_file}", file=sys.stderr)
        return EXIT_FAILED
    print(format_summary(manifest) + f"\n  log        {log_file}")
    return EXIT_OK if manifest["status"] == "finished" else EXIT_FAILED


@contextlib.contextmanager
def _stopping_the_ray_it_starts():
    """A Ray this command started (or connected to) is shut down before the command returns, so
    its last messages still go to the log file and no worker outlives the command."""
    import ray

    already = ray.is_initialized()
    try:
        yield
    finally:
        if not already and ray.is_initialized():
            ray.shutdown()


def _storage_options(args) -> tuple[dict, dict]:
    from pipeline.outputs.filters import parse_storage_options

    return (parse_storage_options(args.storage_option, "--storage-option"),
            parse_storage_options(getattr(args, "image_storage_option", []), "--image-storage-option"))


def _object_filter(args):
    from pipeline.outputs.filters import ObjectFilter

    return ObjectFilter.parse(args.min_mask_score, args.min_area, args.classes, flagged=args.flagged, unflagged=args.unflagged,
                              include_duplicates=args.include_duplicates)


def _report(args) -> int:
    from pipeline.io.credentials import redact
    from pipeline.outputs.filters import FilterError, OptionError
    from pipeline.outputs.report import UNREADABLE_HINT, ReportError, ReportOptions, write_report
    from pipeline.outputs.rundata import RunError

    options = images = {}
    try:
        options, images = _storage_options(args)
        filt = _object_filter(args)
        if args.gallery < 0 or args.flagged_gallery < 0:
            raise ReportError("--gallery and --flagged-gallery must be >= 0")
        result = write_report(args.run_dir, args.out, ReportOptions(group_by=args.group_by, gallery=args.gallery, filter=filt, seed=args.seed,
                                                                    flagged_gallery=args.flagged_gallery),
                              options, images)
    except (RunError, FilterError, ReportError, OptionError) as exc:
        print(f"autolabel report: error: {redact(str(exc), options, images)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    summary = result["summary"]
    totals = summary["totals"]
    quality = summary.get("quality") or {}
    flagged = f", {quality['flagged']:,} flagged for review" if quality.get("recorded") else ""
    print(f"autolabel report: {totals['images']:,} images ({totals['ok']:,} ok, {totals['error']:,} error), {totals['objects']:,} objects{flagged}")
    for name, url in result["paths"].items():
        print(f"  {name:<13} {url}")
    unreadable = summary["gallery_unreadable"]
    if unreadable:
        lines = [f"autolabel report: error: {len(unreadable)} of {summary.get('gallery_images', len(summary['gallery']))} gallery images "
                 "could not be read as the run saw them, "
                 "so the report shows their masks on blank canvases (the page says so at the top):"]
        lines += [f"  {item['uri']}: {item['reason']}" for item in unreadable[:20]]
        if len(unreadable) > 20:
            lines.append(f"  ... {len(unreadable) - 20} more (all in summary.json, gallery_unreadable)")
        lines.append("  " + UNREADABLE_HINT)
        print("\n".join(lines), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _export(args) -> int:
    from pipeline.io.credentials import redact
    from pipeline.outputs.export import ExportError, export
    from pipeline.outputs.filters import FilterError, OptionError
    from pipeline.outputs.rundata import RunError

    options = images = {}
    try:
        options, images = _storage_options(args)
        filt = _object_filter(args)
        result = export(
            args.run_dir, args.format, args.out, filt, overwrite=args.overwrite, segmentation=args.segmentation,
            class_png=args.class_png, val_fraction=args.val_fraction, progress=not args.quiet,
            storage_options=options, image_storage_options=images, image_root=args.image_root, image_root_url=args.image_root_url,
        )
    except (RunError, FilterError, ExportError, OptionError) as exc:
        print(f"autolabel export: error: {redact(str(exc), options, images)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(redact(result.summary(), options, images))
    return EXIT_FAILED if result.failed else EXIT_OK


def _review_import(args) -> int:
    from pipeline.io.credentials import redact
    from pipeline.outputs.filters import OptionError
    from pipeline.outputs.review import ReviewError, import_review
    from pipeline.outputs.rundata import RunError

    options = {}
    try:
        options, _ = _storage_options(args)
        result = import_review(args.run_dir, args.file, options)
    except (RunError, ReviewError, OptionError) as exc:
        print(f"autolabel review import: error: {redact(str(exc), options)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(result.summary())
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
