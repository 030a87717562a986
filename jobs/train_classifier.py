"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/train_classifier.py ARGS``.

Takes the same arguments as ``raysky train classifier``.
"""

import sys

from raysky.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", "classifier", *sys.argv[1:]]))
