"""`python -m data_pipeline ARGS` = `ds-fp4-data ARGS` (cli.py), for a checkout without the console script."""

import sys

from .cli import main

sys.exit(main())
