"""`python -m tinyllm` → the command line."""

from tinyllm.cli import main

raise SystemExit(main())
