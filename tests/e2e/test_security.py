"""Security defaults: JSON-only messages, Redis passwords, no secrets in what the farm writes."""

from __future__ import annotations

import io
import json
import pathlib
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
import uuid

import pytest
from PIL import Image

from farm import Farm, Txt2Img
from farm.local.embedded import RedisServer
from farm.local.up import LocalFarm
from farm.queue.app import RUN_TASK, make_celery
from farm.settings import FarmSettings
from farm.storage import open_store
from farm.storage.s3 import S3Store
from tests.support.raw import raw
from tests.support.tcp_proxy import TcpProxy

REDIS_PASSWORD = "pw-" + uuid.uuid4().hex
AWS_SECRET = "aws-secret-" + uuid.uuid4().hex


class TouchOnUnpickle:
    """A pickled message argument that creates a file if anyone ever unpickles it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture(scope="module")
def secure_farm(tmp_path_factory, s3_server):
    """A farm on a password-protected Redis and S3 with a recognisable secret key."""
    tmp = tmp_path_factory.mktemp("secure")
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    bucket = f"sec-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, endpoint_url=s3_server.endpoint_url, region="us-east-1").ensure_bucket()
    with RedisServer(tmp / "redis", password=REDIS_PASSWORD) as server:
        settings = FarmSettings(
            redis_url=server.url,
            storage=f"s3://{bucket}/farm",
            s3_endpoint_url=s3_server.endpoint_url,
            s3_region="us-east-1",
            home=tmp,
        )
        with LocalFarm(settings, workers=1, threads=1, preload=["tiny"]) as lf:
            yield lf
    mp.undo()


def test_wrong_or_missing_password_is_refused(secure_farm):
    url = secure_farm.settings.redis_url
    with pytest.raises(Exception, match="(?i)auth|password|NOAUTH"):
        Farm(
            secure_farm.settings.model_copy(
                update={"redis_url": url.replace(REDIS_PASSWORD, "nope")}
            )
        ).submit(Txt2Img(model="tiny", prompt="x", num_inference_steps=1))


def test_no_secrets_in_records_meta_or_logs(secure_farm, tmp_path):
    with Farm(secure_farm.settings) as farm:
        job = farm.submit(Txt2Img(model="tiny", prompt="x", seed=1, num_inference_steps=2))
        rec = job.wait(timeout=120)
        job.download(tmp_path)
        raw_record = json.dumps(raw(farm).hgetall(farm.tracker.keys.job(job.id)))
    written = [raw_record, rec.model_dump_json(), (tmp_path / "meta.json").read_text()]
    written += [p.read_text(errors="replace") for p in secure_farm.log_dir.glob("*.log")]
    for text in written:
        assert REDIS_PASSWORD not in text and AWS_SECRET not in text


def test_pickled_message_is_refused_and_never_unpickled(secure_farm, tmp_path):
    marker = tmp_path / "unpickled"
    with Farm(secure_farm.settings) as farm:
        victim = farm.submit(Txt2Img(model="tiny", prompt="x", num_inference_steps=1))
        victim.wait(timeout=120)
        # A hand-made message in pickle, as an attacker with broker access would send it.
        sender = make_celery(secure_farm.settings)
        sender.conf.accept_content = ["json", "pickle"]
        sender.send_task(
            RUN_TASK, args=[TouchOnUnpickle(str(marker))], serializer="pickle", queue="render"
        )
        # One worker takes messages in order: once a later job is done, the pickle was seen.
        farm.submit(Txt2Img(model="tiny", prompt="y", num_inference_steps=1)).wait(timeout=120)
        time.sleep(0.2)
    logs = "".join(p.read_text(errors="replace") for p in secure_farm.log_dir.glob("*.log"))
    assert not marker.exists()
    assert "pickle" in logs and "untrusted" in logs.lower()


def test_presigned_urls_are_get_only_and_short(s3_server, aws_env):
    bucket = f"url-{uuid.uuid4().hex[:12]}"
    store = S3Store(bucket, "p", endpoint_url=s3_server.endpoint_url, region="us-east-1")
    store.ensure_bucket()
    store.put("jobs/x/out/0.png", b"pixels")
    url = store.url("jobs/x/out/0.png")
    query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
    assert int(query["X-Amz-Expires"][0]) <= 900
    assert urllib.request.urlopen(url).read() == b"pixels"
    from farm.errors import InvalidJob

    with pytest.raises(InvalidJob, match="expires"):
        store.url("jobs/x/out/0.png", expires=7 * 24 * 3600)


def test_foreign_inputs_are_refused(redis_server, s3_server, tmp_path):
    from farm import Img2Img, InvalidJob

    bucket = f"own-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, endpoint_url=s3_server.endpoint_url, region="us-east-1").ensure_bucket()
    other = S3Store(
        f"oth-{uuid.uuid4().hex[:12]}", endpoint_url=s3_server.endpoint_url, region="us-east-1"
    )
    other.ensure_bucket()
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=f"s3://{bucket}/farm",
        s3_endpoint_url=s3_server.endpoint_url,
        home=tmp_path,
        key_prefix=f"f{uuid.uuid4().hex[:6]}:",
    )
    with Farm(settings) as farm:
        for uri in (other.uri("x.png"), "file:///etc/passwd", "http://169.254.169.254/latest"):
            with pytest.raises(InvalidJob) as err:
                farm.submit(Img2Img(model="tiny", prompt="x", image=uri))
            assert err.value.field == "image"
        assert not list(raw(farm).scan_iter(f"{settings.key_prefix}*"))
        assert open_store(settings).list() == []


@pytest.fixture(scope="module")
def tls_redis(redis_server, tmp_path_factory):
    """`rediss://` in front of the session's Redis, with a self-signed certificate."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    proxy = TcpProxy(redis_server.port, tls=context).up()
    yield f"rediss://127.0.0.1:{proxy.port}/0", cert
    proxy.down()


