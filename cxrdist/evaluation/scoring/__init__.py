"""Scoring: AUCs and their bootstrap intervals, gathered predictions and the files they are written to, `cxrdist compare`.
May import model, data and the foundation modules (cxrdist/*.py); never training or the other evaluation packages."""
