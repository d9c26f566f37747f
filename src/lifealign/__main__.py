"""``python -m lifealign`` (also what ``accelerate launch -m lifealign`` runs)."""

import sys

from lifealign.cli.main import main

sys.exit(main())
