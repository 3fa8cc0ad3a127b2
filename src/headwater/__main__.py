"""``python -m headwater`` runs the command line."""

from headwater.cli.main import main

raise SystemExit(main())
