"""``python -m trainer.dmu``: see trainer/dmu/run.py."""
import sys

from trainer.dmu.run import main

if __name__ == "__main__":
    sys.exit(main())
