"""`python -m cnexp.plan`: the plan's command line (cnexp/launch/plan.py)."""
import sys

from cnexp.launch.plan import main

if __name__ == "__main__":
    sys.exit(main())
