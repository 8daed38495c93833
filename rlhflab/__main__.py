"""`python -m rlhflab` (and `torchrun ... -m rlhflab <stage>`): the `rlhflab` command."""

import sys

from rlhflab.cli import main

sys.exit(main())
