"""``python -m mobilevit``: the ``mobilevit`` command."""

from .cli import main

raise SystemExit(main())
