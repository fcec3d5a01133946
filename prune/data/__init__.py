"""Text sources (Hub or bundled), calibration sets and perplexity test texts."""
