"""The peer of the chained-refresh benchmark (tests/bench/sts.sh): botocore's STS client
`assume_role`, on its own kept-alive connection (urllib3's pool), against the same fake STS.

    sts_peer.py URL REGION CA_PEM SOURCE_CREDENTIALS_JSON N

After one untimed call (client creation, connection and TLS set-up), N calls are timed one by
one; prints one JSON line {"samples_us": [...]}.
"""
import json
import sys
import time

import botocore.session


def main():
    url, region, ca, creds, n = sys.argv[1:6]
    with open(creds) as f:
        c = json.load(f)
    session = botocore.session.get_session()
    client = session.create_client(
        "sts",
        region_name=region,
        endpoint_url=url,
        verify=ca,
        aws_access_key_id=c["access_key_id"],
        aws_secret_access_key=c["secret_access_key"],
        aws_session_token=c["session_token"],
    )
    kwargs = dict(
        RoleArn="arn:aws:iam::210987654321:role/GatewayAnalytics",
        RoleSessionName="gateway-0042",
        DurationSeconds=3600,
    )
    client.assume_role(**kwargs)
    samples = []
    for _ in range(int(n)):
        t = time.perf_counter()
        client.assume_role(**kwargs)
        samples.append(round((time.perf_counter() - t) * 1e6))
    print(json.dumps({"samples_us": samples}))


if __name__ == "__main__":
    main()
