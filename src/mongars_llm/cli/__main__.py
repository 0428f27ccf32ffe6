"""``python -m mongars_llm.cli`` (what ``accelerate launch -m mongars_llm.cli`` runs)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
