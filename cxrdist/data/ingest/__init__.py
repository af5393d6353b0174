"""From a label table and a folder of radiographs to a planned dataset: the sources' tables (sources), reading images
(images), attributes kept elsewhere (attribute_table), patient-grouped MIS folds (folds), perceptual fingerprints and the
leakage checks (fingerprint, fingerprint_store, leakage), and `cxrdist prepare` itself (prepare)."""
