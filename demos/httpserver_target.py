#!/usr/bin/env python3
"""A small HTTP server whose whole state is in its memory, for demos/checkpoint_http.py.

http.server.ThreadingHTTPServer speaking HTTP/1.1 (keep-alive: one handler thread per connection,
serving request after request on it). The state is a dict of integer counters, created at start
(counter "kN" = N for N < --keys) and changed by POST requests.

    GET  /ping           "pong"; headers X-Conn-Id (the server's number for this connection) and
                         X-Conn-Requests (requests served on this connection so far, this one included)
    GET  /get/NAME       the counter's value
    POST /incr/NAME      adds the body (an integer, 1 if empty) to the counter; answers the new value
    GET  /state          JSON: {"counters": how many, "total": their sum, "digest": sha256 of them all,
                         "pid": the server's PID, "connections": connections accepted so far}

usage: python3 demos/httpserver_target.py --port PORT [--keys N]
Prints "ready PID PORT" on stdout once it listens, then nothing (request logging is off).
"""
import argparse
import hashlib
import http.server
import json
import os
import sys
import threading


class State:
    def __init__(self, keys):
        self.lock = threading.Lock()
        self.counters = {"k%d" % i: i for i in range(keys)}
        self.connections = 0

    def incr(self, name, amount):
        with self.lock:
            v = self.counters.get(name, 0) + amount
            self.counters[name] = v
            return v

    def summary(self):
        with self.lock:
            items = sorted(self.counters.items())
            conns = self.connections
        h = hashlib.sha256()
        for k, v in items:
            h.update(b"%s=%d\n" % (k.encode(), v))
        return {"counters": len(items), "total": sum(v for _, v in items), "digest": h.hexdigest(),
                "pid": os.getpid(), "connections": conns}

    def new_connection(self):
        with self.lock:
            self.connections += 1
            return self.connections


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive
    server_version = "ckpt-demo-http/1"
    disable_nagle_algorithm = True     # headers and body are two writes: no 40 ms delayed-ACK stall

    def setup(self):
        super().setup()
        self.conn_id = self.server.state.new_connection()
        self.conn_requests = 0

    def log_message(self, fmt, *args):
        pass

    def _reply(self, code, body, ctype="text/plain"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Conn-Id", str(self.conn_id))
        self.send_header("X-Conn-Requests", str(self.conn_requests))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.conn_requests += 1
        state = self.server.state
        if self.path == "/ping":
            self._reply(200, "pong")
        elif self.path.startswith("/get/"):
            name = self.path[len("/get/"):]
            with state.lock:
                v = state.counters.get(name)
            if v is None:
                self._reply(404, "no such counter")
            else:
                self._reply(200, str(v))
        elif self.path == "/state":
            self._reply(200, json.dumps(state.summary()), "application/json")
        else:
            self._reply(404, "not found")

    def do_POST(self):
        self.conn_requests += 1
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if not self.path.startswith("/incr/"):
            self._reply(404, "not found")
            return
        try:
            amount = int(body or b"1")
        except ValueError:
            self._reply(400, "body must be an integer")
            return
        self._reply(200, str(self.server.state.incr(self.path[len("/incr/"):], amount)))


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--keys", type=int, default=100000)
    args = ap.parse_args()
    state = State(args.keys)
    srv = Server(("127.0.0.1", args.port), Handler)
    srv.state = state
    sys.stdout.write("ready %d %d\n" % (os.getpid(), srv.server_address[1]))
    sys.stdout.flush()
    srv.serve_forever()


if __name__ == "__main__":
    main()