def test_rediss_end_to_end_and_the_server_is_verified(tls_redis, tmp_path):
    url, cert = tls_redis
    settings = FarmSettings(
        redis_url=url,
        redis_ca_file=cert,
        storage=(tmp_path / "s").as_uri(),
        home=tmp_path,
        key_prefix=f"tls{uuid.uuid4().hex[:6]}:",
    )
    with (
        LocalFarm(settings, workers=1, threads=1, preload=["tiny"], restart=False) as lf,
        Farm(lf.settings) as farm,
    ):
        job = farm.submit(Txt2Img(model="tiny", prompt="x", num_inference_steps=2))
        assert job.wait(timeout=120).state.value == "succeeded"
    untrusted = settings.model_copy(update={"redis_ca_file": None})
    with pytest.raises(Exception, match="(?i)certificate"):
        Farm(untrusted).submit(Txt2Img(model="tiny", prompt="x"))


def test_foreign_inputs_only_when_allowed(redis_server, s3_server, tmp_path):
    from farm import Img2Img

    own, other = (
        S3Store(
            f"{n}-{uuid.uuid4().hex[:10]}", endpoint_url=s3_server.endpoint_url, region="us-east-1"
        )
        for n in ("own", "oth")
    )
    for store in (own, other):
        store.ensure_bucket()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, format="PNG")
    other.put("in.png", buf.getvalue())
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=f"s3://{own.bucket}/farm",
        s3_endpoint_url=s3_server.endpoint_url,
        home=tmp_path,
        key_prefix=f"fa{uuid.uuid4().hex[:6]}:",
        allow_foreign_inputs=True,
    )
    with Farm(settings) as farm:
        job = farm.submit(Img2Img(model="tiny", prompt="x", image=other.uri("in.png")))
        assert job.status().spec["image"] == other.uri("in.png")  # read where it is
