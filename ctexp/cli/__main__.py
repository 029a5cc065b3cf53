"""``python -m ctexp.cli``."""

from ctexp.cli import main

main()
