"""Synthetic radiographs for the tests, the demo and the benchmarks: the label table, the rendering, the planted
coupling benchmark and the dataset writer. Part of the data floor: imports only cxrdist.data and the foundation modules."""
