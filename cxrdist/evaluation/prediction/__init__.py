"""The fold ensemble at work: fold models and their TTA views, `cxrdist evaluate`, `predict`, `export`, Grad-CAM maps.
May import clinical, scoring, figures and the floors below them; never report."""
