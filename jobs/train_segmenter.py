"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/train_segmenter.py ARGS``.

Takes the same arguments as ``raysky train segmenter``.
"""

import sys

from raysky.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", "segmenter", *sys.argv[1:]]))
