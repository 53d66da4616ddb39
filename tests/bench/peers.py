"""Peers of the iotcred exchange benchmark (tests/bench/compare.sh), run in a throwaway venv.

    peers.py brs-cold  HOST PORT CERT KEY CA THING ALIAS
    peers.py brs-warm  HOST PORT CERT KEY CA THING ALIAS N
    peers.py crt-cold  HOST      CERT KEY CA THING ALIAS
    peers.py crt-warm  HOST      CERT KEY CA THING ALIAS N

*-cold: one process, start -> credentials printed (what hyperfine times).
*-warm: one process; after a first exchange, N more exchanges timed inside it. Prints one JSON
line: per-exchange seconds (samples), and the process's VmRSS/VmHWM in KiB at the end.

brs = boto3-refresh-session's IoT X.509 method (RefreshableSession(method="iot")). It insists on
an endpoint containing ".credentials.iot."; "x.credentials.iot.local@127.0.0.1:PORT" passes that
check and urlparse() then yields host 127.0.0.1 and PORT (the "x.credentials.iot.local" part is
URL userinfo). A forced refresh is botocore's own refresh path,
RefreshableCredentials._protected_refresh(is_mandatory=True), which calls BRS's
_get_credentials (new event loop group, TLS context and connection each time).

crt = awscrt's AwsCredentialsProvider.new_x509 (aws-c-auth, C). Its endpoint is a bare host
name: the port is always 443 and "host:port" is refused (AWS_IO_DNS_INVALID_NAME), so the fake
provider must listen on 127.0.0.1:443. The test CA is given with
TlsContextOptions.override_default_trust_store_from_path. The provider caches credentials, so
the warm loop makes a new provider per exchange and reuses one ClientTlsContext.
"""
import json
import sys
import time


def status_kib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def brs_session(host, port, cert, key, ca, thing, alias):
    import boto3_refresh_session as brs

    return brs.RefreshableSession(
        method="iot",
        endpoint=f"x.credentials.iot.local@{host}:{port}",
        role_alias=alias,
        certificate=cert,
        private_key=key,
        ca=ca,
        thing_name=thing,
        defer_refresh=False,
    )


def crt_context(cert, key, ca):
    from awscrt import io

    opts = io.TlsContextOptions.create_client_with_mtls_from_path(cert, key)
    opts.override_default_trust_store_from_path(None, ca)
    return io.ClientTlsContext(opts)


def crt_fetch(ctx, host, thing, alias):
    from awscrt import auth

    provider = auth.AwsCredentialsProvider.new_x509(
        endpoint=host, thing_name=thing, role_alias=alias, tls_ctx=ctx
    )
    return provider.get_credentials().result(10)


def main(argv):
    what = argv[1]
    if what == "brs-cold":
        s = brs_session(*argv[2:9])
        c = s.refreshable_credentials()
        print(json.dumps({"AccessKeyId": c["access_key"], "SecretAccessKey": c["secret_key"],
                          "Token": c["token"], "Expiration": c["expiry_time"]}))
    elif what == "brs-warm":
        s = brs_session(*argv[2:9])
        n = int(argv[9])
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            with s._credentials._refresh_lock:
                s._credentials._protected_refresh(is_mandatory=True)
            samples.append(time.perf_counter() - t)
        assert s.refreshable_credentials()["access_key"]
        print(json.dumps({"samples": samples, **status_kib()}))
    elif what == "crt-cold":
        host, cert, key, ca, thing, alias = argv[2:8]
        c = crt_fetch(crt_context(cert, key, ca), host, thing, alias)
        print(json.dumps({"AccessKeyId": c.access_key_id, "SecretAccessKey": c.secret_access_key,
                          "Token": c.session_token, "Expiration": str(c.expiration)}))
    elif what == "crt-warm":
        host, cert, key, ca, thing, alias, n = argv[2:9]
        ctx = crt_context(cert, key, ca)
        crt_fetch(ctx, host, thing, alias)
        samples = []
        for _ in range(int(n)):
            t = time.perf_counter()
            c = crt_fetch(ctx, host, thing, alias)
            samples.append(time.perf_counter() - t)
            assert c.access_key_id
        print(json.dumps({"samples": samples, **status_kib()}))
    else:
        sys.exit(f"unknown subcommand {what}")


if __name__ == "__main__":
    main(sys.argv)
