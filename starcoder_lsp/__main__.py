"""`python -m starcoder_lsp` runs the `starcoder-lsp` command."""

from starcoder_lsp.cli import main

raise SystemExit(main())
