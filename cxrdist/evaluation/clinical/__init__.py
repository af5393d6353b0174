"""Clinical outputs beyond AUC: calibration and operating points, fitted on the out-of-fold predictions.
May import scoring, figures and the floors below them (training, model, data, foundation); never prediction or report."""
