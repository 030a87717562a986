"""``ray job submit`` entrypoint for batch scoring; takes the same arguments as ``raysky score``.

    ray job submit --working-dir . -- python jobs/score_archive.py \
        --input s3://bucket/archive --output s3://bucket/results \
        --segmenter s3://bucket/ckpt/seg --classifier s3://bucket/ckpt/cls --gpus-per-worker 1
"""

import sys

from raysky.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
