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
from pipeline.decode import ImageError, iter_tar_members, read_bytes

KEY = "AKIAAUTOLABELTEST7Q2X"
SECRET = "autolabel-TEST-secret/9f3c1e7d+b04a6e52"
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


HTTP_USER, HTTP_PASSWORD = "alice", "pa55-AUTOLABEL-http"
SIGNATURE, CREDENTIAL = "SIG0autolabel0f00d", "CRED0autolabel0beef"


@pytest.fixture
def weights_server(checkpoints):
    """An HTTP server on loopback that serves the SAM checkpoint only with basic auth, at a
    signed-looking URL (the credentials sit in the URL, as users paste them)."""
    import base64
    import http.server
    import threading

    data = checkpoints["sam"].read_bytes()
    wanted = "Basic " + base64.b64encode(f"{HTTP_USER}:{HTTP_PASSWORD}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: bool) -> None:
            if self.headers.get("Authorization") != wanted or SIGNATURE not in self.path:
                self.send_response(401)
                self.end_headers()
                return
            start, end = 0, len(data) - 1
            ranged = self.headers.get("Range", "").removeprefix("bytes=")  # range requests, as object stores serve them
            if ranged:
                first, _, last = ranged.partition("-")
                start, end = int(first or 0), min(int(last) if last else end, end)
            self.send_response(206 if ranged else 200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(data[start:end + 1])

        def do_GET(self):
            self._answer(True)

        def do_HEAD(self):
            self._answer(False)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield (f"http://{HTTP_USER}:{HTTP_PASSWORD}@127.0.0.1:{server.server_port}/sam2.1_hiera_tiny.pt"
           f"?X-Amz-Signature={SIGNATURE}&X-Amz-Credential={CREDENTIAL}")
    server.shutdown()


@pytest.mark.slow
def test_job_reads_from_and_writes_to_s3_without_leaking_credentials(s3, checkpoints, weights_server, tmp_path):
    """Credentials given every way a user gives them: storage options, ``s3://KEY:SECRET@bucket``
    in input.uri and output.uri, and a weights URL with ``user:password@`` and a signed query
    string. None of them may reach stdout/stderr or any file the run writes."""
    from urllib.parse import quote

    import s3fs

    opts = json.dumps(s3["options"])
    endpoint_only = json.dumps({"endpoint_url": s3["endpoint"]})
    in_url = f"s3://{KEY}:{quote(SECRET, safe='')}@data/photos"  # the secret percent-encoded, as URLs need
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AUTOLABEL_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [*autolabel_cli(), "run", f"input.uri={in_url}", "output.uri=s3://runs/r1",
         f"input.storage_options={endpoint_only}", f"output.storage_options={opts}", "ray.num_cpus=2", "report.gallery=2",
         *model_overrides(checkpoints), f"sam.checkpoint={weights_server}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
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

    assert run_json["config"]["input"]["uri"] == "s3://data/photos"  # the URI's credentials became storage options
    assert run_json["config"]["sam"]["checkpoint"] == run_json["models"]["sam"]["checkpoint"] == (
        weights_server.replace(f"{HTTP_USER}:{HTTP_PASSWORD}", "***").replace(SIGNATURE, "***").replace(CREDENTIAL, "***"))

    written = fs.find("runs/r1")
    assert any(p.endswith("report/report.html") for p in written) and any("/_shards/" in p for p in written)
    for secret in (KEY, SECRET, quote(SECRET, safe=""), HTTP_PASSWORD, SIGNATURE, CREDENTIAL):
        assert secret not in logs, "a credential was printed"
        for path in written:
            assert secret.encode() not in fs.cat_file(path), f"a credential was written to {path}"


def test_credentials_in_uris_are_redacted_in_errors_before_any_work(tmp_path):
    """A weights URL that cannot be read: the error names it without its credentials."""
    proc = subprocess.run(
        [*autolabel_cli(), "run", f"input.uri={REPO / 'samples' / 'images'}", f"output.uri={tmp_path / 'out'}", "detector.weights=yolov8n.yaml",
         f"sam.checkpoint=http://{HTTP_USER}:{HTTP_PASSWORD}@127.0.0.1:9/none.pt?X-Amz-Signature={SIGNATURE}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2 and "http://***@127.0.0.1:9/none.pt?X-Amz-Signature=***" in proc.stderr, proc.stderr[-2000:]
    assert HTTP_PASSWORD not in proc.stdout + proc.stderr and SIGNATURE not in proc.stdout + proc.stderr
