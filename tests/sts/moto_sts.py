"""moto's STS (PyPI `moto`, server mode) over HTTPS, for iotcred's tests: moto's own WSGI
application (the one `moto_server` runs) served by werkzeug with TLS (werkzeug's ssl_context,
as `moto_server --ssl-cert/--ssl-key` does), on an ephemeral 127.0.0.1 port.

Usage: python3 moto_sts.py --cert server.pem --key server.key
Prints one JSON line when listening: {"port": P}. Runs until stdin closes.
"""

import argparse
import json
import logging
import ssl
import sys
import threading

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=ctx)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"port": server.server_port}), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
