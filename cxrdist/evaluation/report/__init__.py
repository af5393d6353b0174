"""Presentation: the HTML report (page, sections, HTML helpers) and the W&B dashboards of an evaluated experiment.
May import every floor below it (prediction, clinical, scoring, figures, training, model, data, foundation)."""
