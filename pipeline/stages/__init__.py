"""The job's Ray Data stages, in the order images flow through them: read, detect, segment."""
