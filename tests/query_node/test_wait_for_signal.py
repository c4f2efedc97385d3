"""How `facepq node` and `facepq coordinator` wait for SIGTERM / SIGINT (query_node.cli._wait_for_signal).

A Python handler runs in the main thread between bytecodes. The earlier wait set a threading.Event from the
handler while the main thread sat in Event.wait(), whose lock Event.set() takes too: a signal flagged while
wait() held that lock was handled there and deadlocked the server for good (seen once: a node left by the
demo's SIGKILLed launcher got its parent-death SIGTERM and never exited). Here another process sends a
waiting process SIGTERM every ~50 us, asynchronously as the kernel does, while it waits 5,000 times in a
row: every wait must return, with the signal (the Event version hung or died of nested handlers within
seconds, every run).
"""
import subprocess
import sys

from tests.support.processes import REPO_ROOT

# The sender stops when the waiting process (its parent) is gone, killed by the run's timeout if it hangs: it
# never signals a recycled pid, and needs no deadline of its own that a slow machine's 5,000 waits could outlast.
_SENDER = """
import os, signal, sys, time
parent = int(sys.argv[1])
while os.getppid() == parent:
    os.kill(parent, signal.SIGTERM)
    time.sleep(0.00005)
"""

_WAITS = """
import os, signal, subprocess, sys
from query_node.cli import _wait_for_signal

for sig in (signal.SIGTERM, signal.SIGINT):   # until the first wait installs its own
    signal.signal(sig, lambda *_: None)
sender = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())])
got = {_wait_for_signal(poll=1e-5) for _ in range(5_000)}
sender.kill()
sender.wait()
print(sorted(got), flush=True)
"""


def test_every_wait_returns_the_signal_it_got_while_signals_keep_coming():
    done = subprocess.run([sys.executable, "-c", _WAITS, _SENDER], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[15]", done.stdout[-2000:]
