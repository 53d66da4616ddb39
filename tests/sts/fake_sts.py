"""A fake AWS STS for iotcred's tests: AssumeRole over HTTPS (HTTP/1.1, keep-alive), which
*verifies every SigV4 signature* by recomputing it independently with botocore's SigV4Auth,
with switchable faults.

Usage:
  python3 fake_sts.py --cert server.pem --key server.key [--region eu-west-1]
                      [--provider-admin http://127.0.0.1:PORT] [--external-id ID]
                      [--source-credentials FILE]
Prints one JSON line when listening: {"port": P, "admin_port": A}. Runs until stdin closes.

Who may call: credentials issued by the fake IoT credentials provider (looked up on its admin
listener, GET /issued: access key id -> secret, token, expiry), credentials given in a JSON file
({"access_key_id", "secret_access_key", "session_token", "expiration_unix"}; for benchmarks), and
credentials this STS issued (chains of chains). A request is refused like AWS does when:
  - Authorization is missing or malformed      -> 403 MissingAuthenticationToken / IncompleteSignature
  - the access key id is unknown, or the token does not belong to it
                                               -> 403 InvalidClientTokenId
  - the signature botocore computes differs    -> 403 SignatureDoesNotMatch
  - X-Amz-Date is more than 5 minutes off      -> 403 SignatureDoesNotMatch "Signature expired"
  - the credentials have expired               -> 400 ExpiredToken
  - RoleArn / RoleSessionName / DurationSeconds / ExternalId are invalid
                                               -> 400 ValidationError / 403 AccessDenied

Admin listener (plain HTTP on 127.0.0.1, JSON):
  POST /fault       {"kind": K}  every request until cleared;  POST /fault/once {"kind": K}
     K: access_denied | throttling | status_500 | expired_token (marks the caller's access
        key expired: the same key is refused from then on, a refreshed one is accepted)
        | clock_skew (with "seconds": this STS's clock runs that far ahead)
  DELETE /fault     clears faults (and the clock skew)
  GET /requests     every request: access key id, signature verdict, parameters, answer, and
                    the time this server spent on it (server_us, from the end of the request
                    head to the answer written)
  GET /issued       credentials issued (secrets included, for the tests' secret search)
  GET /stats        {"connections", "requests"}
"""

import argparse
import datetime
import email.utils
import json
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
import botocore.auth

NS = "https://sts.amazonaws.com/doc/2011-06-15/"
ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")
AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/,\s]+)/(\d{8})/([^/,\s]+)/([^/,\s]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$"
)


class State:
    def __init__(self, args):
        self.lock = threading.Lock()
        self.args = args
        self.known = {}  # access key id -> {"secret", "token", "expires"}
        self.expired_keys = set()
        self.persistent = None
        self.queued = []
        self.skew = 0
        self.requests = []
        self.issued = []
        self.connections = 0
        if args.source_credentials:
            with open(args.source_credentials) as f:
                c = json.load(f)
            self.known[c["access_key_id"]] = {
                "secret": c["secret_access_key"],
                "token": c["session_token"],
                "expires": c["expiration_unix"],
            }

    def now(self):
        return int(time.time()) + self.skew

    def take_fault(self):
        with self.lock:
            if self.queued:
                return self.queued.pop(0)
            return self.persistent

    def lookup(self, akid):
        with self.lock:
            entry = self.known.get(akid)
        if entry is not None or not self.args.provider_admin:
            return entry
        # Credentials of the IoT credentials provider (the source roles).
        with urllib.request.urlopen(self.args.provider_admin + "/issued", timeout=5) as r:
            issued = json.load(r)
        with self.lock:
            for c in issued:
                self.known.setdefault(
                    c["access_key_id"],
                    {
                        "secret": c["secret_access_key"],
                        "token": c["session_token"],
                        "expires": c["expiration_unix"],
                    },
                )
            return self.known.get(akid)


def error_xml(code, message, sender=True):
    kind = "Sender" if sender else "Receiver"
    return (
        f'<ErrorResponse xmlns="{NS}"><Error><Type>{kind}</Type><Code>{code}</Code>'
        f"<Message>{xml_escape(message)}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>\n"
    )


