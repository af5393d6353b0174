"""Model and objective: network + Label-Graph Refinement, losses, EMA, parameter groups (import the submodules)."""
