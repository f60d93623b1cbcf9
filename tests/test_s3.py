"""Object storage for real: a moto S3 server on loopback, read and written by the job through s3fs.

The test fills a bucket (real photos, a broken JPEG, an object a bucket policy forbids reading,
a tar shard), runs ``autolabel run`` as a subprocess reading from and writing to the server, and
checks the output — and that the credentials appear nowhere: not in stdout/stderr, run.json, the
Parquet files, the report, nor any error message.
"""
from __future__ import annotations

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest

from bad_inputs import write_tar
from conftest import REPO, autolabel_cli, model_overrides
from pipeline.errors import ImageError
from pipeline.io.decode import iter_tar_members, read_bytes

KEY = "AKIAAUTOLABELTEST7Q2X"
SECRET = "s3SECa1/s3SECb2:s3SECc3@s3SECd4%s3SECe5+s3SECf6"  # '/', ':', '@', '%' and '+' inside
PHOTOS = {"coffee.png": "coffee.png", "chelsea.jpg": "nested/chelsea.jpg"}


@pytest.fixture(scope="module")
def s3(photo_folder, tmp_path_factory):
    """moto's S3 server on 127.0.0.1, with a data bucket and an empty runs bucket."""
    import boto3

    from moto_server import start_moto

    server = start_moto(tmp_path_factory.mktemp("moto"))
    endpoint = server.endpoint
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1")
    client.create_bucket(Bucket="data")
    client.create_bucket(Bucket="runs")
    for name, src in PHOTOS.items():
        client.put_object(Bucket="data", Key=f"photos/{name}", Body=(photo_folder / src).read_bytes())
    client.put_object(Bucket="data", Key="photos/bad/broken.jpg", Body=b"\xff\xd8\xff\xe0 not really a jpeg")
    client.put_object(Bucket="data", Key="photos/locked/private.jpg", Body=(photo_folder / "coffee.png").read_bytes())
    write_tar_path = tmp_path_factory.mktemp("tar") / "s.tar"
    write_tar(write_tar_path, {"a/coffee.png": (photo_folder / "coffee.png").read_bytes(), "a/coffee.json": b"{}"})
    client.put_object(Bucket="data", Key="shards/s-000000.tar", Body=write_tar_path.read_bytes())
    # A real access-control refusal: the bucket policy denies GetObject on one key (moto enforces it).
    client.put_bucket_policy(Bucket="data", Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::data/photos/locked/*"}],
    }))
    yield {"endpoint": endpoint, "client": client, "options": {"endpoint_url": endpoint, "key": KEY, "secret": SECRET},
           "photo_bytes": {name: (photo_folder / src).read_bytes() for name, src in PHOTOS.items()}}
    server.stop()


def test_reads_and_tar_streams_over_s3_and_a_policy_denial_is_permission_denied(s3):
    opts = s3["options"]
    assert read_bytes("s3://data/photos/bad/broken.jpg", opts).startswith(b"\xff\xd8")
    with pytest.raises(ImageError) as err:
        read_bytes("s3://data/photos/locked/private.jpg", opts)
    assert err.value.error_class == "permission_denied" and SECRET not in str(err.value) and KEY not in str(err.value)
    with pytest.raises(ImageError) as err:
        read_bytes("s3://data/photos/nope.jpg", opts)
    assert err.value.error_class == "not_found"
    members = list(iter_tar_members("s3://data/shards/s-000000.tar", None, (".png",), opts))
    assert [u for u, _ in members] == ["s3://data/shards/s-000000.tar#a/coffee.png"]  # the .json sibling is skipped
    assert members[0][1] == s3["photo_bytes"]["coffee.png"]
    gone = list(iter_tar_members("s3://data/shards/s-000009.tar", None, (".png",), opts))
    assert [(u, v.error_class) for u, v in gone] == [("s3://data/shards/s-000009.tar", "not_found")]


def test_missing_credentials_are_a_read_error_row_not_a_crash(s3, monkeypatch):
    """botocore's NoCredentialsError is not an OSError: it must still become a read_error (one
    row), not kill the worker on every retry."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata to ask
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    no_keys = {"endpoint_url": s3["endpoint"]}
    with pytest.raises(ImageError) as err:
        read_bytes("s3://data/photos/coffee.png", no_keys)
    assert err.value.error_class == "read_error" and "NoCredentialsError" in str(err.value)
    (gone,) = list(iter_tar_members("s3://data/shards/s-000000.tar", None, (".png",), no_keys))
    assert gone[0] == "s3://data/shards/s-000000.tar" and gone[1].error_class == "read_error"


# Secrets as users have them, with '/' (half of AWS secret keys), ':', '@' and '%' inside; every
# part between those characters is distinctive, so a piece of a secret is found as well.
HTTP_USER, HTTP_PASSWORD = "htUSERz9", "htPWa1/htPWb2:htPWc3@htPWd4%htPWe5"
SIGNATURE, CREDENTIAL = "SIG0autolabel0f00d", "CRED0autolabel0beef"


def typed(secret: str) -> str:
    """A secret as a user pastes it into a URI: raw, but '%' (which starts an escape) as %25."""
    return secret.replace("%", "%25")


def signed_url(server, name: str) -> str:
    """A weights URL with basic auth and a signed query string, as users paste them."""
    return (f"http://{HTTP_USER}:{typed(HTTP_PASSWORD)}@{server.host}/{name}"
            f"?X-Amz-Signature={SIGNATURE}&X-Amz-Credential={CREDENTIAL}")


@pytest.fixture(scope="module")
def weights_server(checkpoints):
    """HTTP on loopback serving the checkpoints only with basic auth and a signature in the query."""
    from http_server import FolderServer

    server = FolderServer(checkpoints["sam"].parent, HTTP_USER, HTTP_PASSWORD, signature=SIGNATURE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def loopback_ray(tmp_path_factory):
    """A one-node Ray cluster that outlives the jobs run on it, so its task and actor tables and its
    logs can be searched afterwards. No AWS credentials of its own, and no metadata service to ask."""
    from cluster_harness import LoopbackCluster

    root = tmp_path_factory.mktemp("ray")
    env = {**{k: None for k in os.environ if k.startswith("AWS_")}, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": str(root / "none"), "AWS_CONFIG_FILE": str(root / "none"),
           "AUTOLABEL_CACHE": str(root / "cache")}
    cluster = LoopbackCluster.start(root, head_cpus=2, workers=(), env=env)
    yield cluster
    cluster.stop()


# ------------------------------------------------------------------ the search for secrets


def _secret_forms(secrets: list[str]) -> list[str]:
    """Each secret, its percent-encoded forms, its parts between special characters, and the basic-auth
    token of the HTTP user and password."""
    import base64
    import re
    from urllib.parse import quote

    forms = {HTTP_USER, base64.b64encode(f"{HTTP_USER}:{HTTP_PASSWORD}".encode()).decode()}
    for secret in secrets:
        forms |= {secret, quote(secret, safe=""), typed(secret)}
        forms |= {part for part in re.split(r"[/:@%+]", secret) if len(part) >= 5}
    return sorted(forms)


def decoded_files(fs, root: str) -> dict[str, str]:
    """Every file under ``root`` as text: Parquet decoded (values compressed in a page would not
    show in its bytes), everything else as its bytes."""
    import io

    texts = {}
    for path in fs.find(root):
        data = fs.cat_file(path)
        text = data.decode("utf-8", errors="replace")
        if path.endswith(".parquet"):
            text += json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str)
        texts[path] = text
    return texts


def ray_records(cluster) -> dict[str, str]:
    """What the cluster keeps about the jobs: `ray list tasks/actors` in detail, and every log file
    of every node's session."""
    from pathlib import Path

    texts = {}
    for kind in ("tasks", "actors"):
        proc = cluster.ray_cli("list", kind, "--address", cluster.dashboard, "--detail", "--format", "json", "--limit", "10000")
        assert proc.returncode == 0, proc.stderr[-2000:]
        texts[f"ray list {kind}"] = proc.stdout
    for node in cluster.nodes:
        for path in Path(node.temp_dir).glob("session_*/logs/**/*"):
            if path.is_file():
                texts[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
    assert json.loads(texts["ray list tasks"]) and json.loads(texts["ray list actors"])
    assert any(name.endswith((".out", ".err", ".log")) for name in texts)  # the nodes' logs were found
    return texts


def assert_no_secret(secrets: list[str], texts: dict[str, str]) -> None:
    found = [f"{form!r} in {where}" for where, text in texts.items() for form in _secret_forms(secrets) if form in text]
    assert not found, "credentials leaked:\n  " + "\n  ".join(found[:20])


@pytest.mark.slow
def test_job_reads_from_and_writes_to_s3_without_leaking_credentials(s3, checkpoints, weights_server, loopback_ray, tmp_path):
    """Credentials given every way a user gives them: ``s3://KEY:SECRET@bucket`` in input.uri and
    output.uri with the secret's '/', ':' and '@' as typed (issue 16 item 5: such a secret stayed in
    the URI, in run.json, and preflight failed with botocore's raw error), weights URLs with
    ``user:password@`` and a signed query string. The job runs on a Ray cluster that outlives it;
    no credential may show in its output, any file it wrote (Parquet decoded), the exports, `ray
    list tasks/actors` or the cluster's logs."""
    import s3fs

    endpoint_only = json.dumps({"endpoint_url": s3["endpoint"]})
    creds = f"{KEY}:{typed(SECRET)}@"
    env = {k: v for k, v in loopback_ray.env.items() if not k.startswith("AWS_")}
    proc = subprocess.run(
        [*autolabel_cli(), "run", f"input.uri=s3://{creds}data/photos", f"output.uri=s3://{creds}runs/r1",
         f"input.storage_options={endpoint_only}", f"output.storage_options={endpoint_only}", f"ray.address={loopback_ray.address}",
         "sam.device=cpu", "report.gallery=2", *model_overrides(checkpoints),
         f"sam.checkpoint={signed_url(weights_server, checkpoints['sam'].name)}",
         f"detector.weights={signed_url(weights_server, checkpoints['yolo'].name)}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    logs = {"autolabel run": proc.stdout + proc.stderr}
    assert proc.returncode == 0, logs["autolabel run"][-4000:]
    fs = s3fs.S3FileSystem(endpoint_url=s3["endpoint"], key=KEY, secret=SECRET)
    fs.invalidate_cache()
    run_json = json.loads(fs.cat_file("runs/r1/run.json"))
    assert run_json["status"] == "finished"
    assert run_json["config"]["input"]["storage_options"] == {"endpoint_url": "***", "key": "***", "secret": "***"}
    assert run_json["totals"]["errors_by_class"] == {"decode_error": 1, "permission_denied": 1}
    assert run_json["totals"]["ok"] == 2

    images = pq.read_table("runs/r1/images", filesystem=fs).to_pandas().set_index("uri")
    assert sorted(images.index) == sorted(["s3://data/photos/coffee.png", "s3://data/photos/chelsea.jpg",
                                           "s3://data/photos/bad/broken.jpg", "s3://data/photos/locked/private.jpg"])
    assert images.loc["s3://data/photos/locked/private.jpg", "error_class"] == "permission_denied"
    assert images.loc["s3://data/photos/bad/broken.jpg", "error_class"] == "decode_error"
    assert (images.loc[["s3://data/photos/coffee.png", "s3://data/photos/chelsea.jpg"], "status"] == "ok").all()
    objects = pq.read_table("runs/r1/objects", filesystem=fs).to_pandas()
    assert len(objects) == images["num_objects"].sum() > 0

    # The URIs' credentials became storage options: the stored URIs are plain.
    config = run_json["config"]
    assert (config["input"]["uri"], config["output"]["uri"]) == ("s3://data/photos", "s3://runs/r1")
    assert config["sam"]["checkpoint"] == run_json["models"]["sam"]["checkpoint"] == f"http://{weights_server.host}/{checkpoints['sam'].name}"
    assert config["detector"]["weights"] == f"http://{weights_server.host}/{checkpoints['yolo'].name}"
    assert config["sam"]["storage_options"] == config["detector"]["storage_options"] == {"headers": "***", "params": "***"}
    fetched = [path for method, path, status in weights_server.requests if status == 200]
    assert any(checkpoints["sam"].name in p and SIGNATURE in p for p in fetched)  # the signed query reached the server
    assert any(checkpoints["yolo"].name in p for p in fetched)

    options = [f"--storage-option={k}={v}" for k, v in {"endpoint_url": s3["endpoint"], "key": KEY, "secret": SECRET}.items()]
    for fmt in ("labelstudio", "coco"):
        exported = subprocess.run([*autolabel_cli(), "export", "s3://runs/r1", "--format", fmt, "--quiet", *options],
                                  capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr[-3000:]
        logs[f"autolabel export {fmt}"] = exported.stdout + exported.stderr
    written = decoded_files(fs, "runs/r1")
    assert any(p.endswith("report/report.html") for p in written) and any("/_shards/" in p for p in written)
    assert any(p.endswith("exports/labelstudio/tasks.json") for p in written)
    # Each commit wrote its shard's summary on the object store, and the run's report merged them (read remotely).
    summaries = [p for p in written if "/summaries/shard-" in p]
    report_summary = json.loads(written[next(p for p in written if p.endswith("report/summary.json"))])
    assert len(summaries) == len([p for p in written if "/images/shard-" in p]) == report_summary["shards"]["from_summaries"]
    assert report_summary["shards"]["scanned"] == 0 and report_summary["totals"]["objects"] == len(objects)
    assert_no_secret([KEY, SECRET, HTTP_PASSWORD, SIGNATURE, CREDENTIAL], {**logs, **written, **ray_records(loopback_ray)})


def test_credentials_in_uris_are_redacted_in_errors_before_any_work(tmp_path):
    """A weights URL that cannot be read: the error names it without its credentials."""
    url = f"http://{HTTP_USER}:{typed(HTTP_PASSWORD)}@127.0.0.1:9/none.pt?X-Amz-Signature={SIGNATURE}"
    proc = subprocess.run(
        [*autolabel_cli(), "run", f"input.uri={REPO / 'samples' / 'images'}", f"output.uri={tmp_path / 'out'}", "detector.weights=yolov8n.yaml",
         f"sam.checkpoint={url}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2 and "http://127.0.0.1:9/none.pt" in proc.stderr, proc.stderr[-2000:]
    assert_no_secret([HTTP_PASSWORD, SIGNATURE], {"autolabel run": proc.stdout + proc.stderr})


def test_a_listing_error_of_the_storage_library_is_exit_2_and_shows_no_credential(tmp_path):
    """Issue 16 item 5: preflight let botocore's ParamValidationError through (exit 1, a traceback
    showing the key id and the start of the secret). A bucket name S3 refuses, with credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run(
        [*autolabel_cli(), "run", "input.uri=s3://Not:A:Bucket/photos", f"output.uri={tmp_path / 'out'}", "sam.checkpoint=random",
         "detector.weights=yolov8n.yaml", "input.storage_options.endpoint_url=http://127.0.0.1:9", f"input.storage_options.key={KEY}",
         f"input.storage_options.secret={SECRET}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 2 and "input: cannot list s3://Not:A:Bucket/photos (ParamValidationError" in proc.stderr, proc.stderr[-3000:]
    assert_no_secret([KEY, SECRET], {"autolabel run": proc.stdout + proc.stderr})


@pytest.mark.slow
def test_a_manifest_behind_basic_auth_labels_its_images_and_no_uri_carries_the_credentials(
        photo_folder, checkpoints, weights_server, loopback_ray, tmp_path):
    """Issue 16 item 6: credentials in ``prompts.manifest`` ended up in every image URI resolved
    against it (tables, report, Label Studio tasks), and the run failed: aiohttp refuses a URL's user
    info together with an auth header. A real HTTP server that serves the manifest, the images and a
    prior mask only with basic auth (password with '/', ':', '@', '%'); detector and SAM weights
    from a signed URL; the same search as above."""
    import shutil

    from PIL import Image

    from http_server import FolderServer

    data = tmp_path / "srv" / "data"
    (data / "img").mkdir(parents=True)
    (data / "masks").mkdir()
    shutil.copy(photo_folder / "bus.jpg", data / "img" / "bus.jpg")
    shutil.copy(photo_folder / "zidane.jpg", data / "img" / "zidane.jpg")
    width, height = Image.open(data / "img" / "zidane.jpg").size
    prior = Image.new("L", (width, height))
    prior.paste(255, (width // 4, height // 4, width // 2, height // 2))
    prior.save(data / "masks" / "zidane-1.png")
    lines = [{"uri": "img/bus.jpg", "site": "north", "objects": [{"object_key": "b1", "box": [50, 200, 300, 700], "label": "person"}]},
             {"uri": "img/zidane.jpg", "site": "south", "objects": [{"object_key": "z1", "mask": "masks/zidane-1.png", "label": "person"}]}]
    (data / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    with FolderServer(tmp_path / "srv", HTTP_USER, HTTP_PASSWORD) as server:
        proc = subprocess.run(
            [*autolabel_cli(), "run", "prompts.source=both",
             f"prompts.manifest=http://{HTTP_USER}:{typed(HTTP_PASSWORD)}@{server.host}/data/m.jsonl",
             f"input.uri={server.url('data')}", f"output.uri={out}", f"ray.address={loopback_ray.address}", "sam.device=cpu",
             "report.gallery=2", *model_overrides(checkpoints), f"sam.checkpoint={signed_url(weights_server, checkpoints['sam'].name)}",
             f"detector.weights={signed_url(weights_server, checkpoints['yolo'].name)}"],
            capture_output=True, text=True, timeout=600, env=loopback_ray.env, cwd=tmp_path,
        )
        logs = {"autolabel run": proc.stdout + proc.stderr}
        assert proc.returncode == 0, logs["autolabel run"][-4000:]
        assert not [r for r in server.requests if r[2] != 200]  # every request carried the credentials
        assert any(path.endswith("zidane-1.png") for _, path, _ in server.requests)  # the prior mask was read over HTTP too
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "finished" and run_json["totals"]["ok"] == 2, run_json.get("totals")
    assert run_json["config"]["prompts"]["manifest"] == f"http://{server.host}/data/m.jsonl"
    images = pq.read_table(out / "images").to_pandas()
    assert sorted(images["uri"]) == [f"http://{server.host}/data/img/bus.jpg", f"http://{server.host}/data/img/zidane.jpg"]
    objects = pq.read_table(out / "objects").to_pandas()
    manifest_rows = objects[objects["source"] == "manifest"].set_index("object_key")
    assert sorted(manifest_rows.index) == ["b1", "z1"] and (manifest_rows["status"] == "ok").all()
    for fmt in ("labelstudio", "coco"):
        exported = subprocess.run([*autolabel_cli(), "export", str(out), "--format", fmt, "--quiet"],
                                  capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr[-3000:]
        logs[f"autolabel export {fmt}"] = exported.stdout + exported.stderr
    tasks = json.loads((out / "exports" / "labelstudio" / "tasks.json").read_text())
    assert sorted(t["data"]["image"] for t in tasks) == sorted(images["uri"])

    import fsspec

    written = decoded_files(fsspec.filesystem("file"), str(out))
    assert any(p.endswith("report/report.html") for p in written)
    assert_no_secret([HTTP_PASSWORD, SIGNATURE, CREDENTIAL], {**logs, **written, **ray_records(loopback_ray)})
