"""The plumbing of the test services: a free port, ending a service process, and small HTTP
servers on a thread (the token server, the fault proxy)."""
import http.server
import socket
import subprocess
import threading


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(proc):
    """End a service started by a test: SIGTERM, then SIGKILL if it has not exited within
    10 seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """The base of the test servers' request handlers: HTTP/1.1 (kept-alive connections,
    as a registry's clients use) and no log line per request."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


def serve_in_thread(port, handler, name):
    """A ThreadingHTTPServer for `handler` on 127.0.0.1:port, served by a daemon thread
    called `name`; end it with stop_server."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name=name, daemon=True).start()
    return httpd


def stop_server(httpd):
    """Stop a server of serve_in_thread (None: nothing to stop) and close its socket."""
    if httpd:
        httpd.shutdown()
        httpd.server_close()
