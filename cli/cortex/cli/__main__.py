"""`python -m cortex.cli`: the `cortex` console script without a PATH lookup."""

import sys

from cortex.cli.main import main

sys.exit(main())
