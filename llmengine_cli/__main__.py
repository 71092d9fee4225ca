"""`python -m llmengine_cli ...` is the `llmengine` command."""

import sys

from llmengine_cli import main

sys.exit(main())
