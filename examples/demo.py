"""The README demo (`make demo`), as a script: `python examples/demo.py`."""

from absorber_memory.demo import run_demo

if __name__ == "__main__":
    run_demo()
