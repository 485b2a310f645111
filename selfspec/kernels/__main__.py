"""`python -m selfspec.kernels build`: compile our C kernels once (the Makefile's setup runs it)."""
import sys

from selfspec.kernels import main

sys.exit(main(sys.argv[1:]))
