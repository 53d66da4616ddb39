"""Signs requests with botocore's own SigV4 implementation, for the differential test of
iotcred-core's signer (tests/tests/sigv4_differential.rs).

stdin: a JSON array of cases
  {"method", "url", "headers": [[name, value], ...], "body_hex", "access_key_id",
   "secret_access_key", "session_token" (or null), "region", "service", "time" (Unix seconds),
   "s3" (S3SigV4Auth), "unsigned" (payload not signed)}
stdout: a JSON array of the Authorization headers botocore computes (same order).

botocore reads the clock inside add_auth; the case's time is given to it by replacing
botocore.auth.get_current_datetime for the duration of each signature.
"""

import datetime
import json
import sys

import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def sign(case):
    creds = Credentials(
        case["access_key_id"], case["secret_access_key"], case.get("session_token")
    )
    cls = botocore.auth.S3SigV4Auth if case.get("s3") else botocore.auth.SigV4Auth
    auth = cls(creds, case["service"], case["region"])
    req = AWSRequest(
        method=case["method"], url=case["url"], data=bytes.fromhex(case["body_hex"])
    )
    for name, value in case["headers"]:
        req.headers[name] = value  # appends: repeated names stay repeated
    if case.get("unsigned"):
        req.context["payload_signing_enabled"] = False
    when = datetime.datetime.fromtimestamp(case["time"], datetime.timezone.utc)
    saved = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda *a, **k: when.replace(tzinfo=None)
    try:
        auth.add_auth(req)
    finally:
        botocore.auth.get_current_datetime = saved
    return req.headers["Authorization"]


def main():
    cases = json.load(sys.stdin)
    json.dump([sign(c) for c in cases], sys.stdout)


if __name__ == "__main__":
    main()
