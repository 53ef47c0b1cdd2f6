"""zoo.study: studies that compare arms (the sweep, top-1, ablations) and their statistics."""
