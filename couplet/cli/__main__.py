"""`python -m couplet.cli` (the same as `couplet` and `python -m couplet`)."""

from couplet.cli import main

main()
