"""`python -m minillm` runs the command-line interface."""

from minillm.cli import main

raise SystemExit(main())
