"""``python -m vtok`` (and ``torchrun ... -m vtok train``) runs the command line."""

import sys

from vtok.cli import main

sys.exit(main())
