"""``python scripts/sigint_module.py MODULE ARGS...`` is ``python -m MODULE ARGS...`` with SIGINT
raising KeyboardInterrupt even where bash started this process in the background without job
control (SIGINT is then ignored, and Python leaves an ignored SIGINT ignored): a step's time
limit stops pytest with SIGINT, and pytest still prints its summary (lease_lib.sh, step --int)."""
import runpy
import signal
import sys

signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
