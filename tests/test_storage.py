"""Shards from object storage, against a real S3 server (moto in server mode on
127.0.0.1, started by the fixtures): training end to end, clear errors, retries,
a server that dies mid-stream, and credentials that never leak."""

import json
import os
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from conftest import REPO, run_train
from nrd_dist.data import storage
from nrd_dist.testing.processes import read_tail
from nrd_dist.testing.s3_server import S3Server

DEMO = REPO / "configs" / "fmnist_demo.yaml"


def train_args(train, test, out, *extra):
    return [
        DEMO,
        f"data.train={train}",
        f"data.val.fmnist_test={test}",
        f"run.output_dir={out}",
        "data.batch_size=32",
        "data.workers=1",
        "optim.epochs=1",
        "eval.label_correction_samples=0",
        "checkpoint.every_steps=0",
        "log.every_steps=2",
        *extra,
    ]


def env_without_aws_credentials():
    """The user's credentials come from data.storage in these runs, not the environment."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"AWS_EC2_METADATA_DISABLED": "true"}


def run(args, env=None, timeout=600):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "nrd_dist.train", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def s3_shards(s3_server, fmnist_small):
    root = Path(fmnist_small["root"])
    s3_server.upload(root / "train", "s3://nrd-e2e/fmnist/train")
    s3_server.upload(root / "test", "s3://nrd-e2e/fmnist/test")
    return {
        "train": "s3://nrd-e2e/fmnist/train/train-*.tar",  # a prefix glob, listed by every rank
        "test": "s3://nrd-e2e/fmnist/test/test-{000000..000001}.tar",
    }


@pytest.mark.slow
def test_training_from_s3_equals_training_from_local_disk_and_leaks_no_secret(
    s3_server, s3_shards, fmnist_small, tmp_path
):
    secret = s3_server.storage_options["secret"]
    storage_cfg = (
        f"data.storage={{endpoint_url: '{s3_server.endpoint}', key: "
        f"'{s3_server.storage_options['key']}', secret: '{secret}'}}"
    )
    remote = run(
        train_args(s3_shards["train"], s3_shards["test"], tmp_path / "s3", storage_cfg),
        env=env_without_aws_credentials(),
    )
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = run_train(train_args(fmnist_small["train"], fmnist_small["test"], tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    # Same shards, same seed: the same batches, so the same model and the same accuracy.
    s3_summary = json.loads((tmp_path / "s3" / "summary.json").read_text())
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert s3_summary["val"] == local_summary["val"]
    # 10 steps of a fresh model: above chance (10%)
    assert s3_summary["val"]["fmnist_test"]["student"]["last_top1"] > 12
    # The secret is nowhere: not in the console, config.yaml, metrics.jsonl, summary, plots or events.
    assert secret not in remote.stdout + remote.stderr
    for path in (tmp_path / "s3").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert "secret: '***'" in (tmp_path / "s3" / "config.yaml").read_text()


@pytest.mark.slow
def test_missing_key_missing_bucket_and_no_match_fail_before_training(s3_server, s3_shards, fmnist_small, tmp_path):
    cases = {
        "s3://nrd-e2e/fmnist/train/train-000099.tar": "does not exist",
        "s3://no-such-bucket-nrd/train-000000.tar": "does not exist",
        "s3://nrd-e2e/fmnist/nothing-*.tar": "no shard matches",
    }
    for url, message in cases.items():
        proc = run_train(train_args(url, fmnist_small["test"], tmp_path / "out"))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and url in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert s3_server.storage_options["secret"] not in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing started


@pytest.mark.slow
def test_denied_access_is_a_clear_error_without_the_secret(fmnist_small, tmp_path):
    """A second server that enforces IAM after its first two requests (bucket and object
    created); our key is unknown to it, so reads are denied, as with a wrong profile."""
    server = S3Server(tmp_path / "moto.log")
    server.start(extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "2"})
    try:
        client = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id="a",
            aws_secret_access_key="b",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="locked")
        client.put_object(Bucket="locked", Key="train-000000.tar", Body=b"x" * 1024)
        secret = server.storage_options["secret"]
        storage_cfg = f"data.storage={{endpoint_url: '{server.endpoint}', key: 'nrd-key', secret: '{secret}'}}"
        url = "s3://locked/train-000000.tar"
        proc = run(
            train_args(url, fmnist_small["test"], tmp_path / "out", storage_cfg, "data.samples_per_epoch=64"),
            env=env_without_aws_credentials(),
        )
    finally:
        server.stop()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"access to shard '{url}' was denied" in proc.stderr
    assert secret not in proc.stdout + proc.stderr


class Outage:
    """A loopback TCP relay in front of the S3 server: ``cut()`` resets every connection
    and refuses new ones, as a network outage or a restarting endpoint does, while the
    server behind it keeps its objects (moto keeps them in memory only)."""

    def __init__(self, target_port: int):
        import socket

        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.connections: list = []
        self.listener = None
        self.restore()

    def restore(self) -> None:
        import socket

        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        import socket

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server behind is down: refuse this client too
                client.close()
                continue
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def cut(self) -> None:
        import socket

        self.listener.close()
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
        self.connections = []


@pytest.mark.slow
def test_a_read_resumes_after_an_outage_and_fails_clearly_when_the_server_stays_down(tmp_path):
    """Mid-read, the network to a real S3 server goes down: back within the retry window,
    the read resumes at the byte it reached (identical data); when the server itself is
    stopped for good, the retries end in an error naming the URL, in bounded time."""
    server = S3Server(tmp_path / "moto.log").start()
    outage = Outage(server.port)
    payload = os.urandom(3 << 20)
    url = "s3://blip/shard-000000.tar"
    try:
        fs = server.fs()
        fs.mkdir("blip")
        fs.pipe_file(url, payload)
        through_relay = {
            **server.storage_options,
            "endpoint_url": f"http://127.0.0.1:{outage.port}",
            "default_block_size": 1 << 20,
        }
        storage.configure(through_relay, retries=4, backoff_s=0.5)
        with storage.open_url(url, bufsize=1 << 16) as stream:
            head = stream.read(1 << 20)
            outage.cut()
            restorer = threading.Timer(1.0, outage.restore)
            restorer.start()
            rest = stream.read()
            restorer.join()
        assert head + rest == payload

        with storage.open_url(url, bufsize=1 << 16) as stream:
            stream.read(1 << 20)
            server.stop()
            started = time.time()
            with pytest.raises(storage.StorageError, match=f"cannot read shard '{url}' after 5 attempt"):
                stream.read()
            assert time.time() - started < 20  # our backoff (0.5+1+2+4 s), no retries nested in each
    finally:
        outage.cut()
        server.stop()
        storage.configure()


@pytest.mark.slow
def test_training_stops_with_a_clear_error_when_the_server_dies_mid_run(fmnist_small, tmp_path, processes):
    server = S3Server(tmp_path / "moto.log").start()
    try:
        root = Path(fmnist_small["root"])
        server.upload(root / "train", "s3://dying/train")
        server.upload(root / "test", "s3://dying/test")
        out = tmp_path / "out"
        cmd = [
            sys.executable,
            "-m",
            "nrd_dist.train",
            *train_args(
                "s3://dying/train/train-{000000..000002}.tar",
                "s3://dying/test/test-{000000..000001}.tar",
                out,
                "optim.epochs=50",
                "data.retries=2",
                "data.retry_backoff_s=0.2",
                "data.shuffle_buffer=0",
                "log.every_steps=1",
            ),
        ]
        proc = processes.start(cmd, tmp_path / "train.log", env=server.env)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()):
                break
            time.sleep(0.1)
        assert proc.poll() is None, read_tail(proc.log_path)
        server.stop()
        started = time.time()
        returncode = processes.wait_all(timeout=120)[0]
        log = read_tail(proc.log_path, 6000)
        assert returncode == 1, log
        assert "cannot read shard 's3://dying/" in log and "after 3 attempt(s)" in log
        assert time.time() - started < 90
    finally:
        server.stop()


def test_http_shards_stream_the_same_samples_as_local_files(fmnist_small):
    """Any fsspec URL goes through the same opener: here http:// from a loopback server."""
    import functools
    import http.server

    from nrd_dist.data.augment import build_policy
    from nrd_dist.data.shards import ShardStream, expand_urls

    root = Path(fmnist_small["root"])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        storage.configure()
        pattern = f"http://127.0.0.1:{server.server_address[1]}/test/test-{{000000..000001}}.tar"
        remote = expand_urls(pattern, "data.val.test")  # checked to exist, as a run does
        local = expand_urls(fmnist_small["test"])
        transform = build_policy("fmnist").eval

        def keys_and_labels(urls):
            return [
                (s["key"], s["label"], float(s["image"].sum()))
                for s in ShardStream(urls, transform, 10, channels=1, train=False)
            ]

        assert keys_and_labels(remote) == keys_and_labels(local)
        assert len(keys_and_labels(remote)) == fmnist_small["test_count"]
        missing = pattern.replace("test-{000000..000001}", "test-000009")
        with pytest.raises(storage.StorageError, match="does not exist"):
            expand_urls(missing, "data.val.test")
    finally:
        server.shutdown()
        server.server_close()


