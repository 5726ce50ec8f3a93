"""The entry point tests/test_forked.py forks: `main([CODE, OUT, SLEEP])`."""

import os
import sys
import time


def main(args: list[str]) -> int:
    """With a 4th argument, an fd: write $INCFS_TEST_EARLY to it."""
    code, out, pause = int(args[0]), args[1], float(args[2])
    if len(args) > 3:
        os.write(int(args[3]), os.environ.get("INCFS_TEST_EARLY", "-").encode())
        os.close(int(args[3]))
    with open("/proc/self/comm") as f:
        name = f.read().strip()
    with open(out, "w") as f:
        f.write(f"{name} {os.getsid(0) == os.getpid()}\n")
    print("to stdout", flush=True)
    time.sleep(pause)
    sys.stdout.flush()
    return code
