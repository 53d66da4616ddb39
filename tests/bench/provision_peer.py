"""The peer of the time-to-identity benchmark (tests/bench/provision.sh): a minimal fleet
provisioning client with paho-mqtt and `cryptography`, doing the same two MQTT calls as
`iotcred provision` against the same broker.

    provision_peer.py HOST PORT CA CLAIM_CERT CLAIM_KEY TEMPLATE SERIAL OUT_DIR

Makes an EC P-256 key and a CSR (CN=iotcred, like the agent's default subject), connects with
the claim certificate over TLS (MQTT 3.1.1, clean session), subscribes QoS 1 to the /accepted
and /rejected topics of both calls (one SUBSCRIBE, SUBACK awaited), publishes
CreateCertificateFromCsr (QoS 1) and waits for the reply, publishes RegisterThing with the
ownership token and {"SerialNumber": SERIAL} and waits for the reply, then writes
OUT_DIR/device.pem.crt, OUT_DIR/device.key (0600) and OUT_DIR/thing_name. Every wait is bounded
(10 s). Exit 0 on success, 1 on a rejection or a timeout.

Prints one JSON line on stdout: {"import_ms", "flow_ms"}: the time spent importing the modules
and the time from then to the end of main (key, CSR, connect, both calls, files).
"""
import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

import paho.mqtt.client as mqtt  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

T1 = time.perf_counter()
WAIT = 10.0
CSR_TOPIC = "$aws/certificates/create-from-csr/json"


def main():
    host, port, ca, claim_cert, claim_key, template, serial, out = sys.argv[1:9]
    register_topic = f"$aws/provisioning-templates/{template}/provision/json"

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iotcred")]))
        .sign(key, hashes.SHA256())
    )
    csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()

    events = queue.Queue()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="peer-" + uuid.uuid4().hex[:16],
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    client.tls_set(ca_certs=ca, certfile=claim_cert, keyfile=claim_key)
    client.on_connect = lambda c, u, f, rc, p: events.put(("connect", rc))
    client.on_subscribe = lambda c, u, mid, rcs, p: events.put(("suback", rcs))
    client.on_message = lambda c, u, m: events.put(("message", m.topic, m.payload))

    def wait(kind):
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                sys.exit(f"provision_peer: timed out waiting for {kind}")
            try:
                ev = events.get(timeout=left)
            except queue.Empty:
                continue
            if ev[0] == kind:
                return ev

    client.connect(host, int(port), keepalive=60)
    client.loop_start()
    try:
        _, rc = wait("connect")
        if rc.is_failure:
            sys.exit(f"provision_peer: CONNECT refused: {rc}")
        topics = [f"{t}/{r}" for t in (CSR_TOPIC, register_topic) for r in ("accepted", "rejected")]
        client.subscribe([(t, 1) for t in topics])
        _, codes = wait("suback")
        if any(c.is_failure for c in codes):
            sys.exit(f"provision_peer: SUBSCRIBE refused: {codes}")

        def call(topic, body):
            client.publish(topic, json.dumps(body), qos=1)
            _, reply_topic, payload = wait("message")
            reply = json.loads(payload)
            if reply_topic != topic + "/accepted":
                sys.exit(f"provision_peer: {reply_topic}: {reply.get('errorCode')}: "
                         f"{reply.get('errorMessage')}")
            return reply

        cert = call(CSR_TOPIC, {"certificateSigningRequest": csr_pem})
        thing = call(register_topic, {
            "certificateOwnershipToken": cert["certificateOwnershipToken"],
            "parameters": {"SerialNumber": serial},
        })
    finally:
        client.disconnect()
        client.loop_stop()

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "device.pem.crt"), "w") as f:
        f.write(cert["certificatePem"])
    fd = os.open(os.path.join(out, "device.key"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(os.path.join(out, "thing_name"), "w") as f:
        f.write(thing["thingName"])


if __name__ == "__main__":
    main()
    T2 = time.perf_counter()
    print(json.dumps({"import_ms": round((T1 - T0) * 1e3, 2),
                      "flow_ms": round((T2 - T1) * 1e3, 2)}))
