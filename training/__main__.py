"""`python -m training ...`: the same as `python train.py ...`."""

from . import main

main()
