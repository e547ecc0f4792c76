"""python -m duodiff_fast: the duodiff-fast command."""
import sys

from .cli import main

sys.exit(main())
