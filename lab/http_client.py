"""Parallel keep-alive HTTP/1.1 clients for the lab.

usage: http_client.py HOST PORT CONNECTIONS REQUESTS_PER_CONNECTION [MAX_BODY]
Prints the number of requests completed.
"""

from __future__ import annotations

import http.client
import random
import sys
import threading


def worker(host: str, port: int, n: int, max_body: int, seed: int, done: list[int]) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for i in range(n):
        size = rng.randint(0, max_body)
        body = bytes(rng.getrandbits(8) for _ in range(size)) if size else None
        conn.request("POST" if body else "GET", f"/c{seed}/r{i}", body=body,
                     headers={"X-Seq": str(i)})
        conn.getresponse().read()
        done.append(1)
    conn.close()


if __name__ == "__main__":
    host, port, conns, reqs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    max_body = int(sys.argv[5]) if len(sys.argv) > 5 else 2000
    done: list[int] = []
    threads = [threading.Thread(target=worker, args=(host, port, reqs, max_body, i, done))
               for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(len(done))
