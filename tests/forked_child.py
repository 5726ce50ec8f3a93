"""The entry point tests/test_forked.py forks: `main([CODE, OUT, SLEEP])`."""

import os
import sys
import time


def main(args: list[str]) -> int:
    code, out, pause = int(args[0]), args[1], float(args[2])
    with open("/proc/self/comm") as f:
        name = f.read().strip()
    with open(out, "w") as f:
        f.write(f"{name} {os.getsid(0) == os.getpid()}\n")
    print("to stdout", flush=True)
    time.sleep(pause)
    sys.stdout.flush()
    return code
