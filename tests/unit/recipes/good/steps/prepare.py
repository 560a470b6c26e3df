"""A stand-in step shipped by pipeline.yaml."""

import sys

print("prepare", sys.argv)