def test_storage_options_translate_to_s3fs_and_a_named_profile_reaches_the_server(
    s3_server, s3_shards, tmp_path, monkeypatch
):
    options = storage.fsspec_options(
        "s3", {"endpoint_url": "http://x", "profile": "p", "region": "eu-west-1", "anonymous": True}
    )
    assert options["endpoint_url"] == "http://x" and options["profile"] == "p" and options["anon"] is True
    assert options["client_kwargs"] == {"region_name": "eu-west-1"}
    assert options["config_kwargs"]["connect_timeout"] == 5  # fail fast, then our retries with backoff
    assert storage.filesystem("s3://bucket/shard.tar").retries == 1  # s3fs's own off: ours count, with backoff
    # A real profile: credentials from a shared credentials file, none in the environment.
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[nrd-bench]\naws_access_key_id = {s3_server.storage_options['key']}\n"
        f"aws_secret_access_key = {s3_server.storage_options['secret']}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    from nrd_dist.data.shards import expand_urls

    try:
        storage.configure({"endpoint_url": s3_server.endpoint, "profile": "nrd-bench"})
        assert len(expand_urls(s3_shards["train"], "data.train")) == 3
        storage.configure({"endpoint_url": s3_server.endpoint, "profile": "no-such-profile"})
        with pytest.raises(storage.StorageError, match="no usable credentials or settings"):
            expand_urls(s3_shards["train"], "data.train")
    finally:
        storage.configure()
