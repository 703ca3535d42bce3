"""`python -m experiments [--quick] [NAME ...]`: the same as `bn-research reproduce`."""

import sys

from experiments import reproduce

sys.exit(reproduce.main())
