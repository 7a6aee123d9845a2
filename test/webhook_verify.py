#!/usr/bin/env python3
"""Verify the Standard Webhooks signatures of requests test/receiver.pl logged,
the way a receiver does (Python's hmac), for the outbox TAP tests.

  webhook_verify.py LOG PATH SECRET [SECRET...]

For every logged request to PATH: webhook-id must be the Idempotency-Key,
webhook-timestamp within 5 minutes of the time the request arrived, and
webhook-signature must hold, for each SECRET given, a valid "v1," signature
of "id.timestamp.body" (with two secrets: both, as while rotating).  A
signature over a changed body or under another key must fail.
Prints "verified N" or the first problem (and exits 1).
"""
import base64
import hashlib
import hmac
import sys


def key_of(secret):
    assert secret.startswith("whsec_")
    return base64.b64decode(secret[len("whsec_"):])


def sign(key, msg_id, ts, body):
    mac = hmac.new(key, f"{msg_id}.{ts}.{body}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def verified(key, msg_id, ts, body, header):
    expected = sign(key, msg_id, ts, body)
    return any(hmac.compare_digest(expected, s[3:])
               for s in header.split(" ") if s.startswith("v1,"))


def main():
    log, path, secrets = sys.argv[1], sys.argv[2], sys.argv[3:]
    keys = [key_of(s) for s in secrets]
    n = 0
    with open(log, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t", 6)
            if len(fields) != 7 or fields[3] != path:
                continue
            t, _status, idem, _path, _type, x, body = fields
            h = dict(kv.split("=", 1) for kv in x.split("&") if "=" in kv)
            msg_id, ts, sig = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
            if msg_id is None or ts is None or sig is None:
                sys.exit(f"request {idem}: webhook headers missing: {x}")
            if msg_id != idem:
                sys.exit(f"request {idem}: webhook-id {msg_id} is not the event id")
            if abs(float(t) / 1000 - int(ts)) > 300:
                sys.exit(f"request {idem}: timestamp {ts} is not within 5 minutes of {t} ms")
            if len(sig.split(" ")) != len(keys):
                sys.exit(f"request {idem}: {len(sig.split(' '))} signatures for {len(keys)} secrets")
            for i, key in enumerate(keys):
                if not verified(key, msg_id, ts, body, sig):
                    sys.exit(f"request {idem}: no valid signature under secret {i + 1}")
                if verified(key, msg_id, ts, body + " ", sig):
                    sys.exit(f"request {idem}: a changed body verifies")
                if verified(bytes(reversed(key)), msg_id, ts, body, sig):
                    sys.exit(f"request {idem}: another key verifies")
            n += 1
    print(f"verified {n}")


if __name__ == "__main__":
    main()
