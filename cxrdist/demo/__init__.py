"""`cxrdist demo`: the one-dataset demo (one_dataset) and the two-hospital demo (two_datasets), on synthetic radiographs."""
