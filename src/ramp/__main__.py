"""`python -m ramp`: the same as the `ramp` command."""

from ramp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
