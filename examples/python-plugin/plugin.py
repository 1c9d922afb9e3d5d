#!/usr/bin/env python3
"""Example: a command plugin in Python, standard library only.

It speaks the gateway's plugin protocol itself: JSON-RPC 2.0 shaped JSON
lines on stdin/stdout (see docs/plugins.md). stdout is for protocol messages
only; logs go to stderr.

- `py-stats.sum` sums `params.values` and sends the caller a
  `plugin.py-stats.summed` event;
- the `ticker` service broadcasts `plugin.py-stats.tick` to operators every
  `tickMs` (config, default 60000) while it runs.
"""
import json
import sys
import threading

out_lock = threading.Lock()
ticker_stop = threading.Event()
config = {}


def send(msg):
    msg["jsonrpc"] = "2.0"
    with out_lock:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def log(text):
    print(text, file=sys.stderr, flush=True)


def ticker():
    n = 0
    while not ticker_stop.wait(config.get("tickMs", 60000) / 1000):
        n += 1
        send({"method": "emit", "params": {"event": "plugin.py-stats.tick", "payload": {"n": n}}})


def call(id, p):
    params = p.get("params") or {}
    if p["method"] == "py-stats.sum":
        values = params.get("values")
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            send({"id": id, "result": {"ok": False, "error": {
                "code": "INVALID_REQUEST", "message": "values must be an array of numbers"}}})
            return
        total = sum(values)
        send({"method": "emit", "params": {"event": "plugin.py-stats.summed",
                                            "payload": {"sum": total},
                                            "connIds": [p["client"]["connId"]]}})
        send({"id": id, "result": {"ok": True, "payload": {"sum": total, "count": len(values)}}})
    else:
        send({"id": id, "result": {"ok": False, "error": {
            "code": "INVALID_REQUEST", "message": "unknown method " + p["method"]}}})


def main():
    global config
    for line in sys.stdin:
        msg = json.loads(line)
        method, id, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
        if method == "initialize":
            config = params.get("config") or {}
            send({"id": id, "result": {
                "protocolVersion": 1,
                "name": "Python stats",
                "version": "1.0.0",
                "methods": [{"name": "py-stats.sum", "scope": "operator.read"}],
                "events": ["plugin.py-stats.summed", "plugin.py-stats.tick"],
                "services": ["ticker"],
            }})
        elif method == "call":
            call(id, params)
        elif method == "start":
            threading.Thread(target=ticker, daemon=True).start()
            log("ticker started")
            send({"id": id, "result": {}})
        elif method == "stop":
            ticker_stop.set()
            log("ticker stopped")
            send({"id": id, "result": {}})
        elif method == "shutdown":
            break
        elif id is not None:
            # Every request gets an answer, if only an error (`ping` included).
            send({"id": id, "error": {"code": -32601, "message": "unknown method " + str(method)}})


main()
