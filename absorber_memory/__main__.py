"""`python -m absorber_memory` is the `absorber-memory` command."""

from .cli import main

raise SystemExit(main())
