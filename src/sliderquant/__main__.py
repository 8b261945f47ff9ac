"""`python -m sliderquant` runs the command line."""

import sys

from sliderquant.cli import main

sys.exit(main())
