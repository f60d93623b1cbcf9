"""What is made from a finished run: the report, exports, the review loop. Every module reads the
run through ``rundata`` (with ``decisions`` and ``colors``), never through another output."""
