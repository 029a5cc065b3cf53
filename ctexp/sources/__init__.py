"""Problem sources: readers that turn dataset files into :class:`ctexp.problems.Problem` records."""
