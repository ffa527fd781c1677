"""`python -m nectar.cli`: the `nectar` command."""
import sys

from .main import main

sys.exit(main())
