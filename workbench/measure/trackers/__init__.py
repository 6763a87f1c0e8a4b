"""One module per metric; each registers its tracker (see `workbench.measure.tracker`)."""
