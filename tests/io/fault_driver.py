"""Run the piece-surgery CLI with a signal sent to itself at a chosen point: the `count`-th call of
`module:function` (argv: module:function count signum -- CLI arguments)."""

import importlib
import os
import sys
import time


def main() -> None:
    target, count, signum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1 :]
    module_name, function_name = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)
    calls = [0]

    def faulty(*a, **kw):
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # SIGTERM's handler raises at the next bytecode; SIGKILL never returns
        return original(*a, **kw)

    setattr(module, function_name, faulty)
    sys.argv = ["piece-surgery", *args]
    from piece_surgery.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
