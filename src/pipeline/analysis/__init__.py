"""Statistical analysis of experiment results: summaries and honest comparisons between designs."""
