"""The entry point tests/test_early_fork.py gives an early child:
`main([FD, GO_FD[, URL]])` writes what it was given to FD (and whether the
first request to URL's host was sent early), prints a line (to its
output), waits until GO_FD reads end of file, and exits with 3."""

import os


def main(args: list[str]) -> int:
    out, go = int(args[0]), int(args[1])
    with open("/proc/self/comm") as f:
        name = f.read().strip()
    facts = [name, str(os.getsid(0) == os.getpid()), os.environ.get("EARLY_TEST", "-"),
             os.environ.get("INCFS_EARLY_STARTED", "-"), os.getcwd()]
    if len(args) > 2:
        from incfs import preconnect

        facts.append(f"asked={preconnect.was_asked(args[2])}")
    os.write(out, (" ".join(facts) + "\n").encode())
    os.close(out)
    print("to the output", flush=True)
    while os.read(go, 1):
        pass
    return 3
