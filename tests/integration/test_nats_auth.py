"""Live recording to NATS over mutual TLS with a token, with real parts: ``mirror-agent run``
captures ``lo`` of a namespace the test makes, where Debian's ``nats-server`` runs with TLS
(a throwaway CA from openssl, client certificates required) and token authorization; the
server is stopped by PID, always.

- right credentials: every connection the clients made is recorded, and reads back through
  the consumer (run inside the namespace, with the same TLS files and token);
- a wrong token: ``run`` stops before capturing, with one line and exit 1, the token in no
  output.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.netns import AGENT, NetNS, run_clients, wait_port
from tests.unit.nats_server import NatsServer, TlsFiles, make_tls, write_config

HERE = Path(__file__).resolve().parent
PORT = 14223
SECRET = "live-s3cret"

#: Run in the namespace: how many records and connections the stream holds.
_READ_BACK = """
import json, sys
from agent.sinks.nats import NatsAuth
from agent.sinks.nats.consumer import read_stream
from agent.sinks.nats.url import parse_nats_url
ca, cert, key, token = sys.argv[2:6]
auth = NatsAuth(ca_file=ca, cert_file=cert, key_file=key, token_file=token)
got = read_stream(parse_nats_url(sys.argv[1]).with_flags(auth))
print(json.dumps({"records": len(got.records), "problems": got.problems,
                  "flows": len({r.flow_id for r in got.records}),
                  "requests": sum(r.data.count(b"X-Seq: ") for r in got.records)}))
"""


def _wait_log(err: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in err.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in the agent's log"
        time.sleep(0.05)


def _flags(tls: TlsFiles, token: Path) -> list[str]:
    return ["--nats-ca", str(tls.ca), "--nats-cert", str(tls.client_cert), "--nats-key",
            str(tls.client_key), "--nats-token-file", str(token)]


def test_live_recording_over_mutual_tls_with_a_token(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    token, wrong = tmp_path / "token", tmp_path / "wrong"
    token.write_text(SECRET + "\n")
    wrong.write_text("not-the-token\n")
    conf = write_config(tmp_path / "server.conf", tls.server_block(verify=True),
                        f'authorization {{ token: "{SECRET}" }}')
    url = f"tls://127.0.0.1:{PORT}/mirror.secure"
    with NetNS() as ns:
        broker = NatsServer(tmp_path / "store", PORT, ns.cmd(), config=conf).start()
        try:
            (tmp_path / "service").mkdir()
            ns.popen(sys.executable, str(HERE / "replay_server.py"), "127.0.0.1", "8080",
                     str(tmp_path / "service"), stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
            wait_port(ns, 8080)
            # A wrong token: refused at start, one line, exit 1, before any capture.
            res = ns.run(*AGENT, "--iface", "lo", "--port", "8080", "--record", url,
                         *_flags(tls, wrong), check=False, timeout=60)
            assert res.returncode == 1, res.stderr
            lines = [x for x in res.stderr.splitlines() if not x.startswith("{")]
            assert lines == [f"mirror-agent: failed: NatsAuthError: {url}: authorization "
                             "violation (a wrong or missing credential)"], res.stderr
            assert "capture live" not in res.stderr and "Traceback" not in res.stderr
            # The right one: everything recorded, over TLS, read back the same way.
            stats, err = tmp_path / "stats.json", tmp_path / "agent.err"
            with err.open("w") as log:
                agent = ns.popen(*AGENT, "--iface", "lo", "--port", "8080", "--record", url,
                                 *_flags(tls, token), "--stats-json", str(stats),
                                 stderr=log, stdout=subprocess.DEVNULL)
            _wait_log(err, "capture live")
            _wait_log(err, "NATS recording: connected")
            assert run_clients(ns, "127.0.0.1", 8080, 4, 10) == 40
            time.sleep(0.5)  # published and acknowledged
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(60) == 0, err.read_text()
            s = json.loads(stats.read_text())
            assert s["mirror_agent_record_connections_completed_total"] >= 4
            assert SECRET not in err.read_text() + stats.read_text()
            out = ns.run(sys.executable, "-c", _READ_BACK, url, str(tls.ca),
                         str(tls.client_cert), str(tls.client_key), str(token))
            got = json.loads(out.stdout)
            assert got["problems"] == [] and got["requests"] == 40, got
            assert got["flows"] == s["mirror_agent_record_connections_completed_total"]
        finally:
            broker.stop()
