"""Credentials inside URIs (pipeline/io/credentials.py, config.py): taken out exactly, refused when the
URI cannot be read safely, never shown. The end-to-end search of everything a run writes and logs
is in test_s3.py (real S3 and HTTP servers on loopback)."""
from __future__ import annotations

import base64
import json
import re

import pytest

from pipeline.config import ConfigError, load_config, redact_text, redacted_config

KEY = "AKIAS3KEYID0TEST0001"
# Secrets as users have them: '/' (half of AWS secret keys), ':', '@' and '%' inside.
SECRETS = {
    "slash": "s3SECa1/s3SECb2+s3SECc3",
    "colon": "s3SECa1:s3SECb2",
    "at": "s3SECa1@s3SECb2",
    "percent": "s3SECa1%s3SECb2",
    "all": "s3SECa1/s3SECb2:s3SECc3@s3SECd4%s3SECe5",
}
USER, PASSWORD = "htUSERz9", "htPWa1/htPWb2:htPWc3@htPWd4%htPWe5"


def typed(secret: str) -> str:
    """The secret as a user pastes it into a URI: everything raw but '%', which starts an escape."""
    return secret.replace("%", "%25")


def fragments(secret: str) -> list[str]:
    """The parts of a secret between its special characters: none may show anywhere either."""
    return [part for part in re.split(r"[/:@%+]", secret) if part]


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        for part in [secret, *fragments(secret)]:
            assert part not in text, f"{part!r} shows in: {text}"


@pytest.mark.parametrize("name", SECRETS)
def test_s3_secrets_with_slash_colon_at_percent_move_into_storage_options(name):
    """Issue 16 item 5: with a '/' in the secret, urlsplit ends the host inside it, so nothing was
    moved and the secret stayed in input.uri (and run.json)."""
    secret = SECRETS[name]
    cfg = load_config(None, [f"input.uri=s3://{KEY}:{typed(secret)}@data/photos", f"output.uri=s3://{KEY}:{typed(secret)}@runs/r1",
                             "input.storage_options.endpoint_url=http://127.0.0.1:9"])
    assert cfg.input.uri == "s3://data/photos" and cfg.output.uri == "s3://runs/r1"
    assert cfg.input.storage_options == {"key": KEY, "secret": secret, "endpoint_url": "http://127.0.0.1:9"}
    assert cfg.output.storage_options == {"key": KEY, "secret": secret}
    assert_hidden(json.dumps(redacted_config(cfg)), KEY, secret)


