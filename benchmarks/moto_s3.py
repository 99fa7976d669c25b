"""A moto S3 server on a free loopback port, for the benchmarks that measure a bucket's costs
(requests, bytes, wall time) without one. Its request log (werkzeug's, one line a request)
goes to a file the benchmarks read."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

#: Dummy credentials: moto accepts any; AWS's SDK needs some (and no EC2 metadata probing).
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: ``moto_server`` with every request answered ``sys.argv[3]`` ms late: a store's round trip
#: (tens of ms to S3 from a cluster), which a loopback server does not have.
_DELAYED = r"""
import sys, time
from moto.moto_server.werkzeug_app import DomainDispatcherApplication
from moto.moto_server.werkzeug_app import create_backend_app
from moto.server import MotoRequestHandler
from werkzeug.serving import run_simple
app, delay = DomainDispatcherApplication(create_backend_app), float(sys.argv[3]) / 1000
def delayed(environ, start_response):
    time.sleep(delay)
    return app(environ, start_response)
run_simple(sys.argv[1], int(sys.argv[2]), delayed, threaded=True, request_handler=MotoRequestHandler)
"""


def start(log_path: Path, latency_ms: float = 0.0) -> tuple[str, subprocess.Popen]:
    """Start ``moto_server`` (from this interpreter's environment) logging to ``log_path``, set
    :data:`AWS_ENV` in this process; returns its endpoint and process (kill it when done).
    ``latency_ms``: each request answered that much later (:data:`_DELAYED`)."""
    os.environ.update(AWS_ENV)
    port = free_port()
    log = open(log_path, "w")
    cmd = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    if latency_ms:
        cmd = [sys.executable, "-c", _DELAYED, "127.0.0.1", str(port), str(latency_ms)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"http://127.0.0.1:{port}", proc
        time.sleep(0.2)
    raise SystemExit(f"moto_server did not start: {log_path}")


_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) /([^ ?]*)(\?[^ ]*)? HTTP')
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours a line by its status (a 206 GET, a 404 HEAD)


def requests_in(lines: list[str]) -> Iterator[tuple[str, str, str]]:
    """(method, path, query string) of each request in moto's log lines."""
    for line in lines:
        if m := _REQUEST.search(_COLOUR.sub("", line)):
            yield m.group(1), m.group(2), m.group(3) or ""
