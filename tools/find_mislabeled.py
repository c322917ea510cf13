#!/usr/bin/env python3
"""Thin CLI; the implementation and its documentation live in nrd_dist.diagnostics.find_mislabeled."""

import sys

from nrd_dist.diagnostics.find_mislabeled import main

if __name__ == "__main__":
    sys.exit(main())
