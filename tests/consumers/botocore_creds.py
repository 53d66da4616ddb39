"""Real botocore as an unmodified consumer of iotcred.

Prints the credentials botocore resolved (and the provider it used) as one JSON line, then
for every line read on stdin asks botocore again (it refreshes by itself when the
credentials are near expiry) and prints them again. Configuration comes only from the
environment (AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, or
AWS_CONFIG_FILE with a credential_process profile).
"""
import json
import sys

import botocore.session

session = botocore.session.get_session()
try:
    creds = session.get_credentials()
except Exception as e:  # the test expects a refusal in some cases: report it as data
    print(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}), flush=True)
    sys.exit(1)
if creds is None:
    print(json.dumps({"error": "no credentials"}), flush=True)
    sys.exit(1)


def show():
    f = creds.get_frozen_credentials()
    print(json.dumps({"method": creds.method, "AccessKeyId": f.access_key,
                      "SecretAccessKey": f.secret_key, "Token": f.token}), flush=True)


show()
for _line in sys.stdin:
    show()
