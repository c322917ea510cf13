#!/usr/bin/env python3
"""Thin CLI; the implementation and its documentation live in nrd_dist.tools.export_model."""

import sys

from nrd_dist.tools.export_model import main

if __name__ == "__main__":
    sys.exit(main())
