"""Train ARMT with the Hugging Face Trainer: `python train.py --help`, or `accelerate launch train.py ...`.

The code is the `training` package (`python -m training` is the same command); this file keeps the documented
entry point.
"""

from training import main

if __name__ == "__main__":
    main()
