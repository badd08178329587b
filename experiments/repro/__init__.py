"""The section 5 reproduction: registry, runner, workers, analyses, timing, report."""
