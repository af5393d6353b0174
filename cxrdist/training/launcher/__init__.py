"""`cxrdist train`'s side of a launch (the accelerate command line, signals, no orphans) and the channel the trainers
answer it through (outcome files, their stderr). May import the foundation and the data stage, never the trainer."""
