"""The webhook benchmark's baseline: the smallest gunicorn + Flask TLS endpoint that answers every
AdmissionReview ``allowed: true``.

It reads and decodes the body and echoes the uid, as any webhook must, and runs with exactly the
gunicorn settings, TLS context and worker model of ``diskhooks-webhook serve``
(``webhook.cli.gunicorn_options``), so the difference to the real server is diskhooks' own work.

``python -m benchmarks.baseline_app --cert-file F --key-file F --port N [--workers 2] [--threads 4]``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from flask import Flask, Response, request


def create_baseline_app() -> Flask:
    app = Flask(__name__)

    @app.post("/mutate")
    def mutate() -> Response:
        review = json.loads(request.get_data())
        body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": review["request"]["uid"], "allowed": True}}
        return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json")

    @app.get("/readyz")
    def readyz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    return app


def main(argv: Sequence[str] | None = None) -> int:
    from webhook.cli import gunicorn_options, run_gunicorn
    from webhook.tls import CertReloader

    parser = argparse.ArgumentParser(description="baseline allowed:true webhook")
    parser.add_argument("--cert-file", type=Path, required=True)
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind-address", default="127.0.0.1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    reloader = CertReloader(args.cert_file, args.key_file)
    options = gunicorn_options(bind_address=args.bind_address, port=args.port, workers=args.workers,
                               threads=args.threads, cert_file=args.cert_file,
                               key_file=args.key_file, reloader=reloader, log_level=args.log_level)
    options["proc_name"] = "diskhooks-baseline"
    run_gunicorn(create_baseline_app(), options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