@pytest.mark.parametrize("key", ["sam.checkpoint", "detector.weights"])
def test_weights_urls_keep_neither_user_info_nor_a_signed_query(key):
    """Credentials of a weights URL move into sam/detector.storage_options: a basic-auth header,
    and the signed query as the params every request adds (in order, decoded once)."""
    url = (f"https://{USER}:{typed(PASSWORD)}@127.0.0.1:8443/w/sam2.1_hiera_tiny.pt"
           "?X-Amz-Credential=AKIAW%2F20250101%2Fus-east-1&X-Amz-Signature=sIgA1%2Bb%3D%3D&empty=")
    cfg = load_config(None, [f"{key}={url}"])
    section = getattr(cfg, key.split(".")[0])
    assert getattr(section, key.split(".")[1]) == "https://127.0.0.1:8443/w/sam2.1_hiera_tiny.pt"
    assert section.storage_options == {"headers": basic(USER, PASSWORD), "params": [
        ["X-Amz-Credential", "AKIAW/20250101/us-east-1"], ["X-Amz-Signature", "sIgA1+b=="], ["empty", ""]]}
    dumped = json.dumps(redacted_config(cfg))
    assert_hidden(dumped, PASSWORD, "AKIAW", "sIgA1", base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    assert USER not in dumped


def test_a_manifest_url_with_basic_auth_gives_its_credentials_to_input_storage_options():
    """Issue 16 item 6: the manifest's credentials were resolved into every image URI."""
    cfg = load_config(None, ["prompts.source=manifest", f"prompts.manifest=http://{USER}:{typed(PASSWORD)}@127.0.0.1:8080/data/m.jsonl",
                             "input.storage_options.headers={User-Agent: autolabel}"])
    assert cfg.prompts.manifest == "http://127.0.0.1:8080/data/m.jsonl"
    assert cfg.input.storage_options == {"headers": {**basic(USER, PASSWORD), "User-Agent": "autolabel"}}
    assert_hidden(json.dumps(redacted_config(cfg)), PASSWORD)
    # the same credentials in input.uri and the manifest are one set; different ones cannot be
    with pytest.raises(ConfigError, match="prompts.manifest carries credentials that differ") as err:
        load_config(None, ["prompts.source=manifest", f"prompts.manifest=http://{USER}:{typed(PASSWORD)}@127.0.0.1:8080/data/m.jsonl",
                           f"input.uri=s3://{KEY}:{typed(SECRETS['all'])}@data/photos"])
    assert_hidden(str(err.value), PASSWORD, SECRETS["all"], KEY)


@pytest.mark.parametrize("override, message", [
    # a password with '/' and a port-like start, or a path with '@' after a port: two readings
    (f"input.uri=http://{USER}:12/{PASSWORD}@127.0.0.1/x", "cannot tell where the user info"),
    ("sam.checkpoint=http://127.0.0.1:8080/w/sam@v2.pt", "cannot tell where the user info"),
    (f"input.uri=s3://{KEY}:{SECRETS['slash']}@data/img@2x.jpg", "cannot tell where the user info"),
    (f"input.uri=s3://{KEY}@data/x", "needs both a key id and a secret"),
    (f"input.uri=https://{USER}:htPWa1%ff@127.0.0.1/x", "percent-escapes that are not UTF-8"),
    (f"input.uri=ftp://{USER}:{PASSWORD}@127.0.0.1/x", "a password inside a ftp:// URI"),
    ("input.uri=https://127.0.0.1/photos/a.jpg?X-Amz-Signature=sIgA1b2c3", "has a query string (a signed URL?)"),
    ("prompts.manifest=https://127.0.0.1/m.jsonl?sig=sIgA1b2c3", "has a query string (a signed URL?)"),
])
def test_uris_that_cannot_be_read_safely_are_refused_without_showing_them(override, message):
    """Issue 16 item 7: exit 2 (ConfigError), and the message masks the credentials."""
    extra = ["prompts.source=manifest"] if override.startswith("prompts") else []
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(None, [override, *extra])
    assert_hidden(str(err.value), PASSWORD, SECRETS["slash"], "sIgA1b2c3")
    assert KEY not in str(err.value) and USER not in str(err.value)


@pytest.mark.parametrize("uri", [
    "s3://bucket/a:b/*.jpg", "s3://bucket/img@2x.jpg", "https://host/img@2x.jpg", "http://[::1]:8080/x@y.jpg",
    "abfs://container@account.dfs.core.windows.net/x", "gs://bucket/a:b@c.jpg", "samples/images",
])
def test_uris_without_credentials_are_left_as_they_are(uri):
    cfg = load_config(None, [f"input.uri={uri}"])
    assert cfg.input.uri == uri and cfg.input.storage_options == {}


@pytest.mark.parametrize("text, shown", [
    (f"cannot read s3://{KEY}:{SECRETS['all']}@data/x.jpg now", "cannot read s3://***@data/x.jpg now"),
    (f"GET https://{USER}:{PASSWORD}@host:8443/w.pt?X-Amz-Signature=sIgA1b2c3&a=1 failed",
     "GET https://***@host:8443/w.pt?X-Amz-Signature=***&a=*** failed"),
    (f'{{"uri": "http://{USER}:p@ss@host/x"}}', '{"uri": "http://***@host/x"}'),
    ("s3://bucket/img@2x.jpg and https://host/a.jpg", "s3://bucket/img@2x.jpg and https://host/a.jpg"),
])
def test_redaction_masks_the_whole_user_info_whatever_it_holds(text, shown):
    """Issue 16 item 6: 'https://alice:p@ss@host' came out as 'https://***@ss@host'."""
    assert redact_text(text) == shown


def test_a_value_refused_by_validation_is_not_echoed_when_it_may_be_a_credential():
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"input.storage_options={SECRETS['slash']}"])  # a bare secret where a mapping belongs
    assert "input.storage_options" in str(err.value)
    assert_hidden(str(err.value), SECRETS["slash"])


def test_weights_urls_that_differ_only_in_their_query_keep_apart_in_the_node_cache():
    """The query moved into ``params``; the cache must still tell ``?v=1`` from ``?v=2`` (and key a
    URL as it did when the query was part of it)."""
    from pipeline.models import weights as models

    one, two = (load_config(None, [f"sam.checkpoint=https://127.0.0.1/w.pt?v={v}&sig=s%2B1"]).sam for v in (1, 2))
    assert one.checkpoint == two.checkpoint == "https://127.0.0.1/w.pt"
    paths = [models.cached_path(c.checkpoint, c.storage_options["params"]) for c in (one, two)]
    assert paths[0] != paths[1] and paths[0] == models.cached_path("https://127.0.0.1/w.pt?v=1&sig=s%2B1")


def test_option_values_are_masked_in_messages_down_to_a_basic_auth_password_and_signed_params():
    """What the command line applies to its logs, errors and tracebacks once the config is read."""
    from pipeline.config import storage_option_sets
    from pipeline.io.credentials import redact

    cfg = load_config(None, [f"sam.checkpoint=https://{USER}:{typed(PASSWORD)}@127.0.0.1/w.pt?X-Amz-Signature=sIgA1b2c3",
                             f"input.uri=s3://{KEY}:{typed(SECRETS['all'])}@data/photos"])
    token = basic(USER, PASSWORD)["Authorization"]
    text = f"{KEY} {SECRETS['all']} {PASSWORD} {token} {token.split()[1]} sIgA1b2c3 X-Amz-Signature"
    assert redact(text, *storage_option_sets(cfg)) == "*** *** *** *** *** *** X-Amz-Signature"
