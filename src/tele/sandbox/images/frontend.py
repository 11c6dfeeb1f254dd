"""`tele-sandbox/frontend`: an HTTP service that calls another one, as a demo app's front end.

Every request on $PORT (default 8080) makes one GET to $BACKEND_URL (default
http://backend/) with the request's path appended, passing on the `x-*` request headers —
the way a real service propagates a request's context — so a personal intercept of the backend
selected by a header works through the front end too. The answer is JSON: the front end's pod
and the backend's answer (parsed when it is JSON, else its text), or a 502 naming the backend's
error. The name lookup goes through the pod's resolv.conf, i.e. the cluster's DNS.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import urllib.error
import urllib.request

POD = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME", "")
BACKEND = os.environ.get("BACKEND_URL", "http://backend/").rstrip("/")


def call_backend(path: str, headers: dict[str, str]) -> tuple[int, object]:
    request = urllib.request.Request(BACKEND + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return 502, f"cannot reach {BACKEND}: {reason}"
    text = body.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.strip()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        forwarded = {k: v for k, v in self.headers.items() if k.lower().startswith("x-")}
        status, answer = call_backend(self.path, forwarded)
        body = json.dumps({"frontend": POD, "backend": answer}).encode() + b"\n"
        self.send_response(200 if status < 500 else 502)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print(f"GET {self.path} -> backend {status}", flush=True)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request is printed above, for `kubectl logs`


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    # As its container's PID 1 the program gets no default action for SIGTERM: without a
    # handler a pod deletion would wait for the whole grace period and SIGKILL.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"frontend on :{port}, backend {BACKEND}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
