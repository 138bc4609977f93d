"""`okdpipe compare`: the method comparison protocol -- entries, seeds, paired tables, verdicts, a figure."""
