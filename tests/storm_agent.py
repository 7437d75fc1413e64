"""An agent process for the broker storm tests: match until told to stop.

    python storm_agent.py TOKEN_FILE ADDRESS[,ADDRESS...] OUT_FILE STOP_FILE

Each match it wins is appended to OUT_FILE as "job_id attempt" and flushed
at once (so a SIGKILLed broker cannot make a win disappear from the record).
A broker that is down (UNAVAILABLE) is retried; it ends when STOP_FILE exists.
"""

import os
import sys
import time

from pilot.api.client import AgentClient, BrokerError, MatchedJob

SLOT = {"cores": 8, "memory_mb": 64000, "disk_mb": 100000, "time_left_s": 86400}


def main() -> int:
    token, addresses, out_path, stop_path = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
    clients = [AgentClient(address, token, timeout=5) for address in addresses]
    with open(out_path, "a") as out:
        turn = 0
        while not os.path.exists(stop_path):
            client = clients[turn % len(clients)]
            turn += 1
            try:
                result = client.match(SLOT, f"storm-{os.getpid()}", "node")
            except BrokerError:
                time.sleep(0.2)  # the broker is down or restarting
                continue
            if isinstance(result, MatchedJob):
                out.write(f"{result.job_id} {result.attempt}\n")
                out.flush()
            else:
                time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