def xml_escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def rfc3339(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_signature(state, handler, body):
    """(status, code, message) of a refusal, or None when the signature is right; also the
    access key id (or None)."""
    auth = handler.headers.get("Authorization")
    if auth is None:
        return (403, "MissingAuthenticationToken", "Request is missing Authentication Token"), None
    m = AUTH.match(auth)
    if not m:
        return (400, "IncompleteSignature", "Authorization header is malformed"), None
    akid, date, region, service, signed, _sig = m.groups()
    amz_date = handler.headers.get("X-Amz-Date", "")
    if not re.match(r"^\d{8}T\d{6}Z$", amz_date) or amz_date[:8] != date:
        return (400, "IncompleteSignature", "X-Amz-Date is missing or does not match the scope"), akid
    names = signed.split(";")
    if "host" not in names or "x-amz-date" not in names:
        return (400, "IncompleteSignature", "host and x-amz-date must be signed"), akid
    if region != state.args.region or service != "sts":
        return (
            403,
            "SignatureDoesNotMatch",
            f"Credential should be scoped to a valid region and service 'sts', not '{region}/{service}'",
        ), akid
    known = state.lookup(akid)
    if known is None:
        return (403, "InvalidClientTokenId", "The security token included in the request is invalid."), akid
    token = handler.headers.get("X-Amz-Security-Token")
    if token != known["token"] or "x-amz-security-token" not in names:
        return (403, "InvalidClientTokenId", "The security token included in the request is invalid."), akid
    signed_at = int(
        datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")
        .replace(tzinfo=datetime.timezone.utc)
        .timestamp()
    )
    if abs(state.now() - signed_at) > 300:
        return (
            403,
            "SignatureDoesNotMatch",
            f"Signature expired: {amz_date} is now earlier than "
            f"{datetime.datetime.fromtimestamp(state.now() - 300, datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}",
        ), akid
    # Recompute with botocore over exactly the signed headers, as received.
    req = AWSRequest(method=handler.command, url=f"https://{handler.headers.get('Host')}{handler.path}", data=body)
    for name in names:
        if name in ("x-amz-date", "x-amz-security-token"):
            continue  # botocore adds these itself, from the timestamp and the credentials
        values = handler.headers.get_all(name) or []
        for v in values:
            req.headers[name] = v
    when = datetime.datetime.fromtimestamp(signed_at, datetime.timezone.utc).replace(tzinfo=None)
    saved = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda *a, **k: when
    try:
        SigV4Auth(Credentials(akid, known["secret"], known["token"]), "sts", region).add_auth(req)
    finally:
        botocore.auth.get_current_datetime = saved
    if req.headers["Authorization"] != auth:
        return (
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        ), akid
    if akid in state.expired_keys or known["expires"] <= state.now():
        return (400, "ExpiredToken", "The security token included in the request is expired"), akid
    return None, akid


class StsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeSTS"
    sys_version = ""

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        # Head and body go out in two writes: without this, Nagle holds the body back until
        # the client's delayed ACK of the head (tens of milliseconds per call).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.state.lock:
            self.server.state.connections += 1

    def send_xml(self, status, text, extra=()):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def date_time_string(self, timestamp=None):
        return email.utils.formatdate(self.server.state.now(), usegmt=True)

    def do_GET(self):
        self.send_xml(405, error_xml("InvalidAction", "Use POST"))

    def do_POST(self):
        started = time.perf_counter()
        state = self.server.state
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        record = {
            "path": self.path,
            "access_key_id": None,
            "signature_ok": False,
            "user_agent": self.headers.get("User-Agent", ""),
        }
        status, text = self.answer(state, body, record)
        record["status"] = status
        # Recorded before answering, so a client that got its answer finds the record.
        with state.lock:
            state.requests.append(record)
        self.send_xml(status, text)
        self.wfile.flush()
        with state.lock:
            record["server_us"] = round((time.perf_counter() - started) * 1e6)

    def answer(self, state, body, record):
        refusal, akid = verify_signature(state, self, body)
        record["access_key_id"] = akid
        if refusal is not None and refusal[1] != "ExpiredToken":
            status, code, message = refusal
            record["code"] = code
            return status, error_xml(code, message)
        record["signature_ok"] = True
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        record["form"] = form
        if refusal is not None:
            record["code"] = "ExpiredToken"
            return refusal[0], error_xml(refusal[1], refusal[2])
        fault = state.take_fault()
        kind = fault["kind"] if fault else None
        if kind == "expired_token":
            with state.lock:
                state.expired_keys.add(akid)
            record["code"] = "ExpiredToken"
            return 400, error_xml("ExpiredToken", "The security token included in the request is expired")
        if kind == "throttling":
            record["code"] = "Throttling"
            return 400, error_xml("Throttling", "Rate exceeded")
        if kind == "status_500":
            record["code"] = "InternalFailure"
            return 500, error_xml("InternalFailure", "An internal error occurred", sender=False)
        if form.get("Action") != "AssumeRole" or form.get("Version") != "2011-06-15":
            record["code"] = "InvalidAction"
            return 400, error_xml("InvalidAction", "Could not find operation for this request")
        arn = form.get("RoleArn", "")
        session = form.get("RoleSessionName", "")
        try:
            duration = int(form.get("DurationSeconds", "3600"))
        except ValueError:
            duration = -1
        problems = []
        if not ROLE_ARN.match(arn):
            problems.append("Value at 'roleArn' failed to satisfy constraint")
        if not SESSION_NAME.match(session):
            problems.append("Value at 'roleSessionName' failed to satisfy constraint")
        if not 900 <= duration <= 43200:
            problems.append("Value at 'durationSeconds' failed to satisfy constraint")
        elif duration > 3600:
            problems.append(
                "The requested DurationSeconds exceeds the 1 hour session limit for roles assumed by role chaining."
            )
        if problems:
            record["code"] = "ValidationError"
            return 400, error_xml("ValidationError", "; ".join(problems))
        wanted_id = state.args.external_id
        if kind == "access_denied" or (wanted_id is not None and form.get("ExternalId") != wanted_id):
            record["code"] = "AccessDenied"
            caller = f"arn:aws:sts::123456789012:assumed-role/GatewayRole/{akid}"
            return 403, error_xml(
                "AccessDenied",
                f"User: {caller} is not authorized to perform: sts:AssumeRole on resource: {arn}",
            )
        now = state.now()
        new_akid = "ASIA" + secrets.token_hex(8).upper()
        secret = secrets.token_urlsafe(30)
        token = "FQoGZXIvYXdz" + secrets.token_urlsafe(120)
        expires = now + duration
        account = arn.split(":")[4]
        role_name = arn.split("/")[-1]
        with state.lock:
            state.known[new_akid] = {"secret": secret, "token": token, "expires": expires}
            state.issued.append(
                {
                    "access_key_id": new_akid,
                    "secret_access_key": secret,
                    "session_token": token,
                    "expiration_unix": expires,
                    "role_arn": arn,
                    "session_name": session,
                    "source_access_key_id": akid,
                }
            )
        record["issued"] = new_akid
        return 200, (
            f'<AssumeRoleResponse xmlns="{NS}">\n'
            "  <AssumeRoleResult>\n"
            "    <AssumedRoleUser>\n"
            f"      <Arn>arn:aws:sts::{account}:assumed-role/{role_name}/{session}</Arn>\n"
            f"      <AssumedRoleId>AROA{secrets.token_hex(8).upper()}:{session}</AssumedRoleId>\n"
            "    </AssumedRoleUser>\n"
            "    <Credentials>\n"
            f"      <AccessKeyId>{new_akid}</AccessKeyId>\n"
            f"      <SecretAccessKey>{secret}</SecretAccessKey>\n"
            f"      <SessionToken>{token}</SessionToken>\n"
            f"      <Expiration>{rfc3339(expires)}</Expiration>\n"
            "    </Credentials>\n"
            "  </AssumeRoleResult>\n"
            f"  <ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>\n"
            "</AssumeRoleResponse>\n"
        )


class AdminHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def send_json(self, value, status=200):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        state = self.server.state
        with state.lock:
            if self.path == "/requests":
                return self.send_json(state.requests)
            if self.path == "/issued":
                return self.send_json(state.issued)
            if self.path == "/stats":
                return self.send_json({"connections": state.connections, "requests": len(state.requests)})
        self.send_json({"error": "not found"}, 404)

    def do_POST(self):
        state = self.server.state
        length = int(self.headers.get("Content-Length", "0"))
        fault = json.loads(self.rfile.read(length) or b"{}")
        with state.lock:
            if fault.get("kind") == "clock_skew":
                state.skew = int(fault.get("seconds", 0))
            elif self.path == "/fault":
                state.persistent = fault
            elif self.path == "/fault/once":
                state.queued.append(fault)
            else:
                return self.send_json({"error": "not found"}, 404)
        self.send_json({"ok": True})

    def do_DELETE(self):
        state = self.server.state
        with state.lock:
            state.persistent = None
            state.queued.clear()
            state.skew = 0
        self.send_json({"ok": True})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--region", default="eu-west-1")
    p.add_argument("--provider-admin")
    p.add_argument("--external-id")
    p.add_argument("--source-credentials")
    args = p.parse_args()
    state = State(args)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    sts = ThreadingHTTPServer(("127.0.0.1", 0), StsHandler)
    sts.daemon_threads = True
    sts.socket = ctx.wrap_socket(sts.socket, server_side=True)
    sts.state = state
    admin = ThreadingHTTPServer(("127.0.0.1", 0), AdminHandler)
    admin.daemon_threads = True
    admin.state = state
    for server in (sts, admin):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"port": sts.server_address[1], "admin_port": admin.server_address[1]}), flush=True)
    # Lives as long as the test holds stdin open.
    sys.stdin.read()


if __name__ == "__main__":
    main()
